"""train_net.py on tiny data: resnet18, 32 px, 32-d embeddings, weights=none, a few steps.

Most runs call main() in this process (importing torch in a subprocess costs
seconds); only the 2-process DDP run uses a subprocess.
"""

import json
import os
import shlex
import shutil
import subprocess
import sys

import numpy as np
import pytest
import torch

from deepranking import cli
import deep_rank_net
from deepranking import backbones, checkpoint, image_data, losses, runtime
from deepranking.training_log import RunningStats
from deepranking.weight_average import WeightAverage
import train_net
from conftest import REPO, class_image, write_tiny_imagenet

TINY = ["--arch", "resnet18", "--weights", "none", "--image-size", "32", "--embedding-dim", "32",
        "--batch-size", "5", "--num-workers", "0", "--no-progress"]


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """One torch thread: on a shared 2-core machine, 2 threads run tiny convolutions ~5x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def csvs(tmp_path_factory):
    """Train/val triplet CSVs over a 3-class miniature TinyImageNet: 24 and 9 triplets."""
    root = tmp_path_factory.mktemp("train")
    data = write_tiny_imagenet(root / "tin", n_classes=3, train_per_class=8, val_per_class=3)
    rng = np.random.default_rng(0)

    def triplets(split: str):
        listing = image_data.list_class_folder(data / split)
        paths, labels = np.array(listing.paths), listing.labels
        q, p, n = [], [], []
        for i, label in enumerate(labels):
            same = np.flatnonzero((labels == label) & (np.arange(len(labels)) != i))
            other = np.flatnonzero(labels != label)
            q.append(paths[i]), p.append(paths[rng.choice(same)]), n.append(paths[rng.choice(other)])
        return q, p, n

    for split, name in (("train", "train.csv"), ("val", "val.csv")):
        image_data.write_triplet_csv(root / name, *triplets(split))
    return root / "train.csv", root / "val.csv"


def train(*argv):
    """Run train_net.main in this process (a success is expected)."""
    train_net.main(train_net.get_args_parser().parse_args([str(a) for a in argv]))


def fails(capsys, *argv) -> str:
    """Run the CLI in this process; assert exit status 2 and a one-line error; return stderr."""
    with pytest.raises(SystemExit) as exc:
        cli.run(train_net.main, train_net.get_args_parser(), [str(a) for a in argv])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert "Traceback" not in err
    return err


def untimed(metrics_path):
    """metrics.jsonl records without the wall-clock fields, rounded to 1e-6."""
    out = []
    for line in metrics_path.read_text().splitlines():
        r = json.loads(line)
        out.append({k: round(v, 6) if isinstance(v, float) else v for k, v in r.items()
                    if k not in ("images_per_s", "train_seconds")})
    return out


def state(path):
    return checkpoint.load_checkpoint(path)["model"]


@pytest.fixture(scope="module")
def trained(csvs, tmp_path_factory):
    """One epoch with batch-hard mining, Adam given as 'ADAM', layer4 and heads trained."""
    out = tmp_path_factory.mktemp("run")
    train("--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 1, "--optim", "ADAM", "--lr", "0.01",
          "--mining", "batch-hard", "--train-from", "layer4", "--output-dir", out, *TINY)
    return out


# --- pure functions ----------------------------------------------------------------------------


def test_scheduled_lr_warmup_and_cosine_exact_values():
    lr = train_net.scheduled_lr
    assert [lr(0.1, s, 4, "constant", 0) for s in range(4)] == [0.1] * 4
    assert [lr(0.1, s, 4, "constant", 2) for s in range(4)] == [0.05, 0.1, 0.1, 0.1]
    # cosine over 4 steps: factors (1 + cos(pi * s / 4)) / 2 = 1, 0.8536, 0.5, 0.1464; never 0 while training
    assert [lr(1.0, s, 4, "cosine", 0) for s in range(4)] == pytest.approx([1.0, 0.853553, 0.5, 0.146447], abs=1e-6)
    assert lr(1.0, 1, 4, "cosine", 4) == pytest.approx(0.5 * 0.853553, abs=1e-6)  # warm-up and decay multiply
    assert lr(1.0, 9, 4, "cosine", 0) == 0.0  # past the planned steps (a later --resume with fewer epochs)
    with pytest.raises(ValueError):
        lr(1.0, 0, 4, "step", 0)


def test_cosine_schedule_logs_decaying_lr(csvs, tmp_path):
    train("--triplets", csvs[0], "--epochs", 2, "--lr", "0.01", "--lr-schedule", "cosine", "--log-every", 1,
          "--output-dir", tmp_path, *TINY)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    total = 2 * len([r for r in steps if r["epoch"] == 1])
    assert [r["lr"] for r in steps] == pytest.approx(
        [train_net.scheduled_lr(0.01, r["step"] - 1, total, "cosine", 0) for r in steps])
    assert steps[0]["lr"] == 0.01 and 0 < steps[-1]["lr"] < 0.001
    assert all(a["train_seconds"] <= b["train_seconds"] for a, b in zip(records, records[1:]))


def test_planned_steps_rounds_a_fractional_epoch_to_a_step():
    assert train_net.planned_steps(1, 3125) == 3125
    assert train_net.planned_steps(1.2, 3125) == 3750  # 1.2 * 3125 is 3750.0000000000005 in floats
    assert train_net.planned_steps(2.5, 5) == 12  # round half to even: 12.5 -> 12
    assert train_net.planned_steps(0.01, 7) == 1  # never no step at all


def test_a_fractional_epochs_run_ends_its_schedule_part_way_into_the_last_pass(csvs, tmp_path, capsys):
    for bad in ("0", "-1.5", "nan", "1,2"):
        err = fails(capsys, "--triplets", csvs[0], "--epochs", bad, "--output-dir", tmp_path / "bad", *TINY)
        assert "error: argument --epochs: expected a positive number" in err.strip().splitlines()[-1], err
    assert not (tmp_path / "bad").exists()
    common = ["--triplets", csvs[0], "--epochs", "1.4", "--lr", "0.01", "--lr-schedule", "cosine",
              "--log-every", 1, *TINY]
    train(*common, "--output-dir", tmp_path / "whole")
    records = [json.loads(line) for line in (tmp_path / "whole" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    per_epoch = len([r for r in steps if r["epoch"] == 1])
    total = train_net.planned_steps(1.4, per_epoch)
    assert per_epoch < total < 2 * per_epoch
    assert [r["step"] for r in steps] == list(range(1, total + 1))
    assert [r["lr"] for r in steps] == pytest.approx(
        [train_net.scheduled_lr(0.01, r["step"] - 1, total, "cosine", 0) for r in steps])
    assert [(r["epoch"], r["step"]) for r in records if r["event"] == "epoch"] == [(1, per_epoch), (2, total)]
    final = tmp_path / "whole" / "deepranknet.model"
    assert checkpoint.load_checkpoint(final)["step"] == total
    assert sorted(p.name for p in (tmp_path / "whole").glob("temp_*.model")) == ["temp_0.model", "temp_1.model"]
    # stopped inside the partial epoch and resumed: the same weights as the run in one go
    train(*common, "--max-steps", per_epoch + 1, "--output-dir", tmp_path / "cut")
    train(*common, "--resume", tmp_path / "cut" / "temp_1.model", "--output-dir", tmp_path / "cut")
    resumed, whole = state(tmp_path / "cut" / "deepranknet.model"), state(final)
    assert all(torch.equal(resumed[k], whole[k]) for k in whole)


def test_a_resume_neither_skips_the_rest_of_a_partial_pass_nor_trains_past_a_shorter_epochs(csvs, tmp_path, capsys):
    common = ["--triplets", csvs[0], "--lr", "0.01", *TINY]  # a constant lr: --epochs may change on resume
    train(*common, "--epochs", "1.4", "--log-every", 1, "--output-dir", tmp_path / "a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    per_epoch = next(r["step"] for r in records if r["event"] == "epoch")
    final = tmp_path / "a" / "deepranknet.model"
    before = {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()}
    # its end is saved as the start of pass 3: going on would skip the rest of pass 2, so it is refused
    err = fails(capsys, *common, "--epochs", 3, "--resume", final, "--output-dir", tmp_path / "a")
    assert "ends a run of --epochs 1.4 part way into pass 2" in err and "start a new run for --epochs 3" in err, err
    assert {p.name: p.read_bytes() for p in (tmp_path / "a").iterdir()} == before
    # stopped 3 steps into pass 2 of --epochs 2, resumed with --epochs 1.4, which ends 2 steps into it: no more steps
    train(*common, "--epochs", 2, "--max-steps", per_epoch + 3, "--output-dir", tmp_path / "b")
    assert train_net.planned_steps(1.4, per_epoch) < per_epoch + 3
    train(*common, "--epochs", "1.4", "--resume", tmp_path / "b" / "temp_1.model", "--output-dir", tmp_path / "b")
    assert checkpoint.load_checkpoint(tmp_path / "b" / "deepranknet.model")["step"] == per_epoch + 3


def test_running_stats_average_each_key_over_the_steps_that_report_it():
    stats = RunningStats()
    t = torch.tensor
    stats.add({"loss": (t(1.0), t(1.0)), "class_loss": (t(0.0), t(1.0)), "d_pos": (t(4.0), t(2.0))})
    stats.add({"loss": (t(3.0), t(1.0)), "class_loss": (t(1.0), t(1.0)), "d_pos": (t(0.0), t(0.0))})  # no anchor
    means = stats.means()
    assert (means["loss"], means["class_loss"], means["d_pos"]) == (2.0, 0.5, 2.0)
    again = RunningStats()
    again.load_state(stats.state())  # what a checkpoint keeps of a half-finished window
    assert again.means() == means
    stats.reset()
    assert stats.means() == {}


def test_label_check_accepts_classes_and_rejects_label_free_rows():
    labels = np.array([0, 0, 1, 1])
    good = np.array([[0, 1, 2], [2, 3, 0]])
    image_data.check_labels_usable(good, labels, 2)
    with pytest.raises(cli.UserError, match="--id-loss-weight need class labels"):
        image_data.check_labels_usable(np.array([[0, 2, 3], [2, 3, 0]]), labels, 2)  # q, p differ
    with pytest.raises(cli.UserError, match="use --mining none"):
        image_data.check_labels_usable(good, np.zeros(4, dtype=np.int64), 1)  # one folder


def test_epoch_batches_partial_last_batch_seeded_and_sharded():
    batches = image_data.epoch_batches(7, 3, seed=0, epoch=0)
    assert [len(b) for b in batches] == [3, 3, 1]  # 7 triplets, batch 3 -> 3 steps, last one partial
    assert sorted(np.concatenate(batches).tolist()) == list(range(7))
    again = image_data.epoch_batches(7, 3, seed=0, epoch=0)
    assert all(np.array_equal(a, b) for a, b in zip(batches, again))
    other = np.concatenate(image_data.epoch_batches(7, 3, seed=0, epoch=1))
    assert not np.array_equal(np.concatenate(batches), other)  # a new order each epoch
    few = [image_data.epoch_batches(4, 2, 0, 0, rank, 8) for rank in range(8)]  # 2 batches, 8 ranks
    assert [len(b) for b in few] == [1] * 8  # every rank steps (DDP would hang on a rank with none)
    r0, r1 = (image_data.epoch_batches(7, 3, 0, 0, rank, 2) for rank in (0, 1))
    assert len(r0) == len(r1) == 2  # 3 batches over 2 ranks: the first is repeated to even them out
    assert np.array_equal(r0[0], batches[0]) and np.array_equal(r1[0], batches[1])


# --- full runs ---------------------------------------------------------------------------------


def test_one_epoch_writes_every_output(trained, csvs, capsys):
    for name in ("temp_0.model", "deepranknet.model", "metrics.jsonl", "training_curves.png"):
        assert (trained / name).exists(), name
    record = json.loads((trained / "metrics.jsonl").read_text().splitlines()[-1])
    assert record["event"] == "epoch" and record["step"] == 5  # 24 triplets / batch 5: partial 5th step trained
    assert record["val_triplets"] == 9 and 0.0 <= record["val_triplet_accuracy"] <= 1.0
    assert record["val_triplet_accuracy"] >= 0.5  # colour-coded classes: easy after one epoch
    for key in ("loss", "d_pos", "d_neg", "active_fraction", "images_per_s", "val_loss"):
        assert np.isfinite(record[key]), key
    ckpt = checkpoint.load_checkpoint(trained / "deepranknet.model")
    assert ckpt["model_config"] == {"arch": "resnet18", "embedding_dim": 32, "multiscale": True, "shallow": "paper",
                                    "train_from": "layer4", "image_size": 32}
    assert ckpt["args"]["optim"] == "adam" and ckpt["optimizer"] is not None and ckpt["rng"] is not None
    # A second run into the same folder is refused and leaves the files alone.
    before = (trained / "deepranknet.model").read_bytes()
    err = fails(capsys, "--triplets", csvs[0], "--val-triplets", csvs[1], "--output-dir", trained, *TINY)
    assert "deepranknet.model already exists" in err and "--force" in err
    assert (trained / "deepranknet.model").read_bytes() == before


def test_training_keeps_frozen_layers_and_bn_stats(trained):
    torched = state(trained / "deepranknet.model")
    runtime.seed_everything(0)  # the script seeds with --seed 0 before building the model
    fresh = deep_rank_net.build_model("resnet18", 32, True, "none", "layer4").state_dict()
    frozen = ("backbone.conv1", "backbone.bn1", "backbone.layer1", "backbone.layer2", "backbone.layer3")
    for key, value in fresh.items():
        if key.startswith(frozen):
            assert torch.equal(value, torched[key]), f"frozen {key} changed"  # BN running stats included
    assert not torch.equal(fresh["backbone.layer4.0.conv1.weight"], torched["backbone.layer4.0.conv1.weight"])
    assert not torch.equal(fresh["backbone.layer4.0.bn1.running_mean"], torched["backbone.layer4.0.bn1.running_mean"])
    assert not torch.equal(fresh["fuse.weight"], torched["fuse.weight"])


@pytest.mark.parametrize("loss", [[], ["--mining", "batch-hard", "--id-loss-weight", "1", "--margin", "0.2"],
                                  ["--lr-schedule", "cosine", "--warmup-steps", "2", "--shift", "0.1", "--erase", "0.5"],
                                  ["--ema-decay", "0.8"]],
                         ids=["plain", "batch-hard+id-loss", "cosine+warmup+augment", "ema"])
def test_resume_mid_epoch_equals_uninterrupted_run(csvs, tmp_path, loss):
    common = ["--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 2, "--optim", "sgd", "--lr", "0.05",
              *loss, *TINY]
    train(*common, "--output-dir", tmp_path / "a", "--num-workers", 2)  # worker processes gather the batches
    train(*common, "--output-dir", tmp_path / "b", "--max-steps", 3)
    assert not (tmp_path / "b" / "deepranknet.model").exists()
    mid = checkpoint.load_checkpoint(tmp_path / "b" / "temp_0.model")
    assert (mid["epoch"], mid["step"], mid["step_in_epoch"]) == (0, 3, 3)
    train(*common, "--output-dir", tmp_path / "b", "--resume", tmp_path / "b" / "temp_0.model")
    a = checkpoint.load_checkpoint(tmp_path / "a" / "deepranknet.model")
    b = checkpoint.load_checkpoint(tmp_path / "b" / "deepranknet.model")
    assert a["step"] == b["step"] == 10
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    assert ("class_head" in a) == ("--id-loss-weight" in loss)  # the class loss's classifier is saved for --resume
    assert ("train_model" in a) == ("--ema-decay" in loss)  # the trained weights beside their average
    if "--ema-decay" in loss:
        assert a["ema_updates"] == b["ema_updates"] == 10
        for key, value in a["train_model"].items():
            assert torch.allclose(value.float(), b["train_model"][key].float(), atol=1e-6), key
        assert not torch.allclose(a["model"]["fuse.weight"], a["train_model"]["fuse.weight"])
    assert 0 < mid["train_seconds"] < b["train_seconds"]  # training time adds up across --resume
    if "--id-loss-weight" in loss:
        assert torch.allclose(a["class_head"]["weight"], b["class_head"]["weight"], atol=1e-6)
        record = json.loads((tmp_path / "a" / "metrics.jsonl").read_text().splitlines()[-1])
        assert record["class_loss"] > 0
    # The resumed run's log is the uninterrupted one's: same records, same figures (timings aside).
    assert untimed(tmp_path / "a" / "metrics.jsonl") == untimed(tmp_path / "b" / "metrics.jsonl")
    init = checkpoint.load_checkpoint(tmp_path / "b" / "temp_0.model")  # overwritten by epoch 1's end
    assert not torch.equal(init["model"]["fuse.weight"], mid["model"]["fuse.weight"])


def test_training_over_the_cache_budget_streams_and_equals_the_cached_run(csvs, tmp_path, capsys, monkeypatch):
    """--cache-budget 0: every batch decoded in DataLoader worker processes; the same weights and log."""
    common = ["--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 1, "--lr", "0.05", *TINY]
    train(*common, "--output-dir", tmp_path / "cached")
    capsys.readouterr()
    monkeypatch.setenv("DEEP_RANK_CACHE_DIR", str(tmp_path / "empty_cache"))  # else the entry just made is reused
    train(*common, "--output-dir", tmp_path / "streamed", "--cache-budget", "0")
    assert "decoding them on the fly instead, in worker processes" in capsys.readouterr().err
    a, b = state(tmp_path / "cached" / "deepranknet.model"), state(tmp_path / "streamed" / "deepranknet.model")
    for key, value in a.items():
        assert torch.allclose(value.float(), b[key].float(), atol=1e-6), key
    assert untimed(tmp_path / "cached" / "metrics.jsonl") == untimed(tmp_path / "streamed" / "metrics.jsonl")
    assert not any((tmp_path / "empty_cache").iterdir())


def test_keep_checkpoints_keeps_the_newest_epochs_only(csvs, tmp_path):
    train("--triplets", csvs[0], "--epochs", 3, "--keep-checkpoints", 1, "--output-dir", tmp_path / "one", *TINY)
    assert sorted(p.name for p in (tmp_path / "one").glob("*.model")) == ["deepranknet.model", "temp_2.model"]
    train("--triplets", csvs[0], "--epochs", 3, "--output-dir", tmp_path / "all", *TINY)  # default: every epoch
    assert sorted(p.name for p in (tmp_path / "all").glob("temp_*.model")) == [f"temp_{e}.model" for e in range(3)]
    # The newest kept file is the run's last epoch: the same model either way.
    assert all(torch.equal(v, state(tmp_path / "all" / "temp_2.model")[k])
               for k, v in state(tmp_path / "one" / "temp_2.model").items())


def test_two_process_ddp_run(csvs, tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "train_net.py"), "--triplets", str(csvs[0]), "--val-triplets", str(csvs[1]),
                           "--epochs", "1", "--device", "cpu", "--output-dir", str(out), "--mining", "batch-hard",
                           "--id-loss-weight", "0.5", *TINY],
                          capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("wrote ") == 1  # rank 0 alone writes and prints
    assert proc.stdout.count("val triplet accuracy") == 1
    assert (out / "deepranknet.model").exists()
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    # 5 batches over 2 ranks -> 3 steps each: the last window's record, then the epoch's
    assert [(r["event"], r["step"]) for r in records] == [("train", 3), ("epoch", 3)]


def test_val_fraction_keeps_held_out_queries_out_of_training_in_every_role(capsys):
    # triplets [T, 3] of image ids: query, positive, negative
    trip = np.array([[0, 1, 9], [1, 2, 9], [2, 3, 9], [3, 0, 9], [4, 9, 5], [5, 4, 9], [6, 7, 8], [7, 6, 8],
                     [8, 9, 6], [9, 8, 7]])
    paths = [f"/data/things/{i}.png" for i in range(10)]  # one class of 10 query images
    train, val = image_data.split_by_query(trip, paths, 0.2)
    held = set(trip[val, 0])
    # image_data.heldout_images' rule: SHA-1 of "things/1.png" and "things/3.png" falls below 0.2
    assert held == {1, 3} and held == {i for i in range(10) if image_data.heldout_images(paths, 0.2)[i]}
    assert val.sum() == 2 and not (train & val).any()
    assert not np.isin(trip[train], list(held)).any()  # no held-out query trains as p or n either
    dropped = int((~train & ~val).sum())
    assert dropped > 0 and f"{dropped} of 10 training triplets use a held-out query image" in capsys.readouterr().err
    assert (train | val).sum() == 10 - dropped


def test_label_free_csv_refuses_mining_and_trains_with_val_fraction(tmp_path, capsys):
    photos = tmp_path / "imported" / "images"  # import_triplets layout: every image in one folder
    photos.mkdir(parents=True)
    from PIL import Image
    files = []
    for i in range(8):
        Image.fromarray(class_image(i % 2, i)).save(photos / f"{i}.png")
        files.append(str(photos / f"{i}.png"))
    csv = tmp_path / "imported" / "triplets.csv"
    image_data.write_triplet_csv(csv, files[0:6], files[6:7] * 6, files[7:8] * 6)  # no query is another's p/n
    err = fails(capsys, "--triplets", csv, "--mining", "semi-hard", "--output-dir", tmp_path / "o", *TINY)
    assert "--mining and --id-loss-weight need class labels from folder names" in err
    err = fails(capsys, "--triplets", csv, "--id-loss-weight", "1", "--output-dir", tmp_path / "o", *TINY)
    assert "need class labels" in err and not (tmp_path / "o").exists()
    train("--triplets", csv, "--val-fraction", "0.34", "--output-dir", tmp_path / "o2", *TINY)
    record = json.loads((tmp_path / "o2" / "metrics.jsonl").read_text().splitlines()[-1])
    # 2 of the 6 queries held out (the SHA-1 of imported/1.png and imported/2.png is below 0.34); 4 train triplets
    assert record["val_triplets"] == 2 and record["step"] == 1
    assert list(image_data.heldout_images(files[:6], 0.34)) == [False, True, True, False, False, False]

    # The search tools work on a model trained without labels (issue: imported triplets).
    from deepranking import cli as cu
    import gen_embeddings
    import get_distance
    import query

    model = tmp_path / "o2" / "deepranknet.model"
    for script, argv in ((get_distance, ["--model", model, "--image1", files[0], "--image2", files[0]]),
                         (gen_embeddings, ["--model", model, "--data-dir", tmp_path / "imported",
                                           "--train-output", tmp_path / "db.txt", "--no-progress"]),
                         (query, ["--model", model, "--embeddings", tmp_path / "db.txt", "--top", "3", files[1]])):
        capsys.readouterr()
        cu.run(script.main, script.get_args_parser(), [str(a) for a in argv])
        out = capsys.readouterr().out
        if script is get_distance:
            assert abs(float(out.strip().split()[-1])) < 1e-4  # an image is at distance 0 from itself
        if script is query:
            first = out.splitlines()[2].split()  # rank, distance, label, path of the best match
            assert first[0] == "1" and first[-1].endswith("1.png") and float(first[1]) < 1e-4  # finds itself


def nan_loss_at(monkeypatch, bad_step):
    """Make the ranking loss NaN at the steps (1-based) where bad_step(step) is true."""
    real = losses.RankingLoss.__call__
    calls = []

    def poisoned(self, emb, labels, n_triplets):
        calls.append(1)
        loss, stats = real(self, emb, labels, n_triplets)
        return (loss * float("nan") if bad_step(len(calls)) else loss), stats

    monkeypatch.setattr(losses.RankingLoss, "__call__", poisoned)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(csvs, tmp_path, capsys, monkeypatch):
    nan_loss_at(monkeypatch, lambda step: step == 3)
    out = tmp_path / "nan"
    # --log-every 1: the NaN check runs on log steps (the only steps that sync with a GPU) and before saves
    err = fails(capsys, "--triplets", csvs[0], "--save-every", 1, "--log-every", 1, "--output-dir", out, *TINY)
    assert "training without validation" in err  # no val_triplet_sample.csv next to the CSV
    assert "the loss became NaN/inf by step 3" in err and "the last good checkpoint is" in err
    assert "temp_0.model" in err.splitlines()[-1]
    ckpt = checkpoint.load_checkpoint(out / "temp_0.model")
    assert ckpt["step"] == 2 and checkpoint.weights_finite(ckpt["model"])
    assert not (out / "deepranknet.model").exists()


def test_nan_between_log_steps_never_reaches_a_checkpoint(csvs, tmp_path, capsys, monkeypatch):
    nan_loss_at(monkeypatch, lambda step: step >= 2)
    out = tmp_path / "nan"
    err = fails(capsys, "--triplets", csvs[0], "--log-every", 100, "--output-dir", out, *TINY)
    assert "the loss became NaN/inf by step 5" in err and "no checkpoint was written" in err
    assert not list(out.glob("*.model"))  # the epoch's end found the NaN before writing temp_0.model


@pytest.mark.parametrize("extra,message", [
    (["--margin", "0"], "expected a positive number"),
    (["--lr", "-1"], "expected a positive number"),
    (["--arch", "vgg17"], "unknown architecture 'vgg17' (did you mean vgg19 or vgg16 or vgg13?)"),
    (["--train-from", "layer9"], "unknown train_from stage 'layer9'"),
    (["--optim", "foo"], "invalid choice"),
    (["--mining", "hard"], "invalid choice"),
    (["--id-loss-weight", "-1"], "expected a non-negative number"),
    (["--lr-schedule", "step"], "invalid choice"),
    (["--warmup-steps", "-3"], "expected a non-negative integer"),
    (["--momentum", "-1"], "expected a fraction in [0, 1)"),
    (["--momentum", "1"], "expected a fraction in [0, 1)"),
    (["--weight-decay", "-1"], "expected a non-negative number"),
    (["--image-size", "1"], "expected an integer >= 32"),
    (["--collapse-distance", "nan"], "expected a non-negative number"),
    (["--id-loss-scale", "0"], "expected a positive number"),
    (["--id-loss-margin", "1"], "expected a fraction in [0, 1)"),
    (["--id-loss-smoothing", "-0.1"], "expected a fraction in [0, 1)"),
    (["--ema-decay", "1"], "expected a fraction in [0, 1)"),
    (["--erase", "1.5"], "expected a probability in [0, 1], got 1.5"),
    (["--erase", "often"], "expected a probability in [0, 1], got 'often'"),
    (["--seed", "-1"], "expected a seed"),
    (["--seed", str(2**64)], "expected a seed"),
    (["--lr", "1e39"], "expected a positive number below 3.4e+38, got 1e39"),  # float32 overflow in the step
    (["--weight-decay", "1e300"], "below 3.4e+38"),
])
def test_bad_flags(csvs, tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as exc:
        train_net.get_args_parser().parse_args(["--triplets", str(csvs[0]), *TINY, *extra])
    assert exc.value.code == 2 and message in capsys.readouterr().err


def test_optim_names_are_case_insensitive():
    parse = train_net.get_args_parser().parse_args
    assert [parse(["--optim", name]).optim for name in ("SGD", "Adam", "AdamW", "rms")] == ["sgd", "adam", "adamw",
                                                                                           "rms"]


def test_adam_decays_through_the_gradient_adamw_apart_from_it():
    # One step on a weight of 1 with a zero gradient: Adam's L2 term is the whole gradient, so
    # its normalised step is the full lr; AdamW shrinks the weight by lr * decay and nothing else.
    def step(optim):
        w = torch.nn.Parameter(torch.ones(1))
        args = train_net.get_args_parser().parse_args(["--optim", optim, "--lr", "0.1", "--weight-decay", "0.01"])
        opt = train_net.build_optimizer(args, [w])
        w.grad = torch.zeros(1)
        opt.step()
        return w.item(), type(opt)

    assert step("adam") == (pytest.approx(1 - 0.1, abs=1e-6), torch.optim.Adam)
    assert step("adamw") == (pytest.approx(1 - 0.1 * 0.01, abs=1e-7), torch.optim.AdamW)


@pytest.mark.parametrize("optim", ["adam", "adamw"])
def test_fused_adam_trains_a_channels_last_conv_as_torch_reference_adam_does(optim):
    # build_optimizer's fused Adam against torch's for-loop implementation, on a channels_last
    # conv net trained through autograd (with the taps of PaddingSkippingConv2d left out at 1x1).
    def train(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        net = torch.nn.Sequential(backbones.PaddingSkippingConv2d(3, 8, 3, padding=1), torch.nn.ReLU(),
                                  torch.nn.Conv2d(8, 4, 3, stride=2, padding=1))
        net = net.to(memory_format=torch.channels_last)
        args = train_net.get_args_parser().parse_args(["--optim", optim, "--lr", "0.01", "--weight-decay", "0.01"])
        opt = (train_net.build_optimizer(args, net.parameters()) if fused else
               (torch.optim.Adam if optim == "adam" else torch.optim.AdamW)(
                   net.parameters(), lr=0.01, weight_decay=0.01, foreach=False))
        for step in range(5):
            x = torch.randn(6, 3, 1 + step % 3 * 4, 5).to(memory_format=torch.channels_last)  # 1, 5, 9 rows
            opt.zero_grad()
            net(x).square().mean().backward()
            opt.step()
        return [p.detach().clone() for p in net.parameters()]

    for fused, reference in zip(train(True), train(False)):
        torch.testing.assert_close(fused, reference, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("optim", ["sgd", "adam", "adamw", "rms"])
def test_each_optimizer_updates_a_channels_last_weight_whose_gradient_is_nchw(optim):
    # The net's conv weights are channels_last; a gradient in the other layout must still give
    # each element its own update (torch 2.14's fused CPU Adam alone would not: build_optimizer's
    # step pre-hook gives the gradient its weight's layout first).
    torch.manual_seed(0)
    args = train_net.get_args_parser().parse_args(["--optim", optim, "--lr", "0.1", "--momentum", "0"])
    start, grad = torch.randn(4, 3, 3, 3), torch.randn(4, 3, 3, 3)
    moved = {}
    for layout in (torch.contiguous_format, torch.channels_last):
        w = torch.nn.Parameter(start.clone(memory_format=layout))
        opt = train_net.build_optimizer(args, [w])
        w.grad = grad.clone()  # NCHW
        opt.step()
        moved[layout] = (start - w.detach()).contiguous()
    torch.testing.assert_close(moved[torch.channels_last], moved[torch.contiguous_format])
    if optim == "sgd":
        torch.testing.assert_close(moved[torch.channels_last], 0.1 * grad)
    if optim in ("adam", "adamw"):  # the first Adam step moves every element by lr against its gradient's sign
        torch.testing.assert_close(moved[torch.channels_last], 0.1 * grad.sign(), rtol=0, atol=1e-6)


def test_weight_average_folds_each_step_in_by_hand():
    # decay 0.75: the first update copies, then average = 0.75 * average + 0.25 * weights for floats
    # (BatchNorm running statistics included); the integer step counter is copied.
    net = torch.nn.Sequential(torch.nn.Linear(2, 1, bias=False), torch.nn.BatchNorm1d(1))
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[2.0, -4.0]]))
    avg = WeightAverage(net, 0.75)
    avg.update(net)
    with torch.no_grad():
        net[0].weight.copy_(torch.tensor([[6.0, 0.0]]))
        net[1].running_mean.fill_(2.0)
        net[1].num_batches_tracked.fill_(5)
    avg.update(net)
    assert avg.module[0].weight.tolist() == [[3.0, -3.0]]
    assert avg.module[1].running_mean.tolist() == [0.5]
    assert int(avg.module[1].num_batches_tracked) == 5 and avg.updates == 2
    assert not avg.module[0].weight.requires_grad and net[0].weight.requires_grad  # the copy is never trained
    assert net[0].weight.tolist() == [[6.0, 0.0]]  # the net is left as it was


def test_ema_checkpoint_embeds_with_the_average_and_validates_it(csvs, tmp_path):
    """--ema-decay: "model" holds the average (what every later stage loads, and what validation scored),
    "train_model" the weights being trained."""
    import gen_embeddings
    from deepranking.embedding_io import read_embeddings

    out = tmp_path / "run"
    train("--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 1, "--lr", "0.05", "--output-dir", out,
          "--ema-decay", "0.5", *TINY)
    ckpt = checkpoint.load_checkpoint(out / "deepranknet.model")
    assert ckpt["ema_updates"] == 5 and ckpt["args"]["ema_decay"] == 0.5  # 24 triplets in batches of 5
    assert not torch.allclose(ckpt["model"]["fuse.weight"], ckpt["train_model"]["fuse.weight"])
    q, p, _ = (np.array(col) for col in image_data.read_triplet_csv(csvs[1]))
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    for weights, d_pos in (("model", epoch["val_d_pos"]), ("train_model", None)):
        model = tmp_path / f"{weights}.model"
        torch.save({**ckpt, "model": ckpt[weights]}, model)
        emb_file = tmp_path / f"{weights}.txt"
        cli.run(gen_embeddings.main, gen_embeddings.get_args_parser(),
                ["--model", str(model), "--data-dir", str(csvs[0].parent / "tin"), "--splits", "val",
                 "--test-output", str(emb_file), "--no-progress", "--device", "cpu"])
        db = read_embeddings(emb_file, progress=False)
        row = {path: i for i, path in enumerate(db.paths)}
        e = db.emb.astype(np.float64)
        measured = np.linalg.norm(e[[row[x] for x in q]] - e[[row[x] for x in p]], axis=1).mean()
        if d_pos is not None:  # validation scored the average
            assert measured == pytest.approx(d_pos, abs=1e-5)
        else:
            assert measured != pytest.approx(epoch["val_d_pos"], abs=1e-5)


def test_bad_inputs_exit_2_with_one_line(csvs, trained, tmp_path, capsys):
    empty = tmp_path / "empty.csv"
    empty.write_text("")
    header_only = tmp_path / "header.csv"
    header_only.write_text("query,positive,negative\n")
    bad = tmp_path / "bad.csv"
    bad.write_text("a,b\n1,2\n")
    four = tmp_path / "four.csv"  # every row one field too many: pandas would shift the columns
    four.write_text("query,positive,negative\na,b,c,d\ne,f,g,h\n")
    missing_img = tmp_path / "missing.csv"
    missing_img.write_text("query,positive,negative\nno1.jpg,no2.jpg,no3.jpg\n")
    self_pos = tmp_path / "self_pos.csv"  # the query as its own positive: "right" for any model
    self_pos.write_text("query,positive,negative\na.jpg,b.jpg,c.jpg\nd.jpg,./d.jpg,c.jpg\nd.jpg,d.jpg,e.jpg\n")
    self_neg = tmp_path / "self_neg.csv"  # ... as its own negative: "wrong" for any model
    self_neg.write_text("query,positive,negative\na.jpg,b.jpg,a.jpg\n")
    corrupt_dir = tmp_path / "c"
    corrupt_dir.mkdir()
    (corrupt_dir / "broken.jpg").write_bytes(b"\xff\xd8\xff garbage")
    corrupt = corrupt_dir / "corrupt.csv"
    q, p, n = image_data.read_triplet_csv(csvs[0])
    image_data.write_triplet_csv(corrupt, [q[0], q[1]], [p[0], str(corrupt_dir / "broken.jpg")], [n[0], n[1]])
    truncated = tmp_path / "trunc.model"
    truncated.write_bytes((trained / "temp_0.model").read_bytes()[:1000])
    cases = [
        (["--triplets", tmp_path / "nope.csv"], "triplet CSV not found"),
        (["--triplets", empty], "empty"),
        (["--triplets", header_only], "no triplets"),
        (["--triplets", bad], "header"),
        (["--triplets", four], "line 2 has more fields than the header's 3"),
        (["--triplets", missing_img], "no1.jpg"),
        (["--triplets", self_pos], "2 triplet(s) use the query image as its own positive, the first on line 3"),
        (["--triplets", csvs[0], "--val-triplets", self_neg], "1 triplet(s) use the query image as its own negative"),
        (["--triplets", corrupt], "broken.jpg"),
        (["--triplets", csvs[0], "--val-triplets", tmp_path / "nope.csv"], "validation triplet CSV not found"),
        (["--triplets", csvs[0], "--resume", truncated], "trunc.model"),
        (["--triplets", csvs[0], "--resume", trained / "temp_0.model", "--embedding-dim", "16"],
         "--embedding-dim 32"),
        (["--triplets", csvs[0], "--resume", trained / "temp_0.model", "--arch", "resnet34"], "--arch resnet18"),
    ]
    for extra, message in cases:
        out = tmp_path / "o"
        err = fails(capsys, *TINY, "--output-dir", out, *extra)
        assert message in err, (extra, err)
        assert not out.exists() or not any(out.iterdir()), (extra, list(out.iterdir()))


@pytest.mark.parametrize("edit, message", [
    (lambda c: c.pop("epoch"), "holds no training state (epoch, step)"),
    (lambda c: c.update(epoch=-3), "epoch is -3, expected a non-negative integer"),
    (lambda c: c.update(step="abc"), "step is 'abc', expected a non-negative integer"),
    (lambda c: c.update(train_seconds=float("nan")), "train_seconds is nan"),
    (lambda c: c.update(args=[1, 2]), "args is [1, 2], expected a dict"),
    (lambda c: c["model_config"].pop("arch"), "model_config is {"),
    (lambda c: c["preprocessing"].update(cache_size="abc"), "preprocessing record is invalid"),
    (lambda c: c.update(rng={"torch": 1}), "malformed random-number or statistics state"),
    (lambda c: c.update(stats={"epoch": 5}), "malformed random-number or statistics state"),
    # past the epoch's end: would have run an empty epoch and written a "finished" model
    (lambda c: c.update(step_in_epoch=10**6), "at step 1000000 of an epoch that has 5 steps here"),
    # another version's --val-fraction split of the same CSV: other batches, another schedule length
    (lambda c: c["run"].update(train_triplets=3), "was trained on 3 training triplets, this run has"),
])
def test_resume_of_a_malformed_training_checkpoint_is_refused(trained, csvs, tmp_path, capsys, edit, message):
    ckpt = checkpoint.load_checkpoint(trained / "temp_0.model")
    edit(ckpt)
    path = tmp_path / "edited.model"
    torch.save(ckpt, path)
    out = tmp_path / "o"
    err = fails(capsys, "--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 1, "--optim", "adam",
                "--lr", "0.01", "--mining", "batch-hard", "--train-from", "layer4", *TINY, "--resume", path,
                "--output-dir", out)
    assert message in err and str(path) in err, err
    assert not out.exists() or not any(out.iterdir())


def test_a_run_whose_checkpoints_will_not_fit_on_the_disk_is_warned_after_its_first_one(csvs, tmp_path, capsys,
                                                                                          monkeypatch):
    """Every epoch's file is kept by default: a 60-epoch run filled this machine's disk at epoch 59."""
    import shutil
    from collections import namedtuple

    real = shutil.disk_usage
    size = []

    def small_disk(path):
        free = 2.5 * size[0] if size else real(path).free  # room for two more files, not three
        return namedtuple("usage", "total used free")(free, 0, free)

    monkeypatch.setattr(shutil, "disk_usage", small_disk)
    real_save = checkpoint.write_checkpoint

    def measuring(path, ckpt):
        real_save(path, ckpt)
        size.append(os.path.getsize(path))

    monkeypatch.setattr(checkpoint, "write_checkpoint", measuring)
    train("--triplets", csvs[0], "--epochs", 3, "--output-dir", tmp_path / "a", *TINY)
    err = capsys.readouterr().err
    assert err.count("will write 3 more") == 1 and "--keep-checkpoints N keeps only the newest N" in err
    train("--triplets", csvs[0], "--epochs", 3, "--keep-checkpoints", 1, "--output-dir", tmp_path / "b", *TINY)
    assert "will write" not in capsys.readouterr().err  # 1 kept + the final one: 2 files fit


def test_a_cache_smaller_than_the_net_input_is_warned_about(csvs, tmp_path, capsys):
    train("--triplets", csvs[0], "--max-steps", 1, "--cache-size", 8, "--output-dir", tmp_path, *TINY)
    assert "warning: --cache-size 8 is below --image-size 32: the net sees every image upsampled from 8 px" \
        in capsys.readouterr().err


def test_time_limit_stops_with_a_resumable_checkpoint(csvs, tmp_path, capsys):
    train("--triplets", csvs[0], "--epochs", 3, "--time-limit", "0.001", "--output-dir", tmp_path, *TINY)
    assert "continue with --resume" in capsys.readouterr().out
    ckpt = checkpoint.load_checkpoint(tmp_path / "temp_0.model")
    assert (ckpt["step"], ckpt["step_in_epoch"]) == (1, 1)  # one step, then the limit
    assert not (tmp_path / "deepranknet.model").exists()


def test_force_removes_the_earlier_runs_model(trained, csvs, tmp_path):
    out = tmp_path / "again"
    shutil.copytree(trained, out)
    assert (out / "deepranknet.model").exists()
    train("--triplets", csvs[0], "--epochs", 3, "--time-limit", "0.001", "--force", "--output-dir", out, *TINY)
    # stopped after one step: no final model, and temp_0.model is this run's, not the earlier one's
    assert not (out / "deepranknet.model").exists() and not (out / "training_curves.png").exists()
    assert checkpoint.load_checkpoint(out / "temp_0.model")["step"] == 1
    assert not (out / "metrics.jsonl").exists()  # the earlier log is gone; one step wrote no record yet


def test_no_run_overwrites_a_folder_holding_another_runs_files(trained, csvs, tmp_path, capsys):
    # config.json or the curves of something else (--output-dir defaults to "."), then a finished
    # run that another run's checkpoint is resumed into: each is refused and left byte for byte
    other = tmp_path / "other"
    other.mkdir()
    (other / "config.json").write_text('{"mine": 1}\n')
    (other / "training_curves.csv").write_text("precious\n")
    err = fails(capsys, "--triplets", csvs[0], "--output-dir", other, "--max-steps", 1, *TINY)
    assert "config.json already exists from an earlier run" in err and "--force" in err
    assert sorted(p.name for p in other.iterdir()) == ["config.json", "training_curves.csv"]
    assert (other / "config.json").read_text() == '{"mine": 1}\n'

    finished = tmp_path / "finished"
    shutil.copytree(trained, finished)
    before = {p.name: p.read_bytes() for p in finished.iterdir()}
    ckpt = tmp_path / "elsewhere" / "temp_0.model"
    ckpt.parent.mkdir()
    shutil.copy(trained / "temp_0.model", ckpt)
    err = fails(capsys, "--triplets", csvs[0], "--val-triplets", csvs[1], "--optim", "adam", "--lr", "0.01",
                "--mining", "batch-hard", "--train-from", "layer4", *TINY, "--resume", ckpt, "--output-dir", finished)
    assert f"already holds a run's checkpoints: to continue that run, --resume {finished / 'deepranknet.model'}" in err
    assert {p.name: p.read_bytes() for p in finished.iterdir()} == before
    # a folder with only another run's log: the checkpoint's own folder is the place to resume in
    logged = tmp_path / "logged"
    logged.mkdir()
    (logged / "metrics.jsonl").write_text("{}\n")
    err = fails(capsys, "--triplets", csvs[0], "--val-triplets", csvs[1], "--optim", "adam", "--lr", "0.01",
                "--mining", "batch-hard", "--train-from", "layer4", *TINY, "--resume", ckpt, "--output-dir", logged)
    assert "metrics.jsonl already exists from another run" in err and f"--output-dir {ckpt.parent}" in err


def test_resume_never_mixes_two_trajectories_in_one_folder(csvs, tmp_path, capsys):
    """An older checkpoint resumed in its own folder overwrote the later ones and cut metrics.jsonl;
    --force into another run's folder kept that run's deepranknet.model and records beside this one's."""
    import json

    run = tmp_path / "run"
    train("--triplets", csvs[0], "--epochs", 3, "--log-every", 1, "--output-dir", run, *TINY)
    per_epoch = checkpoint.load_checkpoint(run / "temp_0.model")["step"]
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    again = ["--triplets", csvs[0], "--epochs", 3, "--log-every", 1, *TINY, "--resume", run / "temp_0.model"]
    err = fails(capsys, *again, "--output-dir", run, "--max-steps", per_epoch + 1)
    assert ("holds checkpoints written after temp_0.model (deepranknet.model, temp_1.model, temp_2.model)" in err
            and f"--resume {run / 'deepranknet.model'}" in err and "--force" in err)
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before
    # Into another run's folder with --force: nothing of that run is left to pass for this one's.
    other = tmp_path / "other"
    shutil.copytree(run, other)
    train(*again, "--output-dir", other, "--max-steps", per_epoch + 1, "--force")
    assert sorted(p.name for p in other.glob("*.model")) == ["temp_1.model"]
    steps = [json.loads(line)["step"] for line in (other / "metrics.jsonl").read_text().splitlines()]
    assert steps and min(steps) > per_epoch
    # In place with --force: back to temp_0, the later checkpoints removed, the log cut at its step.
    train(*again, "--output-dir", run, "--max-steps", per_epoch + 1, "--force")
    assert sorted(p.name for p in run.glob("*.model")) == ["temp_0.model", "temp_1.model"]
    assert checkpoint.load_checkpoint(run / "temp_1.model")["step"] == per_epoch + 1
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == per_epoch + 1 and steps == sorted(steps)


