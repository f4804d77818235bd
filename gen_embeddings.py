"""Embed every train and val image once with a trained Deep Ranking net.

    python gen_embeddings.py --model runs/deepranknet.model --data-dir tiny-imagenet-200

writes ``train_embedding.txt`` (the database: every train image) and
``test_embedding.txt`` (the queries: every val image), one row per image:
``path,label,e0,...`` with ``path`` relative to the file's folder and ``label``
the class name (see embedding_io.py; ``.npz``/``.npy`` names select binary files).

Unlike the classic script, which embedded a query image once per triplet row and
dropped the last partial batch, each image is decoded once (image_cache) and
embedded once, in batches. A plain folder of class folders has only a train split.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node N gen_embeddings.py ...``
gives each rank a contiguous shard of the image list; rank 0 merges the shards in
the original order, so the output is the same as a single-process run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepranking import cli
from deepranking.cli import UserError

SPLIT_OUTPUT = {"train": "train_output", "val": "test_output"}  # split -> args attribute


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="checkpoint written by train_net.py")
    p.add_argument("--data-dir", type=Path, required=True,
                   help="TinyImageNet root (train/ and val/) or a folder of class folders (train only)")
    p.add_argument("--train-output", type=Path, default=Path("train_embedding.txt"),
                   help="embeddings of the train split (.txt CSV, or .npz/.npy binary)")
    p.add_argument("--test-output", type=Path, default=Path("test_embedding.txt"),
                   help="embeddings of the val split (the queries at evaluation)")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits to embed, from train,val (default: train,val; "
                        "val is skipped with a message when the dataset has none)")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda = one GPU per rank)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast: auto = on for CUDA, off for CPU")
    p.add_argument("--cache-dir", type=Path, default=None,
                   help="decoded-image cache folder (default $DEEP_RANK_CACHE_DIR or ~/.cache/deep-ranking)")
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--seed", type=int, default=0, help="seed (embedding is deterministic; kept for uniformity)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    return p


# ----------------------------------------------------------------------------
# Planning (pure checks, before any work)
# ----------------------------------------------------------------------------


@dataclass
class SplitJob:
    split: str
    output: Path
    paths: list[str]
    labels: list[str]  # class names


def parse_splits(text: str | None) -> tuple[list[str], bool]:
    """``--splits`` -> (splits, val_optional). The default makes a missing val split a skip, not an error."""
    if text is None:
        return ["train", "val"], True
    splits = [s.strip() for s in text.split(",") if s.strip()]
    bad = [s for s in splits if s not in SPLIT_OUTPUT]
    if bad or not splits:
        raise UserError(f"--splits must be a comma-separated subset of train,val; got {text!r}")
    return list(dict.fromkeys(splits)), False


def plan_jobs(args) -> list[SplitJob]:
    """List every split to embed and check every output path; raises UserError before any work."""
    from deepranking.image_data import list_class_folder, resolve_split_dir

    splits, val_optional = parse_splits(args.splits)
    if not args.data_dir.is_dir():
        raise UserError(f"dataset folder not found: {args.data_dir}")
    outputs = {s: Path(getattr(args, SPLIT_OUTPUT[s])) for s in splits}
    if len(splits) == 2 and outputs["train"].resolve() == outputs["val"].resolve():
        raise UserError(f"--train-output and --test-output are the same file: {outputs['train']}")
    jobs = []
    for split in splits:
        if split == "val" and val_optional and not (args.data_dir / "val").is_dir():
            print(f"no val split in {args.data_dir} (a plain class folder is the train split): "
                  f"not writing {outputs['val']}", file=sys.stderr)
            continue
        cli.check_output_path(outputs[split], args.force, f"{split} embeddings output")
        images = list_class_folder(resolve_split_dir(args.data_dir, split))
        jobs.append(SplitJob(split, outputs[split], list(images.paths), images.label_names))
    return jobs


def shard_bounds(n: int, world_size: int) -> list[int]:
    """Contiguous shard boundaries: rank r embeds [b[r], b[r+1]) of n items."""
    return [n * r // world_size for r in range(world_size + 1)]


def shard_file(output: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves its shard: a hidden .npy beside the final output."""
    return output.parent / f".{output.name}.shard{rank}.npy"


# ----------------------------------------------------------------------------
# Distributed plumbing
# ----------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1

    @property
    def active(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def dist_from_env() -> Dist:
    """RANK/WORLD_SIZE set by torchrun (absent: one process)."""
    try:
        return Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError("RANK and WORLD_SIZE must be integers")


def init_distributed(dist_info: Dist, device):
    """Start the process group: NCCL for CUDA, gloo for CPU."""
    import torch
    import torch.distributed as dist

    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend=backend, rank=dist_info.rank, world_size=dist_info.world_size)


def pick_rank_device(name: str, dist_info: Dist):
    """--device resolved for this rank: under torchrun, CUDA means GPU LOCAL_RANK."""
    import torch

    device = cli.pick_device(name)
    if dist_info.active and device.type == "cuda" and device.index is None:
        local = int(os.environ.get("LOCAL_RANK", dist_info.rank))
        if local >= torch.cuda.device_count():
            raise UserError(f"rank {dist_info.rank} needs GPU {local} but only {torch.cuda.device_count()} are visible")
        device = torch.device("cuda", local)
    return device


