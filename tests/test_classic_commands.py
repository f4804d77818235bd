"""A student's path: the classic README's commands, typed as written, in a folder holding tiny-imagenet-200/.

Only what this offline machine needs is added: ``--weights none`` (no ImageNet download) and a small
``--max-steps``. The default model (ResNet-101 at 224 px, 4096-d) runs on a 50-image sample.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

from conftest import REPO

CLASSIC = [
    ["transform_validation.py"],
    ["triplet_sampler.py", "--training", "1", "--num_pos_images", "1", "--num_neg_images", "1"],
    ["triplet_sampler.py", "--training", "0", "--num_pos_images", "1", "--num_neg_images", "1"],
    ["train_net.py", "--epochs", "1", "--optim", "sgd", "--weights", "none", "--max-steps", "2"],
    ["gen_embeddings.py"],
    ["eval.py"],
    ["query.py", "--model", "deepranknet.model", "--embeddings", "train_embedding.txt", "--top", "3", "QUERY"],
]


def run(args, cwd, check=True):
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    proc = subprocess.run([sys.executable, str(REPO / args[0]), *args[1:]], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    if check:
        assert proc.returncode == 0, f"{args}\n{proc.stdout}\n{proc.stderr}"
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc


def test_the_classic_commands_work_as_typed(tmp_path):
    run(["make_sample_data.py", "--output", "tiny-imagenet-200", "--train-per-class", "3", "--val-per-class", "2",
         "--no-progress"], tmp_path)
    query = next((tmp_path / "tiny-imagenet-200" / "train").rglob("*.JPEG"))
    outputs = {}
    for args in CLASSIC:
        args = [str(query) if a == "QUERY" else a for a in args]
        outputs[args[0]] = run(args, tmp_path)
    for name in ("training_triplet_sample.csv", "val_triplet_sample.csv", "deepranknet.model", "temp_0.model",
                 "metrics.jsonl", "training_curves.png", "config.json", "train_embedding.txt", "test_embedding.txt",
                 "eval_results/metrics.json", "eval_results/precision_at_k.png"):
        assert (tmp_path / name).exists(), name
    config = json.loads((tmp_path / "config.json").read_text())
    assert (config["arch"], config["image_size"], config["embedding_dim"]) == ("resnet101", 224, 4096)
    assert "test precision@30" in outputs["eval.py"].stdout
    best = outputs["query.py"].stdout.splitlines()[2].split()  # rank, distance, label, path
    assert best[-1].endswith(query.name) and float(best[1]) < 1e-3  # the query finds itself first
    # Every default output of the run is ignored by git in a checkout (the folder is laid out like one).
    shutil.copy(REPO / ".gitignore", tmp_path / ".gitignore")
    subprocess.run(["git", "init", "-q"], cwd=tmp_path, check=True)
    status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=tmp_path,
                            capture_output=True, text=True, check=True).stdout.split("\n")
    left = [line for line in status if line.strip() and "tiny-imagenet-200" not in line and ".gitignore" not in line]
    assert left == [], left


def test_a_run_stopped_early_names_the_checkpoint_to_pass(tmp_path):
    (tmp_path / "temp_0.model").write_bytes(b"x")
    (tmp_path / "temp_2.model").write_bytes(b"x")
    proc = run(["gen_embeddings.py"], tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1] == (
        "error: checkpoint not found: deepranknet.model (its run stopped before the end); the newest checkpoint "
        "there is temp_2.model: pass --model temp_2.model, or finish training with --resume temp_2.model")
