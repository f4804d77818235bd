"""Embedding, evaluation and query of a database folder under a hard memory cap smaller than the database.

The cap is the address-space limit (``RLIMIT_AS``, set in the child by ``preexec_fn``): a real
limit, not a measurement, and it counts memory-mapped files too. torch's import alone maps about
3.2 GB of address space (its shared libraries), but that figure is stable to a fraction of a MB
from run to run, so the cap is measured rather than guessed: each program's peak address space
(VmPeak) on a 12-image database with the same flags, plus HALF the big database's size. A program
that held the big database's matrix would need all of it above that baseline and fails (checked:
eval.py of the same rows as one .npy file runs out of memory under the same cap); one that streams
within --memory-budget passes and must answer exactly as an uncapped run.

What would otherwise blur the baseline by tens of MB is held still by ``capped_run``, the runner
of ``bench/bench_memory_cap.py`` (the same check at 1.6 GB): the libraries the programs
import late (matplotlib for the charts, pandas, torchvision, PIL) are imported before the program
starts, so the baseline is not a late import's peak that a big run could fill with data; one malloc
arena (``MALLOC_ARENA_MAX=1``: a second thread's arena reserves 64 MB) and a fixed mmap threshold
(``MALLOC_MMAP_THRESHOLD_``: glibc otherwise raises it after each large free and serves later large
blocks from a heap that only grows) make the address space follow the memory in use.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deep_rank_net as drn
import eval as eval_script
import gen_embeddings
import query
from conftest import REPO, write_tiny_imagenet
from deepranking import database, embedding_io
from deepranking.checkpoint import model_record, write_checkpoint
from deepranking.preprocessing import Preprocessing

sys.path.insert(0, str(REPO / "bench"))
from bench_memory_cap import capped_run  # noqa: E402

DIM = 16384  # 64 kB a row: 1,200 train images make a 79 MB database
PER_CLASS = 300
BUDGET = "8M"
pytestmark = pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="needs Linux /proc")


def run(tmp: Path, script: str, *argv, cap: int | None = None) -> tuple[subprocess.CompletedProcess, int | None]:
    """(the finished process, its peak address space in bytes or None if it failed)."""
    result, peaks = capped_run(script, argv, tmp / "peak.json", cap, threads=1, timeout=300)
    return result, (peaks["VmPeak"] if peaks else None)


def commands(ckpt: Path, data: Path, out: Path) -> dict[str, list]:
    """gen_embeddings.py (folders of 40-row shards, images decoded on the fly), eval.py and query.py."""
    train, test = out / "train_db", out / "test_db"
    probe = sorted((data / "val").rglob("*.JPEG"))[0]
    return {
        "gen_embeddings.py": ["--model", ckpt, "--data-dir", data, "--train-output", train, "--test-output", test,
                              "--shard-rows", 40, "--cache-budget", 0, "--batch-size", 16, "--device", "cpu",
                              "--no-progress", "--force"],
        "eval.py": ["--train-embeddings", train, "--test-embeddings", test, "--output-dir", out / "eval", "--k", 5,
                    "--memory-budget", BUDGET, "--num-demo-queries", 1, "--max-train-queries", 50, "--device", "cpu",
                    "--no-progress", "--force"],
        "query.py": ["--model", ckpt, "--embeddings", train, "--memory-budget", BUDGET, "--top", 5, "--device", "cpu",
                     probe],
    }


@pytest.fixture(scope="module")
def capped(tmp_path_factory):
    """Each program on the 12-image database (its baseline), then on the 1,200-image one under the cap."""
    tmp = tmp_path_factory.mktemp("cap")
    torch.manual_seed(0)
    net = drn.DeepRankNet(arch="small-cnn", embedding_dim=DIM, weights="none", shallow="none")
    ckpt = tmp / "net.model"
    write_checkpoint(ckpt, {**model_record(net, Preprocessing(image_size=32, cache_size=32)), "epoch": 0, "step": 0,
                            "args": {}})
    tiny = write_tiny_imagenet(tmp / "tiny", n_classes=4, train_per_class=3, val_per_class=1)
    big = write_tiny_imagenet(tmp / "big", n_classes=4, train_per_class=PER_CLASS, val_per_class=5)
    db_bytes = 4 * PER_CLASS * DIM * 4
    caps, results = {}, {}
    (tmp / "tiny_out").mkdir()
    (tmp / "big_out").mkdir()
    for script, argv in commands(ckpt, tiny, tmp / "tiny_out").items():
        result, peak = run(tmp, script, *argv)
        assert result.returncode == 0, result.stderr[-2000:]
        caps[script] = peak + db_bytes // 2
    for script, argv in commands(ckpt, big, tmp / "big_out").items():
        results[script] = run(tmp, script, *argv, cap=caps[script])
    return tmp, ckpt, big, caps, results


def test_every_stage_runs_under_a_cap_below_the_database(capped):
    tmp, _, _, caps, results = capped
    for script, (result, peak) in results.items():
        assert result.returncode == 0, f"{script}: {result.stderr[-2000:]}"
        assert peak <= caps[script]
    db = database.open(tmp / "big_out" / "train_db")
    assert len(db) == 1200 and db.dim == DIM and len(db.shards) == 30


def test_the_capped_runs_answer_as_uncapped_ones(capped, capsys):
    tmp, ckpt, big, _, results = capped
    out = tmp / "free_out"
    out.mkdir(exist_ok=True)
    argv = {script: [str(a) for a in args] for script, args in commands(ckpt, big, out).items()}
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(argv["gen_embeddings.py"]))
    capped_db, free_db = database.open(tmp / "big_out" / "train_db"), database.open(out / "train_db")
    assert capped_db.paths == free_db.paths
    np.testing.assert_array_equal(capped_db[0:len(capped_db)], free_db[0:len(free_db)])
    # eval.py and query.py without the cap and with the default budget, on the capped run's database
    free_eval = [a.replace(str(out / "train_db"), str(tmp / "big_out" / "train_db"))
                 .replace(str(out / "test_db"), str(tmp / "big_out" / "test_db")) for a in argv["eval.py"]]
    free_eval[free_eval.index("--memory-budget") + 1] = "auto"
    eval_script.main(eval_script.get_args_parser().parse_args(free_eval))
    metrics = [json.loads((d / "eval" / "metrics.json").read_text()) for d in (tmp / "big_out", out)]
    assert metrics[0] == metrics[1]
    capsys.readouterr()
    free_query = [a.replace(str(out / "train_db"), str(tmp / "big_out" / "train_db")) for a in argv["query.py"]]
    query.main(query.get_args_parser().parse_args(free_query))
    assert capsys.readouterr().out == results["query.py"][0].stdout


def test_the_cap_is_smaller_than_the_database(capped):
    """The same rows as one .npy file: eval.py reads it whole, and runs out of memory under eval.py's cap."""
    tmp, _, _, caps, _ = capped
    db = database.open(tmp / "big_out" / "train_db")
    npy = tmp / "train.npy"
    embedding_io.write_embeddings(npy, db.paths, db.labels, db[0:len(db)], progress=False, model=db.model)
    argv = commands(tmp / "net.model", tmp / "big", tmp / "npy_out")["eval.py"]
    argv[argv.index("--train-embeddings") + 1] = npy
    argv[argv.index("--test-embeddings") + 1] = tmp / "big_out" / "test_db"
    result, _ = run(tmp, "eval.py", *argv, cap=caps["eval.py"])
    assert result.returncode == 2 and "out of memory" in result.stderr