def test_every_hyperparameter_constant_is_a_flag_default_and_booleans_go_both_ways():
    parse = train_net.get_args_parser().parse_args
    defaults = parse([])
    block = {name: value for name, value in vars(train_net).items()
             if name.isupper() and (value is None or isinstance(value, (int, float, str, bool)))
             and not name.endswith("_NAME")
             and name not in ("DEFAULT_VAL_TRIPLETS",)}
    flag_of = {"LEARNING_RATE": "lr", "OPTIMIZER": "optim"}
    assert "CACHE_BUDGET" in block and "SHIFT" in block
    for name, value in block.items():
        assert getattr(defaults, flag_of.get(name, name.lower())) == value, name
    for flag in ("nesterov", "deterministic", "compile"):
        assert getattr(parse([f"--{flag}"]), flag) is True
        assert getattr(parse([f"--no-{flag}"]), flag) is False
    # the old spellings still work
    assert parse(["--single-scale"]).shallow == parse(["--no-multiscale"]).shallow == "none"
    assert parse(["--multiscale"]).shallow == "paper" == parse([]).shallow


def _kill_mid_epoch(cmd, ckpt, timeout=120):
    """Start cmd, SIGKILL it as soon as ``ckpt`` exists (a mid-epoch save), return the exit code."""
    import signal as sig
    import time

    # one thread, as this process: the float sums of 2 threads would differ in the last bits
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + timeout
    while not ckpt.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    proc.send_signal(sig.SIGKILL)
    proc.communicate()
    return proc.returncode


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted_run(csvs, tmp_path):
    """A kill -9 mid-epoch: --resume gives the uninterrupted run's weights, optimizer and metrics.jsonl."""
    common = ["--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 2, "--optim", "sgd", "--lr", "0.05",
              "--log-every", 1, "--save-every", 2, *TINY]
    train(*common, "--output-dir", tmp_path / "a")
    run_b = tmp_path / "b"
    cmd = [sys.executable, str(REPO / "train_net.py"), *map(str, common), "--output-dir", str(run_b)]
    rc = _kill_mid_epoch(cmd, run_b / "temp_0.model")
    assert rc == -9
    mid = checkpoint.load_checkpoint(run_b / "temp_0.model")
    assert mid["step_in_epoch"] > 0  # killed inside epoch 1, after a --save-every checkpoint
    (run_b / ".temp_0.model.abc123.tmp").write_bytes(b"partial")  # what a kill during a save leaves
    train(*common, "--output-dir", run_b, "--resume", run_b / "temp_0.model")
    assert not list(run_b.glob(".*.tmp"))  # stale partial files are cleaned at start
    a = checkpoint.load_checkpoint(tmp_path / "a" / "deepranknet.model")
    b = checkpoint.load_checkpoint(run_b / "deepranknet.model")
    for key, value in a["model"].items():
        assert torch.allclose(value.float(), b["model"][key].float(), atol=1e-6), key
    for pa, pb in zip(a["optimizer"]["state"].values(), b["optimizer"]["state"].values()):
        assert torch.allclose(pa["momentum_buffer"], pb["momentum_buffer"], atol=1e-6)
    assert untimed(tmp_path / "a" / "metrics.jsonl") == untimed(run_b / "metrics.jsonl")  # no record twice


