"""Does online mining help? Mining none vs hard negatives (vs batch-hard, semi-hard) for the same wall-clock budget.

    python bench/bench_mining.py [--budget 60] [--modes none hard-negative] [--image-size 32]

On the bundled Fashion-MNIST sample written in TinyImageNet's layout
(make_sample_data.py + transform_validation.py: 600 train / 150 val images,
10 classes) it samples 2x2 training triplets (triplet_sampler.py) and 1x1 val
triplets, then trains train_net.py from scratch (resnet18, --weights none,
--train-from conv1, Adam) once per mining mode with ``--time-limit BUDGET``
(same seed, same data, same wall-clock budget). Each resulting checkpoint is
evaluated the same way: val triplet accuracy (D(q,p) < D(q,n) on the val
triplets) and precision@30 (each val image queries the 600 train images;
fraction of its 30 nearest sharing its class). An untrained network (same
seed) is the reference row. Prints a table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import Evaluator, latest_checkpoint, run  # also puts the repo on sys.path

from deepranking import argtypes, cli  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=argtypes.positive_float, default=60.0, help="training seconds per mode")
    p.add_argument("--modes", nargs="+", default=["none", "hard-negative"],
                   choices=["none", "batch-hard", "hard-negative", "semi-hard"], help="mining modes to compare")
    p.add_argument("--arch", default="resnet18", help="backbone architecture")
    p.add_argument("--image-size", type=argtypes.positive_int, default=32, help="training image size")
    p.add_argument("--embedding-dim", type=argtypes.positive_int, default=64, help="embedding size")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=25, help="triplets per step")
    p.add_argument("--lr", type=argtypes.positive_float, default=0.001, help="Adam learning rate")
    p.add_argument("--k", type=argtypes.positive_int, default=30, help="k of precision@k")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed (data sampling, init, order)")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the data and runs here (default: temporary)")
    return p


def prepare(root: Path, seed: int) -> tuple[Path, Path, Path]:
    """Sample data in TinyImageNet layout + train (2x2) and val (1x1) triplet CSVs."""
    data = root / "sample"
    run("make_sample_data.py", "--output", data, "--no-progress")
    run("transform_validation.py", "--data-dir", data)
    train_csv, val_csv = root / "train.csv", root / "val.csv"
    run("triplet_sampler.py", "--training", 1, "--data-dir", data, "--num_pos_images", 2, "--num_neg_images", 2,
        "--output", train_csv, "--seed", seed)
    run("triplet_sampler.py", "--training", 0, "--data-dir", data, "--num_pos_images", 1, "--num_neg_images", 1,
        "--output", val_csv, "--seed", seed)
    return data, train_csv, val_csv


def evaluate(evaluator: Evaluator, model, spec, val_csv: Path) -> dict:
    """Val triplet accuracy and precision@k (val images query the train images).

    ``spec``: the checkpoint's Preprocessing (or a bare image size for the untrained model).
    """
    import torch

    from deepranking import image_cache
    from deepranking import image_data
    from deepranking import retrieval

    spec = evaluator.spec(spec)
    q, p, n = image_data.read_triplet_csv(val_csv)
    uniq, inverse = np.unique(np.concatenate([q, p, n]).astype(str), return_inverse=True)
    paths = list(uniq)
    images = image_cache.cache_images(paths, spec.cache_size, progress=False)
    emb = torch.from_numpy(evaluator.embed(model, images, spec))[torch.from_numpy(inverse)].view(3, len(q), -1)
    acc = retrieval.triplet_accuracy(emb[0], emb[1], emb[2])
    return {"val_triplet_accuracy": float(acc), f"precision@{evaluator.k}": evaluator.model(model, spec)}


def main(args) -> None:
    import torch

    import deep_rank_net
    from deepranking import runtime
    from deepranking.checkpoint import load_checkpoint

    device = runtime.pick_device(args.device)
    with tempfile.TemporaryDirectory(prefix="bench_mining_") as tmp:
        root = args.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data, train_csv, val_csv = prepare(root, args.seed)
        evaluator = Evaluator(data, args.k, device)
        n_train = sum(1 for _ in open(train_csv)) - 1
        common = ["--triplets", train_csv, "--val-triplets", val_csv, "--arch", args.arch, "--weights", "none",
                  "--train-from", "conv1", "--image-size", args.image_size, "--embedding-dim", args.embedding_dim,
                  "--batch-size", args.batch_size, "--optim", "adam", "--lr", args.lr, "--epochs", 100000,
                  "--time-limit", args.budget, "--seed", args.seed, "--device", args.device, "--no-progress",
                  "--force"]
        rows = []
        runtime.seed_everything(args.seed)  # the untrained reference: train_net's init for this seed
        untrained = deep_rank_net.build_model(args.arch, args.embedding_dim, True, "none", "conv1").to(device)
        rows.append({"mode": "untrained", "steps": 0, "seconds": 0.0,
                     **evaluate(evaluator, untrained, args.image_size, val_csv)})
        for mode in args.modes:
            out = root / f"run_{mode}"
            t0 = time.perf_counter()
            run("train_net.py", *common, "--mining", mode, "--output-dir", out)
            seconds = time.perf_counter() - t0
            ckpt = load_checkpoint(latest_checkpoint(out))
            model, spec = deep_rank_net.model_from_checkpoint(ckpt, device)
            rows.append({"mode": mode, "steps": int(ckpt["step"]), "seconds": seconds,
                         **evaluate(evaluator, model, spec, val_csv)})
            print(f"  {mode}: {rows[-1]}", file=sys.stderr)
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.arch} from scratch, "
          f"{args.image_size} px, dim {args.embedding_dim}, batch {args.batch_size}, Adam lr {args.lr}, "
          f"{n_train} train triplets (2x2), budget {args.budget:g} s of training per mode (seconds below include "
          f"start-up and caching)")
    pk = f"precision@{args.k}"
    print(f"{'mining':<12} {'steps':>6} {'epochs':>7} {'seconds':>8} {'val triplet acc':>16} {pk:>14}")
    for r in rows:
        epochs = r["steps"] * args.batch_size / n_train
        print(f"{r['mode']:<12} {r['steps']:>6} {epochs:>7.2f} {r['seconds']:>8.1f} "
              f"{r['val_triplet_accuracy']:>16.4f} {r[pk]:>14.4f}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
