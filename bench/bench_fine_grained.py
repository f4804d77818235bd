"""The paper's multi-scale claim where hue and detail are the task: shallow paths x class loss on 200 classes.

    python bench/bench_fine_grained.py [--seeds 1 2 3] [--triplets 25000] [--archs resnet18 ...]

Data (per seed, as ``bench_time_to_quality.py --tints 20`` makes it): Fashion-MNIST's 10 garments
in 20 hues each (``make_sample_data.py --tints 20``: 200 classes, "Coat hue 036" next to "Coat hue
054"), 500 train + 50 val images per class at 64 px, its hierarchy.csv (hue under garment) and a 1x1
triplet CSV. The budget, the same for every arm: one epoch of the recipe's cosine schedule over
``--triplets`` rows of that CSV drawn by the seed (16,000: 500 steps, about 75 s on 2 cores).

Arms: ``bench_time_to_quality.OUR_RECIPE`` with ``--epochs 1`` and

* ``--shallow paper`` (the paper's two subsampled paths), ``classic`` (the classic code's strided
  convolutions) or ``none`` (the deep path alone),
* with the class loss (``--id-loss-weight 1.0``, the recipe) or the ranking loss alone (``0``);

and ``--archs``: the recipe with the class loss and another backbone from scratch, as the deep path
alone (``--shallow none``; compare the ``none/class loss`` arm, small-cnn).
Each arm is scored as eval.py scores it, 10,000 val queries against the 100,000 train images:
class-level precision@30, parent-level (garment) precision@30 and NDCG@30 (gains 2 / 1 / 0 for same
class / same garment / other). Raw pixels at 32 px are the reference row. Prints each arm's mean,
spread (max - min) and per-seed figures; writes ``fine_grained_seed<S>.json`` into ``--output-dir``
after every arm (a run that stops keeps what it measured, a rerun skips the arms done, and runs of
different seeds may go side by side; ``--work-dir`` keeps the data).
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

import numpy as np

from bench_common import Evaluator, latest_checkpoint, run
from bench_time_to_quality import OUR_RECIPE, graded_means, prepare

from deepranking import argtypes, cli, file_io  # noqa: E402

SHALLOW = ("paper", "classic", "none")
CLASS_LOSS = {"class loss": "1.0", "ranking alone": "0"}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3], help="seeds of data, triplets, init, order")
    p.add_argument("--triplets", type=argtypes.positive_int, default=16_000,
                   help="triplets per run (one epoch): the budget of every arm")
    p.add_argument("--tints", type=argtypes.positive_int, default=20, help="hues per garment")
    p.add_argument("--train-per-class", type=argtypes.positive_int, default=500, help="train images per class")
    p.add_argument("--val-per-class", type=argtypes.positive_int, default=50, help="val images per class")
    p.add_argument("--source", default="debian", help="make_sample_data.py --source (debian or bundled)")
    p.add_argument("--arms", nargs="*", default=[f"{s}/{c}" for s in SHALLOW for c in CLASS_LOSS],
                   help="shallow/loss pairs to run (default: all six; none: only --archs)")
    p.add_argument("--archs", nargs="*", default=[], help="extra rows: the recipe with these --arch values")
    p.add_argument("--k", type=argtypes.positive_int, default=30, help="k of precision@k and NDCG@k")
    p.add_argument("--work-dir", type=Path, default=Path("runs/fine_grained/work"), help="data and runs")
    p.add_argument("--output-dir", type=Path, default=Path("runs/fine_grained"), help="where fine_grained_seed<S>.json go")
    return p


def arm_flags(arm: str) -> list[str]:
    """The train_net.py flags of an arm name: "paper/class loss" or "arch:resnet18"."""
    if arm.startswith("arch:"):  # the backbone alone: no shallow paths beside it
        return ["--arch", arm.split(":", 1)[1], "--shallow", "none"]
    shallow, loss = arm.split("/")
    if shallow not in SHALLOW or loss not in CLASS_LOSS:
        raise cli.UserError(f"--arms: {arm!r} is not SHALLOW/LOSS with SHALLOW in {SHALLOW}, LOSS in "
                            f"{tuple(CLASS_LOSS)}")
    return ["--shallow", shallow, "--id-loss-weight", CLASS_LOSS[loss]]


def subset_csv(csv: Path, rows: int, seed: int) -> Path:
    """``rows`` triplets of the CSV drawn by the seed (all of it when it has fewer)."""
    import pandas as pd

    out = csv.with_name(f"{csv.stem}_{rows}.csv")
    if not out.exists():
        table = pd.read_csv(csv)
        sample = table.sample(n=min(rows, len(table)), random_state=seed)
        with file_io.atomic_path(out) as tmp:
            sample.to_csv(tmp, index=False)
    return out


def train_and_score(arm: str, csv: Path, root: Path, evaluator: Evaluator, seed: int) -> dict:
    import deep_rank_net
    from deepranking import retrieval
    from deepranking.checkpoint import load_checkpoint

    out = root / "runs" / arm.replace("/", "_").replace(" ", "_").replace(":", "_")
    shutil.rmtree(out, ignore_errors=True)
    peak_mb = run("train_net.py", *OUR_RECIPE, "--epochs", 1, *arm_flags(arm), "--triplets", csv, "--seed", seed,
                  "--device", "cpu", "--output-dir", out, "--no-progress", "--num-workers", 0, "--force")
    ckpt = load_checkpoint(latest_checkpoint(out))
    model, spec = deep_rank_net.model_from_checkpoint(ckpt, evaluator.device)
    scores = evaluator.model_scores(model, spec)
    return dict(arm=arm, seed=seed, steps=int(ckpt["step"]), train_seconds=float(ckpt["train_seconds"]),
                train_peak_mb=peak_mb, precision=float(scores["precision"].mean()),
                precision_se=retrieval.standard_error(scores["precision"]), **graded_means(scores))


def main(args) -> None:
    import torch

    arms = list(args.arms) + [f"arch:{a}" for a in args.archs]
    for arm in arms:
        arm_flags(arm)  # a bad name fails before any work
    args.output_dir.mkdir(parents=True, exist_ok=True)
    for seed in args.seeds:  # one file a seed: runs of different seeds may go side by side
        result_file = args.output_dir / f"fine_grained_seed{seed}.json"
        done = json.loads(result_file.read_text()) if result_file.exists() else {"rows": []}
        root = args.work_dir / f"seed{seed}"
        root.mkdir(parents=True, exist_ok=True)
        data_args = argparse.Namespace(tints=args.tints, source=args.source, train_per_class=args.train_per_class,
                                       val_per_class=args.val_per_class, seed=seed)
        data, csv = prepare(root, data_args)
        evaluator = Evaluator(data, args.k, torch.device("cpu"))
        if "raw_pixels" not in done:
            raw = evaluator.raw_pixel_scores(32)
            done["raw_pixels"] = dict(arm="raw pixels", seed=seed, precision=float(raw["precision"].mean()),
                                      **graded_means(raw))
        for arm in arms:
            if any(r["arm"] == arm for r in done["rows"]):
                continue
            done["rows"].append(train_and_score(arm, subset_csv(csv, args.triplets, seed), root, evaluator, seed))
            print(f"  {done['rows'][-1]}", file=sys.stderr)
            with file_io.atomic_path(result_file) as tmp:
                tmp.write_text(json.dumps(dict(done, triplets=args.triplets, recipe=OUR_RECIPE), indent=2) + "\n")
    rows = []
    for seed in args.seeds:
        done = json.loads((args.output_dir / f"fine_grained_seed{seed}.json").read_text())
        rows += done["rows"] + [done["raw_pixels"]]
    report(rows, arms + ["raw pixels"], args.k)
    print(f"wrote {args.output_dir}/fine_grained_seed<S>.json")


def report(rows: list[dict], arms: list[str], k: int) -> None:
    """One line an arm: mean and spread (max - min) over the seeds of each figure, then the per-seed ones."""
    metrics = (("precision", f"P@{k}"), ("parent_precision", f"parent P@{k}"), ("ndcg", f"NDCG@{k}"))
    print(f"{'arm':<28} " + " ".join(f"{name + ' mean ± spread':>24}" for _, name in metrics) + "  per seed (P@k)")
    for arm in arms:
        mine = [r for r in rows if r["arm"] == arm]
        if not mine:
            continue
        cells = []
        for key, _ in metrics:
            v = np.array([r[key] for r in mine])
            cells.append(f"{v.mean():.3f} ± {v.max() - v.min():.3f}".rjust(24))
        per_seed = " ".join(f"{r['seed']}:{r['precision']:.3f}" for r in sorted(mine, key=lambda r: r["seed"]))
        print(f"{arm:<28} " + " ".join(cells) + f"  {per_seed}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
