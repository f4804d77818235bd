"""Images -> embeddings, the same way in every stage (validation, gen_embeddings, query, get_distance).

``embed_paths`` decodes through the image cache at the checkpoint's ``cache_size`` and
``embed_images`` runs the net on the device with the checkpoint's preprocessing, so an
image gives the same vector wherever it is embedded.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Iterable, Iterator, Sequence

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


def embed_batches(
    model: nn.Module,
    images,
    spec: Preprocessing | int,
    batch_size: int = 256,
    device=None,
    precision: runtime.Precision | None = None,
    progress: bool = True,
    desc: str = "embedding",
) -> Iterator[np.ndarray]:
    """Embed uint8 images [N,H,W,3] (array, memmap or StreamedImages) one batch at a time: float32
    [b, D] unit rows, in order, so a caller can write them out as they come (database.Output).

    ``precision`` defaults to the --amp auto policy of the device. ``progress``: a bar (steady
    lines in a log file) and, after the first batches, the time the whole set will take.
    """
    device = torch.device(device) if device is not None else next(model.parameters()).device
    precision = precision or runtime.resolve_precision(device, "auto")
    layout = runtime.memory_format(device)
    was_training = model.training
    model.eval()
    # with progress: also, once the first batches are timed, how long all of them will take
    forecast = loop_forecast(desc, len(images), "img") if progress else None
    bar = cli.progress(total=len(images), desc=desc, unit="img", enabled=progress, forecast=forecast)
    try:
        with bar:
            for batch in _batches(images, batch_size, pin=device.type == "cuda"):
                with torch.inference_mode():  # not held across the yield: the caller's code runs outside it
                    x = preprocess(batch.to(device, non_blocking=True), spec, memory_format=layout)  # [b,3,S,S]
                    with precision.autocast():
                        emb = model(x)  # [b, D]
                    rows = F.normalize(emb.float(), dim=1).cpu().numpy()
                bar.update(len(batch))
                yield rows
    finally:
        model.train(was_training)


def embed_images(model: nn.Module, images, spec: Preprocessing | int, **kwargs) -> np.ndarray:
    """Embed uint8 images [N,H,W,3] (array or memmap); returns float32 [N, D], unit rows
    (:func:`embed_batches`, joined; ``kwargs`` are its keyword arguments)."""
    return _joined(list(embed_batches(model, images, spec, **kwargs)), model)


def _joined(chunks: list[np.ndarray], model: nn.Module) -> np.ndarray:
    """Batches of rows as one float32 [N, D] array ([0, D] when there are none)."""
    if not chunks:
        return np.zeros((0, getattr(model, "config", {}).get("embedding_dim", 0)), dtype=np.float32)
    return np.concatenate(chunks).astype(np.float32, copy=False)


def _images_of(paths: list[str], spec: Preprocessing, cache_dir, progress: bool, cache_budget):
    """The decoded images of ``paths`` at ``spec.cache_size``: a cache entry, or StreamedImages over the budget.

    ``spec.cache_size`` 0 (a version-1 checkpoint, which did not record it) chooses the size
    from the images, as version-1 code did.
    """
    cache_size = spec.cache_size or image_cache.choose_cache_size(paths, spec.image_size)
    return image_cache.cache_images(paths, cache_size, cache_dir=cache_dir, progress=progress,
                                    budget=cache_budget)  # uint8 [N, c, c, 3]: a cache, or streamed


def _refuse_non_finite(emb: np.ndarray, paths: Sequence[str], of: str = "") -> None:
    """No distance or file may carry NaN or infinity: every stage that embeds images comes here."""
    bad = ~np.isfinite(emb).all(axis=1)
    if bad.any():
        raise UserError(f"the model gives NaN or infinite embeddings for {int(bad.sum())} of {len(paths)} "
                        f"image(s){of}, e.g. {paths[int(np.flatnonzero(bad)[0])]}: its weights or preprocessing "
                        f"record are damaged, or fp16 overflowed on the GPU (--amp off computes in fp32)")


def embed_paths(paths: Sequence[str], model: nn.Module, spec: Preprocessing, **kwargs) -> np.ndarray:
    """Decode ``paths`` (through the cache, at ``spec.cache_size``) and embed them: float32 [N, D]
    (:func:`embed_path_batches`, joined; ``kwargs`` are its keyword arguments)."""
    return _joined(list(embed_path_batches(paths, model, spec, **kwargs)), model)


def embed_path_batches(
    paths: Sequence[str],
    model: nn.Module,
    spec: Preprocessing,
    batch_size: int = 256,
    device=None,
    precision: runtime.Precision | None = None,
    cache_dir=None,
    progress: bool = True,
    cache_budget: int | str | None = None,
) -> Iterator[np.ndarray]:
    """Decode ``paths`` (through the cache, at ``spec.cache_size``) and embed them one batch at a time:
    float32 [b, D] each, in order, so memory holds a batch whatever the number of images. A batch with
    NaN or infinity stops it (UserError).

    ``cache_budget``: see image_cache.cache_images (None: $DEEP_RANK_CACHE_BUDGET or auto).
    """
    paths = list(paths)
    if not paths:
        return
    images = _images_of(paths, spec, cache_dir, progress, cache_budget)
    start = 0
    for emb in embed_batches(model, images, spec, batch_size=batch_size, device=device, precision=precision,
                             progress=progress):
        _refuse_non_finite(emb, paths[start:start + len(emb)], of=f" of one batch (rows {start + 1}-{start + len(emb)})")
        start += len(emb)
        yield emb
