"""Embedding, evaluation and query of a database larger than a hard memory cap, against uncapped runs.

    python bench/bench_memory_cap.py [--train-per-class 500] [--tints 20] [--dim 4096] [--memory-budget 256M]

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` in TinyImageNet's layout
(``make_sample_data.py --tints 20``: 200 classes, ``--train-per-class`` 500 + ``--val-per-class``
5 images each, 64 px). The model: the CPU recipe (small-cnn at 32 px) at ``--dim`` 4,096 (the
paper's width), trained for ``--train-steps`` steps, so that 100,000 train images make a 1.6 GB
database whose neighbours mean something (precision@30 well above chance).

Each program runs as a user runs it, in a child process with ``RLIMIT_AS`` (the address space,
memory-mapped files included) set by ``preexec_fn``:

1. its baseline: the same flags on a 40-image set (``fashion_mnist``, 3 train + 1 val image
   per class, no tints), uncapped; its peak address space (VmPeak) is that of the imports and
   the model, stable to a fraction of a MB;
2. the big set under a cap of that baseline plus HALF the database's bytes: gen_embeddings.py
   (database folders of ``--shard-rows`` rows, images decoded on the fly), eval.py and query.py
   (``--memory-budget``);
3. the big set again with no cap (eval.py and query.py with ``--memory-budget auto``);
4. the control: eval.py on the same rows as one ``.npy`` file (read whole), under eval.py's cap.

Passes when every capped run exits 0 within its cap, the two databases are equal row for row,
eval.py's metrics.json and query.py's answer are the same, and the control runs out of memory.
Prints a table (seconds, VmPeak and VmHWM, the peak resident memory, of each run) and writes
``memory_cap.json`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import REPO, fashion_mnist  # also puts the repo on sys.path

from deepranking import argtypes, cli, file_io  # noqa: E402

# Imports what the programs import, runs the program at argv[2] with argv[3:], then writes its peak
# address space and peak resident memory (VmPeak, VmHWM, kB) to argv[1] as JSON. The late imports
# (matplotlib, pandas, torchvision, PIL) come first so that the baseline is not a late import's peak
# that a big run could fill with data.
PEAK = ("import atexit, json, runpy, sys\n"
        "import matplotlib; matplotlib.use('Agg'); import matplotlib.pyplot, pandas, torch, torchvision, PIL.Image\n"
        "out = sys.argv.pop(1)\n"
        "def peak():\n"
        "    status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines() if ':' in l)\n"
        "    json.dump({k: int(status[k].split()[0]) * 1024 for k in ('VmPeak', 'VmHWM')}, open(out, 'w'))\n"
        "atexit.register(peak)\n"
        "sys.argv = sys.argv[1:]\n"
        "runpy.run_path(sys.argv[0], run_name='__main__')\n")
# One malloc arena (a second thread's arena reserves 64 MB) and a fixed mmap threshold (glibc raises it
# after each large free and then serves large blocks from a heap that only grows): the address space
# follows the memory in use.
STEADY_MALLOC = {"MALLOC_ARENA_MAX": "1", "MALLOC_MMAP_THRESHOLD_": "131072"}


def capped_run(script: str, argv, peak_file: Path, cap: int | None = None, threads: int = 1,
               timeout: float | None = None) -> tuple[subprocess.CompletedProcess, dict | None]:
    """Run a program of the repository with its address space capped at ``cap`` bytes (None: uncapped).

    Returns the finished process and its peaks in bytes ({"VmPeak", "VmHWM"}), or None when it failed.
    """
    peak_file.unlink(missing_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), **STEADY_MALLOC}
    limit = None if cap is None else (lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    result = subprocess.run([sys.executable, "-c", PEAK, str(peak_file), str(REPO / script), *map(str, argv)],
                            capture_output=True, text=True, env=env, cwd=REPO, preexec_fn=limit, timeout=timeout)
    return result, (json.loads(peak_file.read_text()) if result.returncode == 0 else None)


def budget_text(value: str) -> str:
    """--memory-budget, checked by the programs' own rule before any work, kept as typed for their command lines."""
    from deepranking import database

    database.budget_flag(value)
    return value


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="debian", help="make_sample_data.py --source (debian or bundled)")
    p.add_argument("--train-per-class", type=argtypes.positive_int, default=500, help="train images per class")
    p.add_argument("--val-per-class", type=argtypes.positive_int, default=5,
                   help="val images per class: the queries (each fetches its class's 500 rows for R-precision, "
                        "block by block: about 0.1 s a query at 4,096-d and 256M on 2 cores)")
    p.add_argument("--tints", type=argtypes.non_negative_int, default=20, help="make_sample_data.py --tints")
    p.add_argument("--dim", type=argtypes.positive_int, default=4096, help="embedding dimension of the model")
    p.add_argument("--shard-rows", type=argtypes.positive_int, default=20_000, help="gen_embeddings.py --shard-rows")
    p.add_argument("--train-steps", type=argtypes.positive_int, default=200, help="training steps of the model")
    p.add_argument("--memory-budget", type=budget_text, default="256M",
                   help="eval.py and query.py --memory-budget of the capped runs")
    p.add_argument("--threads", type=argtypes.positive_int, default=2, help="torch threads of each program")
    p.add_argument("--seed", type=int, default=0, help="seed of the data and the model's weights")
    p.add_argument("--work-dir", type=Path, default=None, help="keep data and outputs here (default: temporary)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/memory_cap"), help="where memory_cap.json goes")
    return p


