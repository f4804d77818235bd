"""train_net.py on tiny data: resnet18, 32 px, 16-d embeddings, weights=none."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import deep_rank_net
import image_data
import train_net
from conftest import REPO, write_tiny_imagenet

TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--embedding-dim", "16",
        "--batch-size", "5", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    """Train/val triplet CSVs over a 3-class miniature TinyImageNet (24 + 9 triplets)."""
    root = tmp_path_factory.mktemp("train")
    data = write_tiny_imagenet(root / "tin", n_classes=3, train_per_class=8, val_per_class=3)
    for training, name in ((1, "train.csv"), (0, "val.csv")):
        subprocess.run([sys.executable, str(REPO / "triplet_sampler.py"), "--training", str(training),
                        "--data-dir", str(data), "--num_pos_images", "1", "--num_neg_images", "1",
                        "--output", str(root / name)], check=True, capture_output=True)
    return root / "train.csv", root / "val.csv"


def run_train(*extra, check=True):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    proc = subprocess.run([sys.executable, str(REPO / "train_net.py"), *map(str, extra)], capture_output=True,
                          text=True, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def run_inprocess(capsys, *argv):
    """Run train_net's CLI in this process (fast for error cases); returns (exit code, stderr)."""
    import cli_utils

    with pytest.raises(SystemExit) as exc:
        cli_utils.run(train_net.main, train_net.get_args_parser(), [str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


def test_hinge_loss_exact_values():
    q = torch.tensor([[0.0, 0.0], [0.0, 0.0]])
    p = torch.tensor([[3.0, 4.0], [1.0, 0.0]])  # D = 5, 1
    n = torch.tensor([[0.0, 1.0], [0.0, 3.0]])  # D = 1, 3
    # max(0, 1 + 5 - 1) = 5 and max(0, 1 + 1 - 3) = 0 -> mean 2.5
    assert train_net.triplet_hinge_loss(q, p, n, 1.0).item() == pytest.approx(2.5, abs=1e-5)
    assert train_net.triplet_hinge_loss(q, p, n, 3.0).item() == pytest.approx((7 + 1) / 2, abs=1e-5)


def test_mining_picks_hardest_and_semi_hard_negatives():
    q = torch.tensor([[0.0], [10.0]])
    pool = torch.tensor([[0.0], [0.5], [2.0], [3.0], [10.0]])
    pool_labels = torch.tensor([0, 1, 1, 1, 0])
    q_labels = torch.tensor([0, 0])
    pos_dist = torch.tensor([1.0, 1.0])
    hard = train_net.mine_negatives(q, pos_dist, pool, q_labels, pool_labels, "batch-hard", 1.0)
    assert hard.tolist() == [1, 3]  # closest other-class points: 0.5 (for 0) and 3.0 (for 10)
    semi = train_net.mine_negatives(q, pos_dist, pool, q_labels, pool_labels, "semi-hard", 1.0)
    assert semi.tolist() == [2, 3]  # for q=0 the closest negative farther than D(q,p)=1 is 2.0
    none = train_net.mine_negatives(q, pos_dist, pool, q_labels, torch.zeros(5, dtype=torch.long), "batch-hard", 1.0)
    assert none.tolist() == [-1, -1]


def test_one_epoch_writes_every_output(csvs, tmp_path):
    train_csv, val_csv = csvs
    out = tmp_path / "run"
    proc = run_train("--triplets", train_csv, "--val-triplets", val_csv, "--epochs", "1", "--optim", "ADAM",
                     "--mining", "batch-hard", "--output-dir", out, *TINY)
    assert "val triplet accuracy" in proc.stdout
    for name in ("temp_0.model", "deepranknet.model", "metrics.jsonl", "training_curves.png"):
        assert (out / name).exists(), name
    record = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "epoch" and 0.0 <= record["val_triplet_accuracy"] <= 1.0
    assert record["step"] == 5  # 24 triplets / batch 5 -> the partial last batch is trained too
    ckpt = deep_rank_net.load_checkpoint(out / "deepranknet.model")
    assert ckpt["model_config"]["arch"] == "resnet18" and ckpt["model_config"]["image_size"] == 32
    # A second run into the same folder is refused, and leaves the files alone.
    before = (out / "deepranknet.model").read_bytes()
    proc = run_train("--triplets", train_csv, "--output-dir", out, *TINY, check=False)
    assert proc.returncode == 2 and "already exists" in proc.stderr
    assert (out / "deepranknet.model").read_bytes() == before


def test_resume_equals_uninterrupted_run(csvs, tmp_path):
    train_csv, val_csv = csvs
    common = ["--triplets", train_csv, "--val-triplets", val_csv, "--epochs", "2", "--optim", "sgd", "--lr", "0.05",
              *TINY]
    run_train(*common, "--output-dir", tmp_path / "a")
    run_train(*common, "--output-dir", tmp_path / "b", "--max-steps", "3")
    assert not (tmp_path / "b" / "deepranknet.model").exists()
    run_train(*common, "--output-dir", tmp_path / "b", "--resume", tmp_path / "b" / "temp_0.model")
    a = deep_rank_net.load_checkpoint(tmp_path / "a" / "deepranknet.model")
    b = deep_rank_net.load_checkpoint(tmp_path / "b" / "deepranknet.model")
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key


def test_training_step_keeps_frozen_layers_and_bn_stats(csvs, tmp_path):
    out = tmp_path / "frozen"
    torch.manual_seed(0)
    run_train("--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", "1", "--train-from", "layer4",
              "--optim", "sgd", "--lr", "0.1", "--output-dir", out, *TINY)
    trained = deep_rank_net.load_checkpoint(out / "deepranknet.model")["model"]
    torch.manual_seed(0)  # the script seeds with --seed 0 before building the model
    fresh = deep_rank_net.build_model("resnet18", 16, True, "none", "layer4").state_dict()
    for key, value in fresh.items():
        same = torch.equal(value, trained[key])
        if key.startswith(("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2",
                           "backbone.layer3")):
            assert same, f"frozen {key} changed"  # includes BatchNorm running_mean/var
    assert not torch.equal(fresh["backbone.layer4.0.conv1.weight"], trained["backbone.layer4.0.conv1.weight"])


def test_two_process_ddp_run(csvs, tmp_path):
    out = tmp_path / "ddp"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_net.py"), "--triplets", str(csvs[0]), "--val-triplets", str(csvs[1]),
                           "--epochs", "1", "--device", "cpu", "--output-dir", str(out), *TINY],
                          capture_output=True, text=True, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "deepranknet.model").exists()
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])["step"] == 3  # 5 batches over 2 ranks