def agree_on_errors(dist_info: Dist, error: str | None) -> None:
    """Every rank learns whether any rank failed, so none waits forever at a barrier.

    Rank 0 raises the first error as a UserError; the other ranks exit quietly with status 2.
    """
    if not dist_info.active:
        if error is not None:
            raise UserError(error)
        return
    import torch.distributed as dist

    errors: list = [None] * dist_info.world_size
    dist.all_gather_object(errors, error)
    first = next((e for e in errors if e is not None), None)
    if first is None:
        return
    if dist_info.main:
        raise UserError(first)
    raise SystemExit(cli.EXIT_USER_ERROR)


# ----------------------------------------------------------------------------
# Work
# ----------------------------------------------------------------------------


def embed_paths(paths: list[str], model, image_size: int, args, device, progress: bool) -> tuple[np.ndarray, float]:
    """Decode (cached) and embed ``paths``; returns (float32 [N, D], seconds spent embedding)."""
    from deep_rank_net import embed_images
    from deepranking.image_cache import cache_images, choose_cache_size

    if not paths:
        dim = model.config["embedding_dim"]
        return np.zeros((0, dim), dtype=np.float32), 0.0
    images = cache_images(paths, choose_cache_size(paths, image_size), cache_dir=args.cache_dir,
                          progress=progress)  # uint8 [N, s, s, 3]
    amp = {"auto": None, "on": True, "off": False}[args.amp]
    start = time.perf_counter()
    emb = embed_images(model, images, image_size, batch_size=args.batch_size, device=device, amp=amp,
                       progress=progress)
    return emb, time.perf_counter() - start


def merge_shards(job: SplitJob, world_size: int) -> np.ndarray:
    """Rank 0: the shards of every rank, concatenated in rank (= original) order."""
    parts = [np.load(shard_file(job.output, r), allow_pickle=False) for r in range(world_size)]
    emb = np.concatenate(parts)
    if len(emb) != len(job.paths):
        raise UserError(f"merged {len(emb)} embeddings for {len(job.paths)} images of {job.split}")
    return emb


def run_job(job: SplitJob, model, image_size: int, args, device, dist_info: Dist) -> tuple[int, float]:
    """Embed one split (this rank's shard) and write its file; returns (images embedded here, seconds)."""
    from deepranking.embedding_io import write_embeddings

    progress = not args.no_progress and dist_info.main
    bounds = shard_bounds(len(job.paths), dist_info.world_size)
    lo, hi = bounds[dist_info.rank], bounds[dist_info.rank + 1]
    error, emb, seconds = None, None, 0.0
    try:
        emb, seconds = embed_paths(job.paths[lo:hi], model, image_size, args, device, progress)
        if dist_info.active:
            with cli.atomic_path(shard_file(job.output, dist_info.rank), suffix=".npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, emb)
    except UserError as exc:
        error = str(exc)
    agree_on_errors(dist_info, error)
    if dist_info.active:
        import torch.distributed as dist

        try:
            if dist_info.main:
                emb = merge_shards(job, dist_info.world_size)
        finally:
            dist.barrier()  # every shard is read before any is removed
            if dist_info.main:
                for r in range(dist_info.world_size):
                    shard_file(job.output, r).unlink(missing_ok=True)
    if dist_info.main:
        write_embeddings(job.output, job.paths, job.labels, emb, progress=progress)
        print(f"wrote {job.output}: {len(job.paths)} {job.split} images x {emb.shape[1]} dims", file=sys.stderr)
    return hi - lo, seconds


def main(args) -> None:
    from deep_rank_net import load_checkpoint, model_from_checkpoint

    cli.seed_everything(args.seed)
    dist_info = dist_from_env()
    device = pick_rank_device(args.device, dist_info)
    # Every check happens on every rank before the process group exists: a bad input
    # stops all ranks with the same message instead of leaving some at a barrier.
    ckpt = load_checkpoint(args.model, map_location="cpu")
    jobs = plan_jobs(args)
    model, image_size = model_from_checkpoint(ckpt, device)
    del ckpt
    if dist_info.active:
        init_distributed(dist_info, device)
    try:
        embedded, seconds = 0, 0.0
        for job in jobs:
            n, s = run_job(job, model, image_size, args, device, dist_info)
            embedded, seconds = embedded + n, seconds + s
        report_throughput(embedded, seconds, device, dist_info)
    finally:
        if dist_info.active:
            import torch.distributed as dist

            dist.destroy_process_group()


def report_throughput(embedded: int, seconds: float, device, dist_info: Dist) -> None:
    """Print images/s of the embedding step (all ranks together: total images / slowest rank)."""
    total, slowest = embedded, seconds
    if dist_info.active:
        import torch.distributed as dist

        stats: list = [None] * dist_info.world_size
        dist.all_gather_object(stats, (embedded, seconds))
        total, slowest = sum(s[0] for s in stats), max(s[1] for s in stats)
    if dist_info.main:
        rate = total / slowest if slowest > 0 else float("nan")
        where = f"{dist_info.world_size} x {device.type}" if dist_info.active else str(device)
        print(f"embedded {total} images in {slowest:.2f} s: {rate:.1f} images/s on {where}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