def train_model(data: Path, work: Path, args) -> Path:
    """The CPU recipe at --dim, --train-steps steps on the big set's 1x1 triplets; its checkpoint."""
    from bench_common import latest_checkpoint, run
    from bench_time_to_quality import OUR_RECIPE

    csv, out = work / "train_1x1.csv", work / "model"
    if not csv.exists():
        run("triplet_sampler.py", "--training", 1, "--data-dir", data, "--num_pos_images", 1, "--num_neg_images", 1,
            "--output", csv, "--seed", args.seed)
    run("train_net.py", *OUR_RECIPE, "--embedding-dim", args.dim, "--epochs", 1, "--max-steps", args.train_steps,
        "--triplets", csv, "--seed", args.seed, "--output-dir", out, "--no-progress", "--num-workers", 0, "--force")
    return latest_checkpoint(out)


def commands(ckpt: Path, data: Path, out: Path, budget: str, shard_rows: int) -> dict[str, list]:
    """gen_embeddings.py (database folders, images decoded on the fly), eval.py and query.py."""
    train, test = out / "train_db", out / "test_db"
    probe = sorted((data / "val").rglob("*.JPEG"))[0]
    return {
        "gen_embeddings.py": ["--model", ckpt, "--data-dir", data, "--train-output", train, "--test-output", test,
                              "--shard-rows", shard_rows, "--cache-budget", 0, "--device", "cpu", "--no-progress",
                              "--force"],
        "eval.py": ["--train-embeddings", train, "--test-embeddings", test, "--output-dir", out / "eval",
                    "--memory-budget", budget, "--num-demo-queries", 1, "--max-train-queries", 100, "--device", "cpu",
                    "--no-progress", "--force"],
        "query.py": ["--model", ckpt, "--embeddings", train, "--memory-budget", budget, "--top", 10, "--device", "cpu",
                     probe],
    }


def same_rows(a: Path, b: Path, rows_per_block: int) -> bool:
    """Two databases hold the same paths, labels and rows (compared block by block)."""
    from deepranking import database

    da, db = database.open(a, progress=False), database.open(b, progress=False)
    if len(da) != len(db) or da.paths != db.paths or not np.array_equal(da.labels, db.labels):
        return False
    return all(np.array_equal(block, db[start:start + len(block)]) for start, block in da.blocks(rows_per_block))


def measure(script: str, argv, tmp: Path, cap: int | None, threads: int) -> dict:
    t0 = time.perf_counter()
    result, peaks = capped_run(script, argv, tmp / "peak.json", cap, threads)
    row = dict(script=script, cap=cap, seconds=time.perf_counter() - t0, returncode=result.returncode,
               stdout=result.stdout, stderr_tail=result.stderr[-400:], **(peaks or {}))
    gb = (lambda v: f"{v / 2**30:.2f} GB" if v else "-")
    print(f"  {script:<18} cap {gb(cap):>8}  exit {result.returncode}  {row['seconds']:7.1f} s  "
          f"VmPeak {gb(row.get('VmPeak')):>8}  VmHWM {gb(row.get('VmHWM')):>8}", file=sys.stderr)
    return row


def control(work: Path, model: Path, capped_out: Path, cap: int, args) -> dict:
    """eval.py on the capped run's rows as one .npy file, under eval.py's cap: it must run out of memory."""
    from deepranking import database, embedding_io

    db = database.open(capped_out / "train_db", progress=False)
    npy = work / "train_whole.npy"
    embedding_io.write_embeddings(npy, db.paths, db.labels, db[0:len(db)], progress=False, model=db.model)
    argv = commands(model, work / "data", work / "npy_out", args.memory_budget, args.shard_rows)["eval.py"]
    argv[argv.index("--train-embeddings") + 1] = npy
    argv[argv.index("--test-embeddings") + 1] = capped_out / "test_db"
    return measure("eval.py", argv, work, cap, args.threads)


