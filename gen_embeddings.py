"""Embed every train and val image once with a trained Deep Ranking net.

    python gen_embeddings.py            # = --model deepranknet.model --data-dir tiny-imagenet-200

writes ``train_embedding.txt`` (the database: every train image) and
``test_embedding.txt`` (the queries: every val image), one row per image:
``path,label,e0,...`` with ``path`` relative to the file's folder and ``label``
the class name (see embedding_io.py; ``.npz``/``.npy`` names select binary files).

Unlike the classic script, which embedded a query image once per triplet row and
dropped the last partial batch, each image is decoded once (image_cache) and
embedded once, in batches. A plain folder of class folders has only a train split.

The outputs are written as a pair: both to temporary names, then renamed together
(Ctrl-C held), so an interrupted run leaves the earlier pair intact. Each file records
the model's fingerprint and its images' sizes and times (``<file>.meta.json``, inside
``.npz``): eval.py and query.py refuse files of different models, and
update_database.py re-embeds only what changed.

Rows are written as they are computed (deepranking/database.py): memory holds a batch,
not the collection. ``--shard-rows N`` writes each output as a database folder
(``manifest.json`` + ``shard-*.npy`` of at most N rows + their ``path,label`` rows) for
collections too large for one file; every reader takes either form.

Several GPUs (or CPU processes): ``torchrun --nproc_per_node N gen_embeddings.py ...``
gives each rank a contiguous range of the image list, which it writes itself (its own
shards, or its part of the file); nothing gathers the embeddings, and the output is the
same as a single-process run.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deep_rank_net import model_from_checkpoint
from deepranking import argtypes, cli, database, distributed, embedding, runtime
from deepranking.checkpoint import FINAL_NAME, load_checkpoint, model_fingerprint, newest_epoch_checkpoint
from deepranking.cli import UserError
from deepranking.embedding_io import files_of
from deepranking.preprocessing import Preprocessing
from deepranking.reference_features import FEATURE_KINDS, feature_record, reference_features

DEFAULT_DATA_DIR = Path("tiny-imagenet-200")
SPLIT_OUTPUT = {"train": "train_output", "val": "test_output"}  # split -> args attribute


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, default=None,
                   help=f"checkpoint written by train_net.py (default: {FINAL_NAME}, as the classic pipeline)")
    p.add_argument("--features", choices=FEATURE_KINDS, default="model",
                   help="model (default): the --model checkpoint; reference rows with no training: pixels "
                        "(the image at --image-size, default 32, raw RGB flattened) or backbone (--arch's "
                        "pooled backbone features with --weights, at --image-size, default its weights' side, "
                        "224 for most); "
                        "every row L2-normalised")
    p.add_argument("--arch", default=None,
                   help="--features backbone: any torchvision classification model (default resnet18; "
                        "convnext_tiny, efficientnet_b0, vit_b_16, ...), timm:<name> (pip install timm), or "
                        "small-cnn with --weights PATH|none (it has no ImageNet weights)")
    p.add_argument("--weights", default=None,
                   help="--features backbone: imagenet (default), none (random, seeded) or PATH (a state dict "
                        "of the backbone, or a deep-ranking checkpoint's backbone)")
    p.add_argument("--image-size", type=argtypes.positive_int, default=None,
                   help="--features pixels|backbone: the side the features see (default 32 | the side of "
                        "the backbone's weights, 224 for most)")
    p.add_argument("--cache-size", type=argtypes.positive_int, default=None,
                   help="--features pixels|backbone: the decoded-image cache side (default: --image-size)")
    p.add_argument("--data-dir", type=Path, default=DEFAULT_DATA_DIR,
                   help="TinyImageNet root (train/ and val/) or a folder of class folders (train only; "
                        "default: %(default)s)")
    p.add_argument("--train-output", type=Path, default=Path("train_embedding.txt"),
                   help="embeddings of the train split, the database (.txt CSV, or .npz/.npy binary; "
                        "default: %(default)s)")
    p.add_argument("--test-output", type=Path, default=Path("test_embedding.txt"),
                   help="embeddings of the val split, the queries at evaluation (default: %(default)s)")
    p.add_argument("--splits", default=None,
                   help="comma-separated splits to embed, from train,val (default: train,val; "
                        "val is skipped with a message when the dataset has none)")
    p.add_argument("--shard-rows", type=argtypes.positive_int, default=None, metavar="N",
                   help="write each output as a database folder of shards of at most N rows (manifest.json, "
                        "shard-*.npy, shard-*.rows.csv) instead of one file: for collections too large for one")
    embedding.add_embedding_flags(p)
    p.add_argument("--force", action="store_true", help="overwrite existing output files")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed (embedding is deterministic; kept for uniformity)")
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
    root: Path | None = None  # the split's class folder (recorded for update_database.py)
    # int64 [N, 2] (size, mtime_ns) per image, taken BEFORE it is decoded: an image replaced while the
    # run embeds it then looks changed to update_database.py, instead of its old vector looking current
    stamps: np.ndarray | None = None


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
    from deepranking.image_data import image_stamps, list_class_folder, resolve_split_dir

    splits, val_optional = parse_splits(args.splits)
    if not args.data_dir.is_dir():
        what = "is a file, not a folder" if args.data_dir.exists() else "not found"
        default = (" (the default --data-dir: pass --data-dir DATA, a folder of class folders or a TinyImageNet root)"
                   if args.data_dir == DEFAULT_DATA_DIR else "")
        raise UserError(f"dataset folder {what}: {args.data_dir}{default}")
    outputs = {s: Path(getattr(args, SPLIT_OUTPUT[s])) for s in splits}
    if len(splits) == 2:  # the same file, or a companion (.meta.json, .meta.csv) of one the other's data file
        train_files = {p.resolve() for p in files_of(outputs["train"])}
        shared = [p for p in files_of(outputs["val"]) if p.resolve() in train_files]
        if shared and outputs["train"].resolve() == outputs["val"].resolve():
            raise UserError(f"--train-output and --test-output are the same file: {outputs['train']}")
        if shared:
            raise UserError(f"--train-output {outputs['train']} and --test-output {outputs['val']} would both "
                            f"write {shared[0]}: choose names that do not share files")
    jobs = []
    for split in splits:
        if split == "val" and val_optional and not (args.data_dir / "val").is_dir():
            older = (f"; the older {outputs['val']} there is left as it is, and eval.py will not pair it with "
                     f"this {outputs['train']}") if outputs["val"].exists() and "train" in outputs else ""
            print(f"no val split in {args.data_dir} (a plain class folder is the train split): "
                  f"not writing {outputs['val']}{older}", file=sys.stderr)
            continue
        database.check_output(outputs[split], args.force, f"{split} embeddings output", args.shard_rows is not None)
        images = list_class_folder(resolve_split_dir(args.data_dir, split))
        jobs.append(SplitJob(split, outputs[split], list(images.paths), images.label_names,
                             resolve_split_dir(args.data_dir, split).resolve(), image_stamps(images.paths)))
    return jobs


# ----------------------------------------------------------------------------
# Features: a trained model, or a reference row that needs no training
# ----------------------------------------------------------------------------


def default_model() -> Path:
    """The default --model, FINAL_NAME in the current folder, or one line naming the flag to pass
    (and the FINAL_NAME files one or two folders down: train_net.py writes it in --output-dir)."""
    path = Path(FINAL_NAME)
    if path.exists() or newest_epoch_checkpoint(path.parent) is not None:  # load_checkpoint explains the latter
        return path
    found = sorted(Path().glob(f"*/{FINAL_NAME}")) + sorted(Path().glob(f"*/*/{FINAL_NAME}"))
    seen = f"; found {', '.join(map(str, found[:3]))}{' ...' if len(found) > 3 else ''}" if found else ""
    raise UserError(f"no {FINAL_NAME} in the current folder (the default --model{seen}): pass --model PATH, "
                    f"the checkpoint train_net.py wrote in its --output-dir")


def _rounded(values) -> str:
    return "(" + ", ".join(f"{v:.3g}" for v in values) + ")"


def load_features(args, device, env: distributed.DistEnv):
    """(model in eval mode, its Preprocessing, its fingerprint on rank 0 / None) for ``--features``.

    model: the checkpoint's net and preprocessing. pixels: the image at ``--image-size``
    (default PIXEL_SIZE = 32) from a ``--cache-size`` cache (default: the image size), raw
    0..255 RGB values flattened. backbone: ``--arch``'s pooled backbone features with
    ``--weights imagenet|PATH|none`` at ``--image-size`` (default: the side of its pretrained
    weights, 224 for most), normalised with their mean and std. embed_images L2-normalises every row. A reference row's preprocessing is
    explicit and recorded in its fingerprint exactly as a checkpoint's (plus "features").
    """
    reference_flags = [flag for flag, value in (("--arch", args.arch), ("--weights", args.weights),
                                                ("--image-size", args.image_size),
                                                ("--cache-size", args.cache_size)) if value is not None]
    if args.features == "model":
        if reference_flags:
            raise UserError(f"{', '.join(reference_flags)} go with --features pixels or backbone; --features "
                            f"model uses the checkpoint's own architecture and preprocessing")
        path = args.model if args.model is not None else default_model()
        ckpt = load_checkpoint(path)
        model, spec = model_from_checkpoint(ckpt, device)
        fingerprint = model_fingerprint(ckpt, spec.to_dict(), path) if env.main else None
        if args.model is None and env.main:  # a file nobody named: say which one, and how old
            saved = time.strftime("%Y-%m-%d %H:%M", time.localtime(path.stat().st_mtime))
            print(f"model: {path} (the default --model; step {ckpt.get('step')}, saved {saved})", file=sys.stderr)
        return model, spec, fingerprint
    if args.model is not None:
        raise UserError(f"--model goes with --features model; --features {args.features} needs no checkpoint")
    if args.features == "pixels" and (args.arch is not None or args.weights is not None):
        raise UserError("--arch and --weights go with --features backbone; --features pixels has no network")
    model, spec = reference_features(args.features, args.arch or "resnet18", args.weights or "imagenet",
                                     args.image_size, args.cache_size, device)
    fingerprint = None
    if env.main:
        fingerprint = {**model_fingerprint(feature_record(model, spec), spec.to_dict()), "features": dict(model.config)}
        what = ("raw pixels (0..255 RGB, flattened)" if args.features == "pixels" else
                f"{model.config['arch']} pooled features (weights {model.config['weights']}, "
                f"mean {_rounded(spec.mean)}, std {_rounded(spec.std)})")
        print(f"features: {what}, {spec.image_size} px images from a {spec.cache_size} px cache, "
              f"{model.config['embedding_dim']} dims, L2-normalised", file=sys.stderr)
    return model, spec, fingerprint


# ----------------------------------------------------------------------------
# Work
# ----------------------------------------------------------------------------


def run_job(job: SplitJob, out: database.Output, model, spec: Preprocessing, args, device,
            env: distributed.DistEnv) -> tuple[int, float]:
    """Embed this rank's range of one split, writing its rows as they come (``out.writer``); returns
    (images embedded here, seconds). The output is put in place by write_outputs, every split at once."""
    progress = not args.no_progress and env.main
    bounds = out.bounds()
    lo, hi = bounds[env.rank], bounds[env.rank + 1]

    def work() -> float:
        start = time.perf_counter()
        precision = runtime.resolve_precision(device, args.amp)
        with out.writer(env.rank) as writer:
            for block in embedding.embed_path_batches(job.paths[lo:hi], model, spec, batch_size=args.batch_size,
                                                      device=device, precision=precision, cache_dir=args.cache_dir,
                                                      progress=progress, cache_budget=args.cache_budget):
                writer.write(block)
        return time.perf_counter() - start

    return hi - lo, distributed.run_agreed(env, work)


def plan_outputs(jobs: list[SplitJob], model, fingerprint: dict | None, args,
                 env: distributed.DistEnv) -> list[database.Output]:
    """Where each split's rows go: one file, or (--shard-rows) a database folder; each rank its own range."""
    return [database.Output(job.output, job.paths, job.labels, model.config["embedding_dim"], model=fingerprint,
                            images={"root": str(job.root), "stamps": job.stamps}, shard_rows=args.shard_rows,
                            world_size=env.world_size) for job in jobs]


