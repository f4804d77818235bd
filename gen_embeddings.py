"""Embed every train and val image once with a trained Deep Ranking net.

    python gen_embeddings.py            # = --model deepranknet.model --data-dir tiny-imagenet-200

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
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deep_rank_net import model_from_checkpoint
from deepranking import cli, distributed, embedding, runtime
from deepranking.checkpoint import FINAL_NAME, load_checkpoint
from deepranking.cli import UserError
from deepranking.embedding_io import write_embeddings
from deepranking.preprocessing import Preprocessing

SPLIT_OUTPUT = {"train": "train_output", "val": "test_output"}  # split -> args attribute


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=Path(FINAL_NAME),
                   help="checkpoint written by train_net.py (default: %(default)s, as the classic pipeline)")
    p.add_argument("--data-dir", type=Path, default=Path("tiny-imagenet-200"),
                   help="TinyImageNet root (train/ and val/) or a folder of class folders (train only; "
                        "default: %(default)s)")
    p.add_argument("--train-output", type=Path, default=Path("train_embedding.txt"),
                   help="embeddings of the train split (.txt CSV, or .npz/.npy binary)")
    p.add_argument("--test-output", type=Path, default=Path("test_embedding.txt"),
                   help="embeddings of the val split (the queries at evaluation)")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits to embed, from train,val (default: train,val; "
                        "val is skipped with a message when the dataset has none)")
    p.add_argument("--batch-size", type=cli.positive_int, default=256, help="images per forward pass")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (under torchrun: cuda = one GPU per rank)")
    p.add_argument("--amp", choices=runtime.AMP_CHOICES, default="auto",
                   help="mixed precision: auto = bf16 (fp16 on GPUs without bf16) on CUDA, fp32 on CPU")
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


def shard_file(output: Path, rank: int) -> Path:
    """Where rank ``rank`` leaves its shard: a hidden .npy beside the final output."""
    return output.parent / f".{output.name}.shard{rank}.npy"


# ----------------------------------------------------------------------------
# Work
# ----------------------------------------------------------------------------


def embed_shard(paths: list[str], model, spec: Preprocessing, args, device, env: distributed.DistEnv,
                progress: bool) -> tuple[np.ndarray, float]:
    """Decode (through the cache) and embed this rank's images: (float32 [N, D], seconds embedding)."""
    if not paths:
        return np.zeros((0, model.config["embedding_dim"]), dtype=np.float32), 0.0
    precision = runtime.resolve_precision(device, args.amp)
    start = time.perf_counter()
    emb = embedding.embed_paths(paths, model, spec, batch_size=args.batch_size, device=device,
                                precision=precision, cache_dir=args.cache_dir, progress=progress)
    return emb, time.perf_counter() - start


def merge_shards(job: SplitJob, world_size: int) -> np.ndarray:
    """Rank 0: the shards of every rank, concatenated in rank (= original) order."""
    parts = [np.load(shard_file(job.output, r), allow_pickle=False) for r in range(world_size)]
    emb = np.concatenate(parts)
    if len(emb) != len(job.paths):
        raise UserError(f"merged {len(emb)} embeddings for {len(job.paths)} images of {job.split}")
    return emb


def run_job(job: SplitJob, model, spec: Preprocessing, args, device, env: distributed.DistEnv) -> tuple[int, float]:
    """Embed one split (this rank's shard) and write its file; returns (images embedded here, seconds)."""
    progress = not args.no_progress and env.main
    bounds = distributed.shard_bounds(len(job.paths), env.world_size)
    lo, hi = bounds[env.rank], bounds[env.rank + 1]

    def work():
        emb, seconds = embed_shard(job.paths[lo:hi], model, spec, args, device, env, progress)
        if env.active:
            with cli.atomic_path(shard_file(job.output, env.rank), suffix=".npy") as tmp:
                with open(tmp, "wb") as f:
                    np.save(f, emb)
        return emb, seconds

    emb, seconds = distributed.run_agreed(env, work)
    if env.active:
        try:
            if env.main:
                emb = merge_shards(job, env.world_size)
        finally:
            distributed.barrier(env)  # every shard is read before any is removed
            if env.main:
                for r in range(env.world_size):
                    shard_file(job.output, r).unlink(missing_ok=True)
    if env.main:
        write_embeddings(job.output, job.paths, job.labels, emb, progress=progress)
        print(f"wrote {job.output}: {len(job.paths)} {job.split} images x {emb.shape[1]} dims", file=sys.stderr)
    return hi - lo, seconds


def main(args) -> None:
    cli.seed_everything(args.seed)
    env = distributed.from_env()
    device = distributed.rank_device(args.device, env)
    # Every check happens on every rank before the process group exists: a bad input
    # stops all ranks with the same message instead of leaving some at a barrier.
    ckpt = load_checkpoint(args.model)
    jobs = plan_jobs(args)
    model, spec = model_from_checkpoint(ckpt, device)
    del ckpt
    with distributed.session(env, device):
        embedded, seconds = 0, 0.0
        for job in jobs:
            n, s = run_job(job, model, spec, args, device, env)
            embedded, seconds = embedded + n, seconds + s
        report_throughput(embedded, seconds, device, env)


def report_throughput(embedded: int, seconds: float, device, env: distributed.DistEnv) -> None:
    """Print images/s of the embedding step (all ranks together: total images / slowest rank)."""
    stats = distributed.all_gather(env, (embedded, seconds))
    total, slowest = sum(s[0] for s in stats), max(s[1] for s in stats)
    if env.main:
        rate = total / slowest if slowest > 0 else float("nan")
        where = f"{env.world_size} x {device.type}" if env.active else str(device)
        print(f"embedded {total} images in {slowest:.2f} s: {rate:.1f} images/s on {where}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
