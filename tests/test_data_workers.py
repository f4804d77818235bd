"""DataLoader workers never copy the image cache: they map it again by path.

With the spawn and forkserver start methods (macOS; Linux from Python 3.14) the
dataset is pickled into every worker. A pickled np.memmap is a full copy of its
data; TripletImages sends only the file's path and shape.
"""

from __future__ import annotations

import multiprocessing
import pickle
import sys

import numpy as np
import pytest
import torch

from deepranking import image_data

SIDE = 64
ROWS = 131072  # 131,072 x 64 x 64 x 3 = 1.5 GiB: a sparse file, so making it costs no disk or time


def rss_mb(pid: int, field: str = "RssAnon") -> float:
    """A process's resident memory of one kind, MiB. RssAnon is private memory: where a pickled copy
    of the cache would land (importing torch alone takes ~0.3 GiB of it; shared libraries are RssFile)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no {field}")


@pytest.fixture(scope="module")
def big_cache(tmp_path_factory):
    path = tmp_path_factory.mktemp("cache") / "rows.u8"
    with open(path, "wb") as f:
        f.truncate(ROWS * SIDE * SIDE * 3)
    rows = np.memmap(path, dtype=np.uint8, mode="r", shape=(ROWS, SIDE, SIDE, 3))
    trip = np.random.default_rng(0).integers(0, ROWS, size=(256, 3))
    return rows, trip


def test_pickled_dataset_holds_the_path_not_the_pixels(big_cache):
    rows, trip = big_cache
    ds = image_data.TripletImages(rows, trip)
    blob = pickle.dumps(ds)
    assert len(blob) < 64 * 1024 < rows.nbytes  # the triplets and a path, never the 768 MiB of rows
    again = pickle.loads(blob)
    batch, order = again[np.arange(4)]
    expect, _ = ds[np.arange(4)]
    assert torch.equal(batch, expect) and order.tolist() == trip[:4].T.reshape(-1).tolist()
    in_memory = image_data.TripletImages(np.zeros((3, 2, 2, 3), np.uint8), np.array([[0, 1, 2]]))
    assert pickle.loads(pickle.dumps(in_memory))[np.array([0])][0].shape == (3, 2, 2, 3)  # plain arrays travel


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
@pytest.mark.parametrize("method", ["spawn", "forkserver"])
def test_spawned_workers_stay_far_below_the_cache_size(big_cache, method):
    rows, trip = big_cache
    sampler = image_data.EpochBatchSampler(len(trip), 8, seed=0)
    loader = torch.utils.data.DataLoader(image_data.TripletImages(rows, trip), sampler=sampler, batch_size=None,
                                         num_workers=2, multiprocessing_context=multiprocessing.get_context(method))
    it = iter(loader)
    for _ in range(6):
        batch, order = next(it)
        assert batch.shape == (24, SIDE, SIDE, 3)
    worker_mb = [rss_mb(w.pid) for w in it._workers]
    total_mb = [rss_mb(w.pid, "VmRSS") for w in it._workers]
    del it
    cache_mb = rows.nbytes / 2**20
    print(f"{method}: cache {cache_mb:.0f} MiB, worker private RSS {', '.join(f'{m:.0f}' for m in worker_mb)} MiB "
          f"(all RSS {', '.join(f'{m:.0f}' for m in total_mb)} MiB)")
    assert all(m < cache_mb / 2 for m in worker_mb), (method, worker_mb)
