"""The benchmarks' memory figures: PeakRSS per block in one process, run()'s per-child peak."""

import math
import mmap
import sys

import numpy as np
import pytest

from conftest import REPO

sys.path.insert(0, str(REPO / "bench"))
import bench_common  # noqa: E402

from deepranking.cli import UserError  # noqa: E402

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self")


def touch_mb(mb: int) -> mmap.mmap:
    """A resident buffer of ``mb`` MB (every page written) in fresh pages of its own.

    An anonymous mmap, not np.empty: after earlier tests in the same process, malloc may
    serve a 20 MB array from freed heap memory that is still resident, which would add
    nothing to the peak. Closing (or dropping) the map returns the pages.
    """
    buf = mmap.mmap(-1, mb * 2**20)
    np.frombuffer(buf, dtype=np.uint8)[::4096] = 1
    return buf


@linux_only
def test_peak_rss_gives_each_block_its_own_peak():
    with bench_common.PeakRSS() as big:
        buf = touch_mb(200)
        del buf  # freed inside the block: only the high-water mark remembers it
    with bench_common.PeakRSS() as small:
        buf = touch_mb(20)
        del buf
    if math.isnan(big.extra_mb):
        pytest.skip("this system does not let a process reset its peak RSS (/proc/self/clear_refs)")
    assert 190 <= big.extra_mb <= 260
    # the second block was not charged for the first block's 200 MB
    assert 10 <= small.extra_mb <= 60
    assert big.peak_mb >= big.start_mb + big.extra_mb - 1e-6
    assert str(small).endswith(f"(+{small.extra_mb:.0f})")


@linux_only
def test_run_returns_the_childs_own_peak(tmp_path, monkeypatch):
    script = tmp_path / "alloc.py"
    monkeypatch.setattr(bench_common, "REPO", tmp_path)
    script.write_text("import sys, time\nbuf = bytearray(int(sys.argv[1]) * 2**20)\n"
                      "buf[::4096] = b'x' * len(buf[::4096])\ntime.sleep(0.2)\n")
    parent = touch_mb(400)  # a big parent: a forked child's ru_maxrss would count these pages
    big = bench_common.run("alloc.py", 300)
    small = bench_common.run("alloc.py", 1)  # RUSAGE_CHILDREN would still say 300+ here
    del parent
    assert 300 <= big < 400 and small < 100


def test_run_failure_is_a_user_error(tmp_path, monkeypatch):
    (tmp_path / "fail.py").write_text("raise SystemExit(3)\n")
    monkeypatch.setattr(bench_common, "REPO", tmp_path)
    with pytest.raises(UserError, match=r"fail.py failed \(exit 3\)"):
        bench_common.run("fail.py")


@linux_only
def test_run_measured_counts_the_childrens_memory_in_the_tree_peak(tmp_path, monkeypatch):
    """A script whose worker process holds 200 MB: its own peak stays small, its tree's includes the worker."""
    script = tmp_path / "workers.py"
    monkeypatch.setattr(bench_common, "REPO", tmp_path)
    script.write_text(
        "import subprocess, sys\n"
        "code = 'import time\\nbuf = bytearray(200 * 2**20)\\nbuf[::4096] = b\"x\" * len(buf[::4096])\\ntime.sleep(0.5)'\n"
        "subprocess.run([sys.executable, '-c', code], check=True)\n")
    m = bench_common.run_measured("workers.py")
    assert m.peak_mb < 100 and m.tree_peak_mb >= 200 and m.seconds >= 0.5


def test_kept_bench_data_is_reused_only_when_it_holds_the_images_asked_for(tmp_path):
    data = bench_common.fashion_mnist(tmp_path / "fm", "bundled", 3, 2, seed=0)
    wnids = (data / "wnids.txt").stat().st_mtime_ns
    assert bench_common.fashion_mnist(tmp_path / "fm", "bundled", 3, 2, seed=0) == data  # reused, not rewritten
    assert (data / "wnids.txt").stat().st_mtime_ns == wnids
    # a --work-dir kept from a run with another --val-per-class (or --train-per-class) must not be scored silently
    with pytest.raises(UserError, match=r"holds 10 classes, 30 train and 20 val images, not the 10 classes x 3 \+ 1"):
        bench_common.fashion_mnist(tmp_path / "fm", "bundled", 3, 1, seed=0)
    with pytest.raises(UserError, match=r"not the 10 classes x 4 \+ 2"):
        bench_common.fashion_mnist(tmp_path / "fm", "bundled", 4, 2, seed=0)
