"""Time to quality: test precision@30 against training wall-clock, classic recipe vs ours.

    python bench/bench_time_to_quality.py [--budget 600] [--eval-at 60,150,300,600] [--recipes classic ours]

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` (``--source``), written
by make_sample_data.py in TinyImageNet's layout at 64 px (``--train-per-class``
500 + ``--val-per-class`` 100 images of each of the 10 classes; 50 of each of the 200 with
``--tints 20``, 10,000 queries as TinyImageNet), 1x1 triplets from
triplet_sampler.py. Both recipes train from scratch (``--weights none``, every layer
trained: the classic one resnet18, ours small-cnn) on the same triplet CSV, on the CPU unless ``--device``:

* classic — the classic loop: uniform random triplets as sampled, each image
  decoded by PIL and resized to 224 px every step, three separate forward passes,
  SGD + Nesterov lr 0.001, margin 1.0, batch 25, 4096-d (bench_train.classic_step_fn).
* ours — ``train_net.py`` with OUR_RECIPE below (small-cnn at 32 px, one batched forward,
  decoded-image cache, batch-hard mining + class loss, Adam, cosine lr decay over 11
  epochs; with ``--tints`` RECIPE_100K too, the recipe at TinyImageNet's size), run in
  segments with ``--time-limit`` + ``--resume`` so it can be evaluated at each ``--eval-at``
  time; the last segment ends at the budget or when the epochs are done, whichever comes first.

At each ``--eval-at`` second of training time (evaluation not counted) the
model embeds every val image (queries) and every train image (database) and
test precision@30 is computed by eval.py's own function (scoring.evaluate), with
its standard error over the val queries for our rows (retrieval.standard_error).
With ``--ours "--ema-decay D"`` each of our rows also gives the same run's last-step weights'
figure (``precision_train_weights``): the weight average against no average on one trajectory.
Raw pixels (the 64 px images flattened, unit-normalised; ``--raw-size``) are the reference row.
The peak resident memory of training is reported too: the classic loop's rise in this
process during its training segments (bench_common.PeakRSS, evaluation excluded), and
the train_net.py process's own peak for ours.
Prints a table, writes ``time_to_quality.json`` and ``time_to_quality.png``
(precision@30 vs seconds) into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import Evaluator, PeakRSS, comma_list, fashion_mnist, latest_checkpoint, max_known, run  # also puts the repo on sys.path

from deepranking import argtypes, cli, file_io  # noqa: E402

# Our CPU recipe: what the measurements below found fastest to reach high precision.
OUR_RECIPE = [
    # small-cnn: full resolution in its first stage, where resnet18's ImageNet stem leaves 8x8 of 32 px;
    # tuned on seeds 4 and 0 (0.886 / 0.896 against resnet18's 0.861-0.875 / 0.886-0.894), RESULTS.md section 5
    "--arch", "small-cnn", "--weights", "none", "--train-from", "conv1",
    "--image-size", "32",  # Fashion-MNIST is 28 px: 32 px costs 1/49 of 224 px per image
    "--embedding-dim", "128",  # plenty for 10 classes
    "--batch-size", "32",  # 96 images per step: more steps beat bigger batches early on
    "--optim", "adam", "--lr", "0.001",  # from scratch, Adam beats SGD at this budget
    "--mining", "batch-hard",  # every image an anchor with its hardest positive and negative
    "--margin", "0.2",  # a margin of 1.0 with hard mining collapses from scratch
    "--id-loss-weight", "1.0",  # class loss next to the ranking loss: the part that matters most (ablations)
    # cosine lr decay to 0 over 11 epochs (1,727 steps; small-cnn 281-298 s on 2 free cores, AMD EPYC), chosen
    # for resnet18 on seed 0 and kept: small-cnn at 4 epochs is no better than resnet18, at 11 it is
    "--epochs", "11", "--lr-schedule", "cosine",
]
# The recipe at TinyImageNet's size (100,000 triplets: the README's command), tuned on the 200-class tinted set
# (seed 4; RESULTS.md section 10, docs/results/fine_grained/tuning.md): the deep path alone, which beat the paper's
# shallow paths by 0.07 (0.844 against 0.773 after 3,125 steps); 256-d for 200 classes (0.850 against 0.844 at
# 128-d, two machines: not shown better); 1.2 passes (3,750 steps) to spend the budget: one pass ended 140 s early,
# an epoch of 125,000 triplets gave 0.863 against 0.847 for 100,000 (one thread each) and 1.2 passes 0.858 (435 s;
# 465-471 s on seeds 1-3, about 550 s at the slowest step time seen, 0.146 s). resnet18, --lr 0.002 or 0.0007,
# --batch-size 24, P x K batches, hard-negative mining, 512-d, the class loss's weight 2, scale 32 or margin 0.15
# did no better.
RECIPE_100K = ["--epochs", "1.2", "--shallow", "none", "--embedding-dim", "256"]
CLASSIC = dict(arch="resnet18", image_size=224, embedding_dim=4096, batch_size=25, lr=0.001, margin=1.0)


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=argtypes.positive_float, default=600.0, help="training seconds per recipe")
    p.add_argument("--eval-at", type=comma_list(argtypes.positive_float), default="60,150,300,600",
                   help="comma-separated training seconds at which to evaluate (capped at --budget)")
    p.add_argument("--recipes", nargs="+", default=["classic", "ours"], choices=["classic", "ours"],
                   help="recipes to run")
    p.add_argument("--source", default="debian", help="make_sample_data.py --source (debian or bundled)")
    p.add_argument("--train-per-class", type=argtypes.positive_int, default=500, help="train images per class")
    p.add_argument("--val-per-class", type=argtypes.positive_int, default=None,
                   help="val images per class (default: 100; 50 with --tints: 10,000 queries, TinyImageNet's count)")
    p.add_argument("--tints", type=argtypes.non_negative_int, default=0,
                   help="the fine-grained set: every garment in this many hues (20: 200 classes, TinyImageNet's "
                        "count; make_sample_data.py --tints), scored also by parent (garment) precision@k and "
                        "NDCG@k; 0: the 10 grey classes")
    p.add_argument("--raw-size", type=argtypes.positive_int, default=None,
                   help="side of the raw-pixel reference row (default: 64 px; 32 with --tints: 100,000 images at "
                        "64 px flattened are 4.9 GB)")
    p.add_argument("--ours", default="", help="extra train_net.py flags appended to OUR_RECIPE (and to RECIPE_100K with "
                                              "--tints; quoted string)")
    p.add_argument("--k", type=argtypes.positive_int, default=30, help="k of precision@k")
    p.add_argument("--target", type=argtypes.fraction, default=None,
                   help="precision@k to reach, drawn on the plot, first time reached printed (default: 0.88; 0.85 "
                        "with --tints)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    p.add_argument("--seed", type=int, default=0, help="seed of data, triplets, init and order")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data and runs here (default: temporary)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/time_to_quality"),
                   help="where the table (json) and plot go")
    return p


def prepare(root: Path, args) -> tuple[Path, Path]:
    """Fashion-MNIST in TinyImageNet layout (64 px) and a 1x1 training triplet CSV."""
    name = f"fashion_mnist_tints{args.tints}" if args.tints else "fashion_mnist"
    data = fashion_mnist(root / name, args.source, args.train_per_class, args.val_per_class, args.seed, args.tints)
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
    from deepranking import image_data, runtime
    from bench_train import classic_step_fn

    q, p, n = image_data.read_triplet_csv(csv)
    paths = sorted(set(q) | set(p) | set(n))
    row = {path: i for i, path in enumerate(paths)}
    trip = np.array([[row[a], row[b], row[c]] for a, b, c in zip(q, p, n)])  # [T, 3]
    runtime.seed_everything(args.seed)
    model = deep_rank_net.build_model(CLASSIC["arch"], CLASSIC["embedding_dim"], True, "none", "conv1")
    model = model.to(evaluator.device)
    opt = torch.optim.SGD(model.trainable_parameters(), lr=CLASSIC["lr"], momentum=0.9, nesterov=True)
    step = classic_step_fn(model, opt, paths, CLASSIC["image_size"], evaluator.device)
    rng = np.random.default_rng(args.seed)
    order, cursor, steps, trained = rng.permutation(len(trip)), 0, 0, 0.0
    results, peak_mb = [], float("nan")
    for target in times:
        model.train()
        with PeakRSS() as mem:
            while trained < target:
                if cursor >= len(order):
                    order, cursor = rng.permutation(len(trip)), 0
                batch = trip[order[cursor:cursor + CLASSIC["batch_size"]]]
                cursor += CLASSIC["batch_size"]
                t0 = time.perf_counter()
                step(batch)
                trained += time.perf_counter() - t0
                steps += 1
        peak_mb = max_known(peak_mb, mem.extra_mb)
        model.eval()
        results.append(dict(recipe="classic", seconds=trained, steps=steps,
                            images=3 * steps * CLASSIC["batch_size"], train_peak_mb=peak_mb,
                            precision=evaluator.model(model, CLASSIC["image_size"])))
        print(f"  classic: {results[-1]}", file=sys.stderr)
    return results


def our_recipe(args) -> list[str]:
    """The train_net.py flags of our rows: OUR_RECIPE, RECIPE_100K on the 200-class set (--tints), then --ours."""
    return OUR_RECIPE + (RECIPE_100K if args.tints else []) + args.ours.split()


def run_ours(csv: Path, root: Path, evaluator: Evaluator, times: list[float], args) -> list[dict]:
    """train_net.py with OUR_RECIPE, stopped by --time-limit at each evaluation time and resumed.

    The recipe's --epochs may end the run before the budget; its last row is then the
    finished model at its own training time.
    """
    import deep_rank_net
    from deepranking import retrieval
    from deepranking.checkpoint import load_checkpoint

    out = root / "run_ours"
    shutil.rmtree(out, ignore_errors=True)  # a model left by an earlier bench run must not be evaluated
    flags = our_recipe(args) + [
        "--triplets", csv, "--seed", args.seed, "--device", args.device,
        "--output-dir", out, "--no-progress", "--num-workers", 0]
    results, resume, wall, peak_mb = [], [], 0.0, float("nan")
    for target in times:
        t0 = time.perf_counter()
        # --time-limit counts the whole run's training seconds (resumes included): the target itself
        peak_mb = max_known(peak_mb, run("train_net.py", *flags, "--time-limit", target, *(resume or ["--force"])))
        wall += time.perf_counter() - t0
        ckpt_path = latest_checkpoint(out)
        resume = ["--resume", ckpt_path]
        ckpt = load_checkpoint(ckpt_path)
        model, spec = deep_rank_net.model_from_checkpoint(ckpt, evaluator.device)
        batch = int(ckpt["args"]["batch_size"])
        scores = evaluator.model_scores(model, spec)  # per-query arrays [Q]
        per_query = scores["precision"]
        results.append(dict(recipe="ours", seconds=float(ckpt["train_seconds"]), wall_seconds=wall,
                            steps=int(ckpt["step"]), images=3 * int(ckpt["step"]) * batch, train_peak_mb=peak_mb,
                            precision=float(per_query.mean()), precision_se=retrieval.standard_error(per_query),
                            **graded_means(scores)))
        if "train_model" in ckpt:  # --ema-decay: the same run's last-step weights, a paired comparison
            trained, _ = deep_rank_net.model_from_checkpoint({**ckpt, "model": ckpt["train_model"]}, evaluator.device)
            results[-1]["precision_train_weights"] = float(evaluator.model_per_query(trained, spec).mean())
        print(f"  ours: {results[-1]}", file=sys.stderr)
        if ckpt_path.name == "deepranknet.model":  # all epochs done within the budget
            break
    return results


def graded_means(scores: dict) -> dict:
    """parent_precision and ndcg (at k) over the queries, when the data has a class hierarchy."""
    if "ndcg" not in scores:
        return {}
    return {"parent_precision": float(scores["parent_precision"].mean()),
            "ndcg": float(np.nanmean(scores["ndcg"]))}


def main(args) -> None:
    import torch

    from deepranking import plots, runtime

    times = eval_times(args)
    if args.target is None:
        args.target = 0.85 if args.tints else 0.88
    if args.val_per_class is None:
        args.val_per_class = 50 if args.tints else 100
    device = runtime.pick_device(args.device)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_ttq_") as tmp:
        root = args.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data, csv = prepare(root, args)
        evaluator = Evaluator(data, args.k, device)
        raw_scores = evaluator.raw_pixel_scores(args.raw_size or (32 if args.tints else 64))
        raw, raw_graded = float(raw_scores["precision"].mean()), graded_means(raw_scores)
        print(f"  raw pixels: precision@{args.k} {raw:.4f} {raw_graded}", file=sys.stderr)
        rows = []
        if "classic" in args.recipes:
            rows += run_classic(csv, evaluator, times, args)
        if "ours" in args.recipes:
            rows += run_ours(csv, root, evaluator, times, args)
    summary = dict(device=str(device), torch_threads=torch.get_num_threads(), budget=args.budget,
                   train_images=len(evaluator.train.paths), val_images=len(evaluator.val.paths), k=args.k,
                   tints=args.tints, raw_pixels_precision=raw, raw_pixels_graded=raw_graded, our_recipe=our_recipe(args), classic=CLASSIC, rows=rows)
    with file_io.atomic_path(args.output_dir / "time_to_quality.json") as tmp_json:
        tmp_json.write_text(json.dumps(summary, indent=2) + "\n")
    series = {f"{r} recipe": ([x["seconds"] for x in rows if x["recipe"] == r],
                              [x["precision"] for x in rows if x["recipe"] == r]) for r in args.recipes}
    series["raw pixels"] = ([0, args.budget], [raw, raw])
    plots.line_chart(args.output_dir / "time_to_quality.png", series,
                     title=f"Fashion-MNIST{f' x {args.tints} hues' if args.tints else ''}, test precision@{args.k} "
                           f"vs training time ({device}, from scratch)",
                     xlabel="training seconds", ylabel=f"precision@{args.k}", y_range=(0.5, 1.0),
                     hline=(args.target, f"target {args.target:g}"))
    print(f"{len(evaluator.train.paths)} train / {len(evaluator.val.paths)} val images, device {device}, "
          f"{torch.get_num_threads()} torch threads; raw pixels precision@{args.k} {raw:.4f}")
    print(f"{'recipe':<8} {'train s':>8} {'steps':>7} {'images':>9} {'precision@' + str(args.k):>13} "
          f"{'± s.e.':>7} {'train peak MB':>14}")
    for r in rows:
        se = f"{r['precision_se']:.4f}" if "precision_se" in r else "-"
        print(f"{r['recipe']:<8} {r['seconds']:>8.0f} {r['steps']:>7} {r['images']:>9} {r['precision']:>13.4f} "
              f"{se:>7} {r['train_peak_mb']:>14.0f}")
    print("(train peak MB: the classic loop's rise in this process while training; ours: train_net.py's own peak;"
          " s.e.: the standard error over the val queries: another draw of queries moves the figure this much)")
    for r in [dict(recipe="raw pixels", seconds=0, **raw_graded)] + rows:
        if "ndcg" in r:
            print(f"{r['recipe']} at {r['seconds']:.0f} s: parent (garment) precision@{args.k} "
                  f"{r['parent_precision']:.4f}, NDCG@{args.k} {r['ndcg']:.4f}")
    for r in rows:
        if "precision_train_weights" in r:
            print(f"{r['recipe']} at {r['seconds']:.0f} s: the weight average (--ema-decay) {r['precision']:.4f}, "
                  f"the same run's last-step weights {r['precision_train_weights']:.4f}")
    for recipe in args.recipes:
        hit = next((r for r in rows if r["recipe"] == recipe and r["precision"] >= args.target), None)
        print(f"{recipe}: " + (f"precision@{args.k} >= {args.target:g} first seen at {hit['seconds']:.0f} s"
                               if hit else f"precision@{args.k} {args.target:g} not reached within {args.budget:g} s"))
    print(f"wrote {args.output_dir / 'time_to_quality.json'} and {args.output_dir / 'time_to_quality.png'}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