def test_resume_refuses_a_different_run(csvs, trained, tmp_path, capsys):
    ckpt = trained / "temp_0.model"
    base = ["--triplets", csvs[0], "--val-triplets", csvs[1], "--optim", "adam", "--lr", "0.01", "--mining",
            "batch-hard", "--train-from", "layer4", "--resume", ckpt, *TINY]
    changed = tmp_path / "changed.csv"
    rows = csvs[0].read_text().splitlines()
    changed.write_text("\n".join([rows[0], *rows[2:], rows[1]]) + "\n")  # same triplets, another order
    cases = [
        (["--lr", "0.02"], "resume with: --lr 0.01"),
        (["--margin", "0.5"], "--margin 1.0"),
        (["--shallow", "classic"], "--shallow paper"),
        (["--warmup-steps", "5"], "--warmup-steps 0"),
        (["--lr-schedule", "cosine"], "--lr-schedule constant"),
        (["--id-loss-smoothing", "0.1"], "--id-loss-smoothing 0.0"),
        (["--cache-size", "24"], "--cache-size 0"),
        (["--triplets", changed], "--triplets differs from the one"),
    ]
    for extra, message in cases:
        out = tmp_path / "o"
        err = fails(capsys, *base, "--output-dir", out, *extra)
        assert message in err, (extra, err)
        assert not out.exists(), extra
    # the cosine schedule's length is --epochs: a different --epochs is another trajectory
    out = tmp_path / "cos"
    train("--triplets", csvs[0], "--epochs", 2, "--lr-schedule", "cosine", "--max-steps", 2, "--output-dir", out, *TINY)
    err = fails(capsys, "--triplets", csvs[0], "--epochs", 3, "--lr-schedule", "cosine", "--resume",
                out / "temp_0.model", "--output-dir", out, *TINY)
    assert "--epochs 2" in err
    # a checkpoint written by 2 processes cannot continue in 1
    two = checkpoint.load_checkpoint(out / "temp_0.model")
    two["run"]["world_size"] = 2
    checkpoint.write_checkpoint(tmp_path / "two.model", two)
    err = fails(capsys, "--triplets", csvs[0], "--epochs", 2, "--lr-schedule", "cosine", "--resume",
                tmp_path / "two.model", "--output-dir", out, *TINY)
    assert "torchrun --nproc_per_node 2" in err
    # --shift: a checkpoint from before the flag existed trained without it
    old = checkpoint.load_checkpoint(out / "temp_0.model")
    del old["args"]["shift"]
    checkpoint.write_checkpoint(tmp_path / "old.model", old)
    err = fails(capsys, "--triplets", csvs[0], "--epochs", 2, "--lr-schedule", "cosine", "--shift", "0.2",
                "--resume", tmp_path / "old.model", "--output-dir", out, *TINY)
    assert "--shift 0.0" in err


