"""Time to quality: test precision@30 against training wall-clock, classic recipe vs ours.

    python bench/bench_time_to_quality.py [--budget 600] [--eval-at 60,150,300,600] [--recipes classic ours]

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``--source``), written
by make_sample_data.py in TinyImageNet's layout at 64 px (``--train-per-class``
500 + ``--val-per-class`` 100 images of each of the 10 classes), 1x1 triplets from
triplet_sampler.py. Both recipes train resnet18 from scratch (``--weights none``,
every layer trained) on the same triplet CSV, on the CPU unless ``--device``:

* classic — the classic loop: uniform random triplets as sampled, each image
  decoded by PIL and resized to 224 px every step, three separate forward passes,
  SGD + Nesterov lr 0.001, margin 1.0, batch 25, 4096-d (bench_train.classic_step_fn).
* ours — ``train_net.py`` with OUR_RECIPE below (32 px, one batched forward,
  decoded-image cache, batch-hard mining + class loss, Adam), run in segments with
  ``--time-limit`` + ``--resume`` so it can be evaluated at each ``--eval-at`` time.

At each ``--eval-at`` second of training time (evaluation not counted) the
model embeds every val image (queries) and every train image (database) and
test precision@30 is computed exactly as eval.py does (retrieval.precision_at_k).
Raw pixels (the 64 px images flattened, unit-normalised) are the reference row.
Prints a table, writes ``time_to_quality.json`` and ``time_to_quality.png``
(precision@30 vs seconds) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import Evaluator, comma_list, fashion_mnist, latest_checkpoint, run  # also puts the repo on sys.path

import cli_utils  # noqa: E402

# Our CPU recipe: what the measurements below found fastest to reach high precision.
OUR_RECIPE = [
    "--arch", "resnet18", "--weights", "none", "--train-from", "conv1",
    "--image-size", "32",  # Fashion-MNIST is 28 px: 32 px costs 1/49 of 224 px per image
    "--embedding-dim", "128",  # plenty for 10 classes
    "--batch-size", "32",  # 96 images per step: more steps beat bigger batches early on
    "--optim", "adam", "--lr", "0.001",  # from scratch, Adam beats SGD at this budget
    "--mining", "batch-hard",  # every image an anchor with its hardest positive and negative
    "--margin", "0.2",  # a margin of 1.0 with hard mining collapses from scratch
    "--id-loss-weight", "1.0",  # class loss next to the ranking loss: P@30 0.763 vs 0.731 without, after 180 s
]
CLASSIC = dict(arch="resnet18", image_size=224, embedding_dim=4096, batch_size=25, lr=0.001, margin=1.0)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=cli_utils.positive_float, default=600.0, help="training seconds per recipe")
    p.add_argument("--eval-at", type=comma_list(cli_utils.positive_float), default="60,150,300,600",
                   help="comma-separated training seconds at which to evaluate (capped at --budget)")
    p.add_argument("--recipes", nargs="+", default=["classic", "ours"], choices=["classic", "ours"],
                   help="recipes to run")
    p.add_argument("--source", default="debian", help="make_sample_data.py --source (debian or bundled)")
    p.add_argument("--train-per-class", type=cli_utils.positive_int, default=500, help="train images per class")
    p.add_argument("--val-per-class", type=cli_utils.positive_int, default=100, help="val images per class")
    p.add_argument("--ours", default="", help="extra train_net.py flags appended to OUR_RECIPE (quoted string)")
    p.add_argument("--k", type=cli_utils.positive_int, default=30, help="k of precision@k")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of data, triplets, init and order")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: temporary)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/time_to_quality"),
                   help="where the table (json) and plot go")
    return p


def prepare(root: Path, args) -> tuple[Path, Path]:
    """Fashion-MNIST in TinyImageNet layout (64 px) and a 1x1 training triplet CSV."""
    data = fashion_mnist(root / "fashion_mnist", args.source, args.train_per_class, args.val_per_class, args.seed)
    csv = root / "train_1x1.csv"
    if not csv.exists():
        run("triplet_sampler.py", "--training", 1, "--data-dir", data, "--num_pos_images", 1,
            "--num_neg_images", 1, "--output", csv, "--seed", args.seed)
    return data, csv


def eval_times(args) -> list[float]:
    """The evaluation times, capped at --budget, which is always one of them."""
    return sorted({min(t, args.budget) for t in args.eval_at} | {args.budget})


def run_classic(csv: Path, evaluator: Evaluator, times: list[float], args) -> list[dict]:
    """The classic loop, clock paused while evaluating."""
    import torch

    import deep_rank_net
    import image_data
    from bench_train import classic_step_fn

    q, p, n = image_data.read_triplet_csv(csv)
    paths = sorted(set(q) | set(p) | set(n))
    row = {path: i for i, path in enumerate(paths)}
    trip = np.array([[row[a], row[b], row[c]] for a, b, c in zip(q, p, n)])  # [T, 3]
    cli_utils.seed_everything(args.seed)
    model = deep_rank_net.build_model(CLASSIC["arch"], CLASSIC["embedding_dim"], True, "none", "conv1")
    model = model.to(evaluator.device)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=CLASSIC["lr"], momentum=0.9, nesterov=True)
    step = classic_step_fn(model, opt, paths, CLASSIC["image_size"], evaluator.device)
    rng = np.random.default_rng(args.seed)
    order, cursor, steps, trained = rng.permutation(len(trip)), 0, 0, 0.0
    results = []
    for target in times:
        model.train()
        while trained < target:
            if cursor >= len(order):
                order, cursor = rng.permutation(len(trip)), 0
            batch = trip[order[cursor:cursor + CLASSIC["batch_size"]]]
            cursor += CLASSIC["batch_size"]
            t0 = time.perf_counter()
            step(batch)
            trained += time.perf_counter() - t0
            steps += 1
        model.eval()
        results.append(dict(recipe="classic", seconds=trained, steps=steps,
                            images=3 * steps * CLASSIC["batch_size"],
                            precision=evaluator.model(model, CLASSIC["image_size"])))
        print(f"  classic: {results[-1]}", file=sys.stderr)
    return results


def run_ours(csv: Path, root: Path, evaluator: Evaluator, times: list[float], args) -> list[dict]:
    """train_net.py with OUR_RECIPE, stopped by --time-limit at each evaluation time and resumed."""
    import deep_rank_net

    out = root / "run_ours"
    flags = OUR_RECIPE + args.ours.split() + [
        "--triplets", csv, "--epochs", 100000, "--seed", args.seed, "--device", args.device,
        "--output-dir", out, "--no-progress", "--num-workers", 0]
    results, done, resume, wall = [], 0.0, [], 0.0
    for target in times:
        t0 = time.perf_counter()
        run("train_net.py", *flags, "--time-limit", target - done, *(resume or ["--force"]))
        wall += time.perf_counter() - t0
        done = target
        ckpt_path = latest_checkpoint(out)
        resume = ["--resume", ckpt_path]
        ckpt = deep_rank_net.load_checkpoint(ckpt_path)
        model, image_size = deep_rank_net.model_from_checkpoint(ckpt, evaluator.device)
        batch = int(ckpt["args"]["batch_size"])
        results.append(dict(recipe="ours", seconds=target, wall_seconds=wall, steps=int(ckpt["step"]),
                            images=3 * int(ckpt["step"]) * batch, precision=evaluator.model(model, image_size)))
        print(f"  ours: {results[-1]}", file=sys.stderr)
    return results


def main(args) -> None:
    import torch

    import plots

    times = eval_times(args)
    device = cli_utils.pick_device(args.device)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_ttq_") as tmp:
        root = args.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data, csv = prepare(root, args)
        evaluator = Evaluator(data, args.k, device)
        raw = evaluator.raw_pixels()
        print(f"  raw pixels: precision@{args.k} {raw:.4f}", file=sys.stderr)
        rows = []
        if "classic" in args.recipes:
            rows += run_classic(csv, evaluator, times, args)
        if "ours" in args.recipes:
            rows += run_ours(csv, root, evaluator, times, args)
    summary = dict(device=str(device), torch_threads=torch.get_num_threads(), budget=args.budget,
                   train_images=len(evaluator.train.paths), val_images=len(evaluator.val.paths), k=args.k,
                   raw_pixels_precision=raw, our_recipe=OUR_RECIPE + args.ours.split(), classic=CLASSIC, rows=rows)
    with cli_utils.atomic_path(args.output_dir / "time_to_quality.json") as tmp_json:
        tmp_json.write_text(json.dumps(summary, indent=2) + "\n")
    series = {f"{r} recipe": ([x["seconds"] for x in rows if x["recipe"] == r],
                              [x["precision"] for x in rows if x["recipe"] == r]) for r in args.recipes}
    series["raw pixels"] = ([0, args.budget], [raw, raw])
    plots.line_chart(args.output_dir / "time_to_quality.png", series,
                     title=f"Fashion-MNIST, test precision@{args.k} vs training time ({device}, from scratch)",
                     xlabel="training seconds", ylabel=f"precision@{args.k}", y_range=(0.0, 1.0))
    print(f"{len(evaluator.train.paths)} train / {len(evaluator.val.paths)} val images, device {device}, "
          f"{torch.get_num_threads()} torch threads; raw pixels precision@{args.k} {raw:.4f}")
    print(f"{'recipe':<8} {'train s':>8} {'steps':>7} {'images':>9} {'precision@' + str(args.k):>13}")
    for r in rows:
        print(f"{r['recipe']:<8} {r['seconds']:>8.0f} {r['steps']:>7} {r['images']:>9} {r['precision']:>13.4f}")
    print(f"wrote {args.output_dir / 'time_to_quality.json'} and {args.output_dir / 'time_to_quality.png'}")


if __name__ == "__main__":
    cli_utils.run(main, get_args_parser())