def write_outputs(jobs: list[SplitJob], outputs: list[database.Output], progress: bool) -> None:
    """Put every split's output in place as one unit: all to temporary names, then all renamed (Ctrl-C held).

    Interrupted before the renames, the earlier files stay as they were — never a new train
    file beside an old test file. Each file records the model's fingerprint, so the only gap
    left (a kill -9 within the microseconds of the renames) is caught by eval.py's model check.
    """
    database.commit(outputs, progress=progress)
    for job, out in zip(jobs, outputs):
        print(f"wrote {job.output}: {len(job.paths)} {job.split} images x {out.dim} dims", file=sys.stderr)


def main(args) -> None:
    runtime.seed_everything(args.seed)
    env = distributed.from_env()
    device = distributed.rank_device(args.device, env)
    # Every check happens on every rank before the process group exists: a bad input
    # stops all ranks with the same message instead of leaving some at a barrier.
    model, spec, fingerprint = load_features(args, device, env)
    jobs = plan_jobs(args)
    outputs = plan_outputs(jobs, model, fingerprint, args, env)
    with distributed.session(env, device):
        embedded, seconds = 0, 0.0
        try:
            for job, out in zip(jobs, outputs):
                n, s = run_job(job, out, model, spec, args, device, env)
                embedded, seconds = embedded + n, seconds + s
        except BaseException:
            if env.main:  # every rank has stopped writing (run_agreed): what this run wrote goes
                database.discard(outputs)
            raise
        if env.main:
            write_outputs(jobs, outputs, progress=not args.no_progress)
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