def test_time_limit_counts_the_whole_run_like_max_steps(csvs, tmp_path, capsys):
    out = tmp_path / "t"
    train("--triplets", csvs[0], "--epochs", 3, "--max-steps", 2, "--output-dir", out, *TINY)
    spent = checkpoint.load_checkpoint(out / "temp_0.model")["train_seconds"]
    # the run has already trained longer than this limit: it stops again at once, without a step
    train("--triplets", csvs[0], "--epochs", 3, "--time-limit", spent / 2, "--resume", out / "temp_0.model",
          "--output-dir", out, *TINY)
    assert checkpoint.load_checkpoint(out / "temp_0.model")["step"] == 2
    assert "stopped after 2 steps (--time-limit); continue with --resume" in capsys.readouterr().out


@pytest.mark.parametrize("signame, code", [("SIGINT", 130), ("SIGTERM", 143)])
def test_ctrl_c_stops_after_the_step_with_a_resumable_checkpoint(csvs, tmp_path, signame, code):
    """Ctrl-C, and SIGTERM as a batch scheduler sends before it preempts a job."""
    import signal as sig
    import time

    out = tmp_path / "int"
    cmd = [sys.executable, str(REPO / "train_net.py"), "--triplets", str(csvs[0]), "--epochs", "1000",
           "--log-every", "1", "--output-dir", str(out), *TINY]
    proc = subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    metrics = out / "metrics.jsonl"
    while (not metrics.exists() or metrics.stat().st_size == 0) and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(getattr(sig, signame))
    stdout, stderr = proc.communicate(timeout=120)
    assert proc.returncode == code, stderr
    assert "Traceback" not in stderr
    assert "(interrupted); continue with --resume" in stdout
    ckpt = checkpoint.load_checkpoint(out / "temp_0.model")
    assert ckpt["step"] >= 1