def test_label_free_csv_refuses_mining_but_trains_plain(tmp_path):
    photos = tmp_path / "imported" / "images"
    photos.mkdir(parents=True)
    from conftest import class_image
    from PIL import Image
    files = []
    for i in range(6):
        f = photos / f"{i}.png"
        Image.fromarray(class_image(i % 2, i)).save(f)
        files.append(str(f))
    csv = tmp_path / "imported" / "triplets.csv"
    image_data.write_triplet_csv(csv, files[0:3], files[1:4], files[2:5])
    proc = run_train("--triplets", csv, "--mining", "batch-hard", "--output-dir", tmp_path / "o", *TINY, check=False)
    assert proc.returncode == 2 and "mining needs class labels" in proc.stderr
    proc = run_train("--triplets", csv, "--val-fraction", "0.34", "--output-dir", tmp_path / "o2", *TINY)
    assert "val triplet accuracy" in proc.stdout


@pytest.mark.parametrize("extra,message", [
    (["--margin", "0"], "positive"),
    (["--lr", "-1"], "positive"),
    (["--arch", "vgg16"], "invalid choice"),
    (["--optim", "foo"], "invalid choice"),
])
def test_bad_flags(csvs, tmp_path, capsys, extra, message):
    code, err = run_inprocess(capsys, "--triplets", csvs[0], "--output-dir", tmp_path, *TINY, *extra)
    assert code == 2 and message in err


def test_bad_files(csvs, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    missing_img = tmp_path / "missing.csv"
    missing_img.write_text("query,positive,negative\nno1.jpg,no2.jpg,no3.jpg\n")
    truncated = tmp_path / "trunc.model"
    truncated.write_bytes(b"PK\x03\x04garbage")
    cases = [
        (["--triplets", tmp_path / "nope.csv"], "not found"),
        (["--triplets", empty], "empty"),
        (["--triplets", bad], "header"),
        (["--triplets", missing_img], "no1.jpg"),
        (["--triplets", csvs[0], "--val-triplets", tmp_path / "nope.csv"], "not found"),
        (["--triplets", csvs[0], "--resume", truncated], "trunc.model"),
    ]
    for extra, message in cases:
        code, err = run_inprocess(capsys, *extra, "--output-dir", tmp_path / "o", *TINY)
        assert code == 2, (extra, err)
        assert message in err and "Traceback" not in err, (extra, err)
