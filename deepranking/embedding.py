"""Images -> embeddings, the same way in every stage (validation, gen_embeddings, query, get_distance).

``embed_paths`` decodes through the image cache at the checkpoint's ``cache_size`` and
``embed_images`` runs the net on the device with the checkpoint's preprocessing, so an
image gives the same vector wherever it is embedded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from deepranking import argtypes, cli, image_cache, image_data, runtime
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing, preprocess
from deepranking.progress import loop_forecast


def add_embedding_flags(p, batch_help: str = "images per forward pass") -> None:
    """The flags of every program that embeds images: --batch-size, --device, --amp, --cache-dir,
    --cache-budget, --no-progress."""
    from pathlib import Path

    p.add_argument("--batch-size", type=argtypes.positive_int, default=256, help=batch_help + " (default: %(default)s)")
    p.add_argument("--device", default="auto",
                   help="auto, cpu, cuda or cuda:N (under torchrun: cuda = one GPU per rank; default: %(default)s)")
    p.add_argument("--amp", choices=runtime.AMP_CHOICES, default="auto",
                   help="mixed precision: auto = bf16 (fp16 on GPUs without bf16) on CUDA, fp32 on CPU "
                        "(default: %(default)s)")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="decoded-image cache folder (default $DEEP_RANK_CACHE_DIR or ~/.cache/deep-ranking)")
    add_cache_budget_flag(p)
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")


def add_cache_budget_flag(p, default=None) -> None:
    """--cache-budget, the same for every program that decodes images."""
    p.add_argument("--cache-budget", type=image_cache.cache_budget_flag, default=default, metavar="SIZE",
                   help="bytes the decoded-image cache may hold (e.g. 20G; 0 = never cache; auto = half the "
                        f"disk's free space; default ${image_cache.BUDGET_ENV} or auto): over it, images are "
                        "decoded on the fly in worker processes")


class _StreamedBatches(torch.utils.data.Dataset):
    """Batch i of StreamedImages (uint8 [b,H,W,3]), decoded in a DataLoader worker process."""

    def __init__(self, images: image_cache.StreamedImages, batch_size: int):
        self.images, self.batch_size = images, batch_size

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def __getitem__(self, i: int) -> torch.Tensor:
        return torch.from_numpy(self.images[i * self.batch_size:(i + 1) * self.batch_size])


def _batches(images, batch_size: int, pin: bool) -> Iterable[torch.Tensor]:
    """uint8 CPU tensors [b,H,W,3]; the next batch is read (from a memmap) while this one computes.

    Streamed images (over the cache budget) are decoded by image_cache.loader_workers processes.
    """
    if isinstance(images, image_cache.StreamedImages):
        yield from torch.utils.data.DataLoader(_StreamedBatches(images, batch_size), batch_size=None,
                                               num_workers=image_cache.loader_workers(images, 0), pin_memory=pin,
                                               worker_init_fn=image_data.worker_signals)  # Ctrl-C: main only
        return
    starts = range(0, len(images), batch_size)

    def read(i: int) -> torch.Tensor:
        t = torch.from_numpy(np.array(images[i:i + batch_size]))  # a writable copy of the (read-only) cache rows
        return t.pin_memory() if pin else t

    with ThreadPoolExecutor(max_workers=1) as pool:
        pending = None
        for i in starts:
            nxt = pool.submit(read, i)
            if pending is not None:
                yield pending.result()
            pending = nxt
        if pending is not None:
            yield pending.result()


def embed_images(
    model: nn.Module,
    images,
    spec: Preprocessing | int,
    batch_size: int = 256,
    device=None,
    precision: runtime.Precision | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> np.ndarray:
    """Embed uint8 images [N,H,W,3] (array or memmap); returns float32 [N, D], unit rows.

    ``precision`` defaults to the --amp auto policy of the device. ``progress``: a bar (steady
    lines in a log file) and, after the first batches, the time the whole set will take.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = precision or runtime.resolve_precision(device, "auto")
    layout = runtime.memory_format(device)
    was_training = model.training
    model.eval()
    chunks = []
    # with progress: also, once the first batches are timed, how long all of them will take
    forecast = loop_forecast(desc, len(images), "img") if progress else None
    bar = cli.progress(total=len(images), desc=desc, unit="img", enabled=progress, forecast=forecast)
    with torch.inference_mode(), bar:
        for batch in _batches(images, batch_size, pin=device.type == "cuda"):
            x = preprocess(batch.to(device, non_blocking=True), spec, memory_format=layout)  # [b,3,S,S]
            with precision.autocast():
                emb = model(x)  # [b, D]
            chunks.append(F.normalize(emb.float(), dim=1).cpu())
            bar.update(len(batch))
    model.train(was_training)
    if not chunks:
        dim = getattr(model, "config", {}).get("embedding_dim", 0)
        return np.zeros((0, dim), dtype=np.float32)
    return torch.cat(chunks).numpy().astype(np.float32, copy=False)


def embed_paths(
    paths: Sequence[str],
    model: nn.Module,
    spec: Preprocessing,
    batch_size: int = 256,
    device=None,
    precision: runtime.Precision | None = None,
    cache_dir=None,
    progress: bool = True,
    cache_budget: int | str | None = None,
) -> np.ndarray:
    """Decode ``paths`` (through the cache, at ``spec.cache_size``) and embed them: float32 [N, D].

    ``cache_budget``: see image_cache.cache_images (None: $DEEP_RANK_CACHE_BUDGET or auto).
    ``spec.cache_size`` 0 (a version-1 checkpoint, which did not record it) chooses the size
    from the images, as version-1 code did.
    """
    paths = list(paths)
    cache_size = spec.cache_size or image_cache.choose_cache_size(paths, spec.image_size)
    images = image_cache.cache_images(paths, cache_size, cache_dir=cache_dir, progress=progress,
                                      budget=cache_budget)  # uint8 [N, c, c, 3]: a cache, or streamed
    emb = embed_images(model, images, spec, batch_size=batch_size, device=device, precision=precision,
                       progress=progress)  # [N, D]
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():  # no distance or file may carry them: every stage that embeds images comes here
        raise UserError(f"the model gives NaN or infinite embeddings for {int(bad.sum())} of {len(paths)} image(s), "
                        f"e.g. {paths[int(np.flatnonzero(bad)[0])]}: its weights or preprocessing record are damaged, "
                        f"or fp16 overflowed on the GPU (--amp off computes in fp32)")
    return emb