def test_fp16_goes_through_the_grad_scaler(csvs, tmp_path, monkeypatch):
    """The fp16 branch (GPUs without bf16) on the CPU: loss scaling on, its state saved for --resume."""
    from deepranking import runtime

    monkeypatch.setattr(runtime, "resolve_precision",
                        lambda device, amp="auto", dtype=None: runtime.Precision(torch.float16, "cpu"))
    out = tmp_path / "fp16"
    train("--triplets", csvs[0], "--max-steps", 3, "--output-dir", out, *TINY)
    ckpt = checkpoint.load_checkpoint(out / "temp_0.model")
    assert ckpt["grad_scaler"]["scale"] > 0 and "_growth_tracker" in ckpt["grad_scaler"]
    assert checkpoint.weights_finite(ckpt["model"])
    assert runtime.Precision(torch.float16, "cuda").needs_loss_scaling
    assert not runtime.Precision(torch.bfloat16, "cuda").needs_loss_scaling


def test_config_json_records_the_resolved_run(trained):
    config = json.loads((trained / "config.json").read_text())
    assert config["device"] == "cpu" and config["precision"] == "fp32" and config["world_size"] == 1
    assert config["preprocessing"]["cache_size"] == 32 and config["optim"] == "adam"


def test_every_stage_embeds_an_image_as_training_validated_it(csvs, tmp_path):
    """The preprocessing contract: the cache size chosen in training (24 px here, from 32 px files) is the one
    gen_embeddings.py, query.py and get_distance.py use, so their vectors are validation's."""
    from deepranking import cli as cu
    from deepranking.embedding_io import read_embeddings
    import gen_embeddings
    import get_distance
    import query

    out = tmp_path / "run"
    train("--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 1, "--cache-size", 24, "--output-dir", out,
          *TINY)
    model = out / "deepranknet.model"
    assert checkpoint.load_checkpoint(model)["preprocessing"]["cache_size"] == 24
    data = csvs[0].parent / "tin"
    emb_file = tmp_path / "val.txt"
    cu.run(gen_embeddings.main, gen_embeddings.get_args_parser(),
           ["--model", str(model), "--data-dir", str(data), "--splits", "val", "--test-output", str(emb_file),
            "--no-progress", "--device", "cpu"])
    db = read_embeddings(emb_file, progress=False)
    row = {p: i for i, p in enumerate(db.paths)}
    # training's own validation pass, recomputed from the file: the same mean D(q,p) and D(q,n)
    epoch = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()][-1]
    q, p, n = (np.array([row[x] for x in col]) for col in image_data.read_triplet_csv(csvs[1]))
    e = db.emb.astype(np.float64)
    assert np.linalg.norm(e[q] - e[p], axis=1).mean() == pytest.approx(epoch["val_d_pos"], abs=1e-5)
    assert np.linalg.norm(e[q] - e[n], axis=1).mean() == pytest.approx(epoch["val_d_neg"], abs=1e-5)
    a, b = db.paths[0], db.paths[-1]
    expected = float(np.linalg.norm(e[0] - e[-1]))
    import io
    import contextlib
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cu.run(get_distance.main, get_distance.get_args_parser(),
               ["--model", str(model), "--image1", a, "--image2", b, "--device", "cpu"])
    assert float(buf.getvalue().split()[-1]) == pytest.approx(expected, abs=1e-5)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        cu.run(query.main, query.get_args_parser(),
               ["--model", str(model), "--embeddings", str(emb_file), "--top", "1", "--device", "cpu", a])
    best = buf.getvalue().splitlines()[2].split()  # rank, distance, label, path
    assert best[-1].endswith(os.path.basename(a)) and float(best[1]) < 1e-3