def main(args) -> None:
    args.output_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="bench_memory_cap_") as tmp:
        work = args.work_dir or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        big = fashion_mnist(work / "data", args.source, args.train_per_class, args.val_per_class, args.seed, args.tints)
        tiny = fashion_mnist(work / "tiny", args.source, 3, 1, args.seed)
        model = train_model(big, work, args)
        n_train = sum(1 for _ in (big / "train").rglob("*.JPEG"))
        db_bytes = n_train * args.dim * 4
        print(f"database: {n_train:,} rows x {args.dim} = {db_bytes / 2**30:.2f} GB", file=sys.stderr)
        runs = {"baseline": {}, "capped": {}, "uncapped": {}}
        caps = {}
        for script, argv in commands(model, tiny, work / "tiny_out", args.memory_budget,
                                     args.shard_rows).items():
            runs["baseline"][script] = measure(script, argv, work, None, args.threads)
            if runs["baseline"][script]["returncode"]:
                raise cli.UserError(f"{script} failed on the small set: {runs['baseline'][script]['stderr_tail']}")
            caps[script] = runs["baseline"][script]["VmPeak"] + db_bytes // 2
        for name, cap_of, budget in (("capped", caps.get, args.memory_budget), ("uncapped", lambda s: None, "auto")):
            out = work / f"{name}_out"
            out.mkdir(exist_ok=True)
            argv = commands(model, big, out, budget, args.shard_rows)
            if name == "uncapped":  # eval.py and query.py read the capped run's database; compared separately
                for flag in ("--train-embeddings", "--test-embeddings", "--embeddings"):
                    for script in ("eval.py", "query.py"):
                        if flag in argv[script]:
                            i = argv[script].index(flag) + 1
                            argv[script][i] = work / "capped_out" / Path(argv[script][i]).name
            for script, script_argv in argv.items():
                runs[name][script] = measure(script, script_argv, work, cap_of(script), args.threads)
        checks = {
            "capped runs exit 0 within the cap": all(r["returncode"] == 0 and r["VmPeak"] <= r["cap"]
                                                     for r in runs["capped"].values()),
            "databases equal row for row": same_rows(work / "capped_out" / "train_db", work / "uncapped_out" / "train_db",
                                                     args.shard_rows)
                                           and same_rows(work / "capped_out" / "test_db",
                                                         work / "uncapped_out" / "test_db", args.shard_rows),
            "eval metrics equal": (work / "capped_out" / "eval" / "metrics.json").read_text()
                                  == (work / "uncapped_out" / "eval" / "metrics.json").read_text(),
            "query answers equal": runs["capped"]["query.py"]["stdout"] == runs["uncapped"]["query.py"]["stdout"],
        }
        runs["control"] = control(work, model, work / "capped_out", caps["eval.py"], args)
        checks["the control (one .npy file) runs out of memory"] = (runs["control"]["returncode"] == 2
                                                                    and "out of memory" in runs["control"]["stderr_tail"])
    report(args, n_train, db_bytes, runs, checks)


def report(args, n_train: int, db_bytes: int, runs: dict, checks: dict) -> None:
    summary = dict(train_rows=n_train, dim=args.dim, database_bytes=db_bytes, memory_budget=args.memory_budget,
                   threads=args.threads, runs=runs, checks=checks)
    with file_io.atomic_path(args.output_dir / "memory_cap.json") as tmp_json:
        tmp_json.write_text(json.dumps(summary, indent=2) + "\n")
    gb = (lambda v: f"{v / 2**30:.2f}" if v else "-")
    print(f"database {n_train:,} x {args.dim} = {gb(db_bytes)} GB; capped runs: --memory-budget {args.memory_budget}")
    print(f"{'program':<18} {'cap GB':>7} {'s capped':>9} {'VmPeak':>7} {'VmHWM':>6} {'s free':>7} {'VmPeak':>7} "
          f"{'VmHWM':>6}")
    for script, r in runs["capped"].items():
        f = runs["uncapped"][script]
        print(f"{script:<18} {gb(r['cap']):>7} {r['seconds']:>9.1f} {gb(r.get('VmPeak')):>7} {gb(r.get('VmHWM')):>6} "
              f"{f['seconds']:>7.1f} {gb(f.get('VmPeak')):>7} {gb(f.get('VmHWM')):>6}")
    c = runs["control"]
    print(f"control: eval.py of one .npy file under {gb(c['cap'])} GB: exit {c['returncode']}")
    for name, ok in checks.items():
        print(f"{'PASS' if ok else 'FAIL'}  {name}")
    print(f"wrote {args.output_dir / 'memory_cap.json'}")
    if not all(checks.values()):
        raise cli.UserError("the capped runs did not all hold: see FAIL above")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