def test_pk_batches_train_with_batch_hard_and_resume_exactly(csvs, tmp_path, capsys):
    """--batch-sampler pk: P classes x K images per step (3 x 4 here), batch-hard mining, exact resume."""
    common = ["--triplets", csvs[0], "--val-triplets", csvs[1], "--epochs", 2, "--batch-sampler", "pk",
              "--pk-classes", 3, "--pk-images", 4, "--mining", "batch-hard", "--margin", "0.2", "--optim", "adam",
              "--lr", "0.01", "--log-every", 1, *TINY]
    train(*common, "--output-dir", tmp_path / "a")
    records = [json.loads(line) for line in (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if r["event"] == "train"]
    assert len(steps) == 2 * 2  # 24 training images / (3 x 4) = 2 steps an epoch
    assert all("triplet_loss" not in r and r["mined_fraction"] == 1.0 for r in steps)  # every image an anchor
    assert records[-1]["val_triplet_accuracy"] >= 0.5
    train(*common, "--output-dir", tmp_path / "b", "--max-steps", 3)
    train(*common, "--output-dir", tmp_path / "b", "--resume", tmp_path / "b" / "temp_1.model")
    a = checkpoint.load_checkpoint(tmp_path / "a" / "deepranknet.model")
    b = checkpoint.load_checkpoint(tmp_path / "b" / "deepranknet.model")
    assert all(torch.allclose(a["model"][k].float(), b["model"][k].float(), atol=1e-6) for k in a["model"])
    assert untimed(tmp_path / "a" / "metrics.jsonl") == untimed(tmp_path / "b" / "metrics.jsonl")
    err = fails(capsys, "--triplets", csvs[0], "--batch-sampler", "pk", "--output-dir", tmp_path / "c", *TINY)
    assert "--batch-sampler pk needs --mining batch-hard or semi-hard" in err


def test_shallow_geometry_is_recorded_and_resumed(csvs, tmp_path):
    train("--triplets", csvs[0], "--max-steps", 1, "--shallow", "classic", "--output-dir", tmp_path, *TINY)
    ckpt = checkpoint.load_checkpoint(tmp_path / "temp_0.model")
    assert ckpt["model_config"]["shallow"] == "classic" and "shallow1.weight" in ckpt["model"]
    train("--triplets", csvs[0], "--max-steps", 2, "--shallow", "classic", "--resume", tmp_path / "temp_0.model",
          "--output-dir", tmp_path, *TINY)
    assert checkpoint.load_checkpoint(tmp_path / "temp_0.model")["step"] == 2


def test_small_cnn_trains_from_scratch_resumes_and_refuses_imagenet_weights(csvs, tmp_path, capsys):
    small = [*TINY, "--arch", "small-cnn", "--train-from", "conv1", "--mining", "batch-hard", "--id-loss-weight", 1]
    train("--triplets", csvs[0], "--max-steps", 2, "--output-dir", tmp_path, *small)
    ckpt = checkpoint.load_checkpoint(tmp_path / "temp_0.model")
    assert ckpt["model_config"]["arch"] == "small-cnn" and "backbone.layer4.1.weight" in ckpt["model"]
    train("--triplets", csvs[0], "--max-steps", 3, "--resume", tmp_path / "temp_0.model", "--output-dir", tmp_path,
          *small)
    resumed = checkpoint.load_checkpoint(tmp_path / "temp_0.model")
    assert resumed["step"] == 3
    assert not torch.equal(resumed["model"]["backbone.conv1.weight"], ckpt["model"]["backbone.conv1.weight"])
    imagenet = [*small]
    imagenet[imagenet.index("--weights") + 1] = "imagenet"
    # refused before the CSV is read (this one does not exist) and before anything is written
    err = fails(capsys, "--triplets", tmp_path / "missing.csv", "--output-dir", tmp_path / "other", *imagenet)
    assert "there are no ImageNet weights for small-cnn" in err and "missing.csv" not in err
    assert not (tmp_path / "other").exists()


def test_the_bench_recipe_and_the_demo_name_a_net_train_net_can_build():
    sys.path.insert(0, str(REPO / "bench"))
    import bench_time_to_quality

    import demo

    recipe = train_net.get_args_parser().parse_args(bench_time_to_quality.OUR_RECIPE)
    recipe_100k = train_net.get_args_parser().parse_args(bench_time_to_quality.OUR_RECIPE
                                                         + bench_time_to_quality.RECIPE_100K)
    # the bench trains the 100,000-image recipe on the 200-class set, the 5,000-image one on the 10 classes
    bench_args = bench_time_to_quality.get_args_parser().parse_args
    assert bench_time_to_quality.our_recipe(bench_args(["--tints", "20"])) == (bench_time_to_quality.OUR_RECIPE
                                                                             + bench_time_to_quality.RECIPE_100K)
    assert bench_time_to_quality.our_recipe(bench_args(["--ours", "--lr 0.002"])) == (bench_time_to_quality.OUR_RECIPE
                                                                                    + ["--lr", "0.002"])
    demo_args = demo.get_args_parser().parse_args([])
    for arch, weights in ((recipe.arch, recipe.weights), (demo_args.arch, demo_args.weights)):
        assert (arch, weights) == ("small-cnn", "none")
        backbones.check_weights(arch, weights)  # raises for a pair train_net.py would refuse
    net = deep_rank_net.build_model(recipe.arch, recipe.embedding_dim, None, recipe.weights, recipe.train_from)
    assert all(p.requires_grad for p in net.parameters())  # --train-from conv1: every layer trained
    assert net(torch.randn(2, 3, recipe.image_size, recipe.image_size)).shape == (2, recipe.embedding_dim)
    # the README's recommended command is the bench's recipe at TinyImageNet's size, flag for flag
    readme = (REPO / "README.md").read_text(encoding="utf-8")
    block = readme[readme.index("**The recommended CPU recipe**"):]
    command = block[block.index("python train_net.py"):block.index("\n\n", block.index("python train_net.py"))]
    documented = train_net.get_args_parser().parse_args(shlex.split(command.replace("\\\n", " "))[2:])
    for name in ("triplets", "output_dir"):  # the user's files
        setattr(documented, name, getattr(recipe_100k, name))
    assert vars(documented) == vars(recipe_100k)


def test_exploding_weights_warn_once(csvs, tmp_path, capsys):
    train("--triplets", csvs[0], "--optim", "adam", "--lr", "100", "--max-steps", 3, "--log-every", 1,
          "--output-dir", tmp_path, *TINY)
    err = capsys.readouterr().err
    assert err.count("the trained weights' norm grew") == 1 and "try a lower --lr" in err


def test_collapse_warning(csvs, tmp_path, capsys):
    # unit vectors are never 10 apart: --collapse-distance 10 makes every batch count as collapsed
    train("--triplets", csvs[0], "--max-steps", 2, "--log-every", 1, "--collapse-distance", 10, "--output-dir",
          tmp_path, *TINY)
    err = capsys.readouterr().err
    assert err.count("embeddings collapsed to a point") == 1 and "loss stuck at the margin" in err


def test_no_step_reads_a_value_back_from_the_device_except_log_steps(csvs, tmp_path, monkeypatch):
    """CPU<->GPU syncs only on log steps: count every tensor -> Python read (item, bool, float, int,
    tolist, numpy) during a run of 2 steps and one of 8; with no log step in between they are equal."""
    counts = []

    def counting(name):
        real = getattr(torch.Tensor, name)

        def read(self, *a, **k):
            counts[-1] += 1
            return real(self, *a, **k)
        return read

    for name in ("item", "__bool__", "__float__", "__int__", "tolist", "numpy", "__array__"):
        monkeypatch.setattr(torch.Tensor, name, counting(name))
    for steps in (2, 8):  # 24 triplets, batch 2: 12 steps an epoch, so both stop mid-epoch
        counts.append(0)
        train("--triplets", csvs[0], "--batch-size", 2, "--max-steps", steps, "--log-every", 100,
              "--output-dir", tmp_path / str(steps), *[a for a in TINY if a not in ("--batch-size", "5")])
    assert counts[0] == counts[1], counts


def test_a_resume_that_already_reached_its_limit_trains_nothing(csvs, tmp_path, capsys):
    train("--triplets", csvs[0], "--epochs", 3, "--max-steps", 2, "--output-dir", tmp_path, *TINY)
    before = (tmp_path / "temp_0.model").read_bytes()
    train("--triplets", csvs[0], "--epochs", 3, "--max-steps", 2, "--resume", tmp_path / "temp_0.model",
          "--output-dir", tmp_path, *TINY)
    assert checkpoint.load_checkpoint(tmp_path / "temp_0.model")["step"] == 2  # not 3
    assert "stopped after 2 steps (--max-steps)" in capsys.readouterr().out
    assert len(before) > 0


def test_a_metrics_line_cut_short_by_a_kill_is_skipped_on_resume(csvs, tmp_path, capsys):
    common = ["--triplets", csvs[0], "--epochs", 2, "--log-every", 1, *TINY]
    train(*common, "--max-steps", 3, "--output-dir", tmp_path)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"event": "train", "step": null}\n')  # a hand-edited record: no step to order it by
        f.write('{"event": "train", "step": 4, "lo')  # the kill came mid-write
    train(*common, "--resume", tmp_path / "temp_0.model", "--output-dir", tmp_path)
    err = capsys.readouterr().err
    assert "line 4 has no valid step (None); skipped" in err and "line 5 is not a complete record" in err
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()
             if json.loads(line)["event"] == "train"]
    assert steps == list(range(1, 11))


def test_a_log_file_shows_the_estimate_and_a_line_at_each_interval(csvs, tmp_path, capsys, monkeypatch):
    """Output not on a terminal (captured here): no bar, but the measured step time with the epoch and run
    estimate once steps 3-8 are timed, and a progress line per STEADY_INTERVAL_S (set to 0: every step)."""
    from deepranking import progress

    monkeypatch.setattr(progress, "STEADY_INTERVAL_S", 0.0)
    tiny = [a for a in TINY if a not in ("--batch-size", "5", "--no-progress")]
    train("--triplets", csvs[0], "--batch-size", 2, "--epochs", 2, "--log-every", 4, "--output-dir", tmp_path, *tiny)
    err = capsys.readouterr().err.splitlines()
    estimate = [line for line in err if line.startswith("step time ")]
    assert len(estimate) == 1 and " s (measured over steps 3-8): epoch ≈ " in estimate[0]
    assert estimate[0].endswith(" (2 epochs)")
    steady = [line for line in err if line.startswith("epoch ") and "left in epoch" in line]
    assert len(steady) == 24  # 12 steps an epoch, a line after each
    assert steady[0].startswith("epoch 1/2: step 1/12 (8%), ")
    assert steady[4].startswith("epoch 1/2: step 5/12 (42%), ") and ", loss " in steady[4]  # the step-4 log record
    assert steady[-1].startswith("epoch 2/2: step 12/12 (100%), ")
    assert not any("CPU recipe" in line for line in err)  # a run of seconds


def test_a_cpu_run_forecast_to_take_hours_names_the_cpu_recipe(csvs, tmp_path, capsys, monkeypatch):
    """The warning comes from the measured step time x the steps left; the threshold (2 h) is lowered
    to below this run's length instead of running one for hours."""
    from deepranking import progress

    monkeypatch.setattr(progress, "LONG_CPU_RUN_S", 1e-3)
    train("--triplets", csvs[0], "--batch-size", 2, "--max-steps", 10, "--output-dir", tmp_path,
          *[a for a in TINY if a not in ("--batch-size", "5")])  # --no-progress: the estimate still comes
    err = capsys.readouterr().err.splitlines()
    assert [line for line in err if line.startswith("step time ")][0].endswith("(--max-steps 10)")
    warning = [line for line in err if line.startswith("warning: this run will take about")]
    assert len(warning) == 1 and warning[0].endswith(
        "more on the CPU; the recommended CPU recipe in README.md (small-cnn at 32 px, trained from scratch) "
        "gives a useful model in minutes on a CPU")
    assert not any("left in epoch" in line for line in err)  # --no-progress: no progress lines
