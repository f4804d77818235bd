"""deepranking.checkpoint: the file format and its versions, safe loading, atomic writes, Checkpointer."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import numpy as np
import pytest
import torch

import deep_rank_net as drn
from deepranking import checkpoint as ck
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing

DIM = 8
SPEC = Preprocessing(image_size=32, cache_size=40)


def small_model(seed: int = 0) -> drn.DeepRankNet:
    torch.manual_seed(seed)
    return drn.DeepRankNet("resnet18", DIM, multiscale=False)


def record(model=None, **extra) -> dict:
    """A checkpoint dict as training builds one."""
    return {**ck.model_record(model if model is not None else small_model(), SPEC),
            "epoch": 0, "step": 0, "args": {}, **extra}


def one_line_user_error(excinfo) -> str:
    message = str(excinfo.value)
    assert "\n" not in message and "\x1b" not in message
    return message


# ---------------------------------------------------------------- versions


@pytest.mark.parametrize("version", [0, 3, True, "2", None])
def test_unknown_versions_are_refused_in_one_line(tmp_path, version):
    path = tmp_path / "net.model"
    body = {"format": ck.CHECKPOINT_FORMAT, **record()}
    if version is not None:
        body["version"] = version
    torch.save(body, path)
    with pytest.raises(UserError, match="version") as excinfo:
        ck.load_checkpoint(path)
    message = one_line_user_error(excinfo)
    assert repr(version) in message and str(path) in message
    assert f"versions 1 to {ck.CHECKPOINT_VERSION}" in message


def test_version_1_checkpoint_still_loads(tmp_path):
    """The old format: no "preprocessing" record, the image size in model_config only."""
    model = small_model()
    path = tmp_path / "v1.model"
    torch.save({"format": ck.CHECKPOINT_FORMAT, "version": 1,
                "model": model.state_dict(), "optimizer": None, "epoch": 2, "step": 9,
                "model_config": {**model.config, "image_size": 48}, "args": {}, "rng": None}, path)
    ckpt = ck.load_checkpoint(path)
    assert ckpt["version"] == 1 and "preprocessing" not in ckpt
    rebuilt, spec = drn.model_from_checkpoint(ckpt)
    assert spec.image_size == 48 and spec.cache_size == 0  # 0: later stages choose it from the images
    assert spec.mean == Preprocessing(1, 1).mean and spec.std == Preprocessing(1, 1).std
    x = torch.randn(2, 3, 48, 48)
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), model.eval()(x), rtol=0, atol=0)


def test_written_checkpoints_are_the_current_version(tmp_path):
    path = tmp_path / "net.model"
    ck.write_checkpoint(path, record())
    raw = torch.load(path, weights_only=True)
    assert raw["format"] == ck.CHECKPOINT_FORMAT and raw["version"] == ck.CHECKPOINT_VERSION == 2
    assert Preprocessing.from_dict(raw["preprocessing"]) == SPEC
    _, spec = drn.model_from_checkpoint(ck.load_checkpoint(path))
    assert spec == SPEC


def test_bad_checkpoints_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="checkpoint not found"):
        ck.load_checkpoint(tmp_path / "missing.model")
    good = tmp_path / "good.model"
    ck.write_checkpoint(good, record())
    data = good.read_bytes()
    truncated = tmp_path / "truncated.model"
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match="truncated or corrupt") as excinfo:
        ck.load_checkpoint(truncated)
    one_line_user_error(excinfo)
    plain = tmp_path / "plain.pth"
    torch.save(small_model().state_dict(), plain)
    with pytest.raises(UserError, match="plain state dict"):
        ck.load_checkpoint(plain)
    pickled = tmp_path / "temp_net1.model"  # the classic whole-module pickle
    torch.save(torch.nn.Linear(2, 2), pickled)
    with pytest.raises(UserError, match="not a deep-ranking checkpoint.*pickled Python objects") as excinfo:
        ck.load_checkpoint(pickled)
    one_line_user_error(excinfo)
    incomplete = tmp_path / "incomplete.model"
    ck.write_checkpoint(incomplete, {"model_config": {}, "epoch": 0})
    with pytest.raises(UserError, match="incomplete: no 'model'"):
        ck.load_checkpoint(incomplete)


# ---------------------------------------------------------------- plain values


def test_to_plain_keeps_int_keys_and_converts_the_rest():
    plain = ck.to_plain({0: {"step": 1}, "path": Path("/a/b"), "n": np.int64(3), "x": np.float32(0.5),
                         "arr": np.arange(3), "dev": torch.device("cpu"), 2.5: "float key",
                         "nested": [Path("c"), (1, np.float64(2.0))]})
    assert plain[0] == {"step": 1} and 0 in plain and "0" not in plain
    assert plain["path"] == "/a/b" and plain["n"] == 3 and type(plain["n"]) is int
    assert plain["x"] == 0.5 and type(plain["x"]) is float
    assert torch.equal(plain["arr"], torch.arange(3)) and plain["dev"] == "cpu"
    assert plain["2.5"] == "float key"
    assert plain["nested"] == ["c", (1, 2.0)]


@pytest.mark.parametrize("make_opt", [
    lambda params: torch.optim.SGD(params, lr=0.1, momentum=0.9),
    lambda params: torch.optim.AdamW(params, lr=0.01),
])
def test_optimizer_state_survives_write_and_load(tmp_path, make_opt):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    opt = make_opt(model.parameters())
    x = torch.randn(8, 4)
    for _ in range(2):
        opt.zero_grad()
        model(x).square().sum().backward()
        opt.step()
    path = tmp_path / "opt.model"
    ck.write_checkpoint(path, {"model": model.state_dict(), "model_config": {}, "optimizer": opt.state_dict()})
    saved = ck.load_checkpoint(path)["optimizer"]
    assert sorted(saved["state"]) == [0, 1, 2, 3]  # parameter indices stay ints
    twin = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU(), torch.nn.Linear(3, 2))
    twin.load_state_dict(model.state_dict())
    fresh = make_opt(twin.parameters())
    fresh.load_state_dict(saved)
    for i, p in enumerate(model.parameters()):
        q = list(twin.parameters())[i]
        for name, value in opt.state[p].items():
            assert torch.equal(fresh.state[q][name], value), name  # momentum buffers / Adam moments intact
    # The next step is the same as the uninterrupted optimizer's.
    for m, o in ((model, opt), (twin, fresh)):
        o.zero_grad()
        m(x).square().sum().backward()
        o.step()
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


# ---------------------------------------------------------------- writing


def test_full_disk_is_a_user_error_and_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "net.model"
    ck.write_checkpoint(path, record(epoch=1))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as excinfo:
        ck.write_checkpoint(path, record(epoch=2))
    assert str(excinfo.value) == f"cannot write {path}: No space left on device"
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.model"]  # no partial file left


def test_other_save_failures_keep_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "net.model"
    ck.write_checkpoint(path, record(epoch=1))

    def boom(*a, **k):
        raise RuntimeError("disk full")

    monkeypatch.setattr(torch, "save", boom)
    with pytest.raises(UserError, match=f"cannot write {path}") as excinfo:
        ck.write_checkpoint(path, record(epoch=2))
    one_line_user_error(excinfo)
    monkeypatch.undo()
    assert ck.load_checkpoint(path)["epoch"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["net.model"]


# ---------------------------------------------------------------- Checkpointer


def test_checkpointer_refuses_non_finite_weights_and_keeps_the_previous_file(tmp_path):
    saver = ck.Checkpointer(tmp_path, enabled=True)
    assert saver.kept() == "no checkpoint was written"
    good = saver.epoch_path(0)
    assert good == tmp_path / "temp_0.model" and saver.final_path == tmp_path / "deepranknet.model"
    saver.save(good, record(epoch=0, step=5))
    assert saver.last_good == good
    model = small_model()
    with torch.no_grad():
        model.embed.weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/inf at step 9") as excinfo:
        saver.save(good, record(model, epoch=1, step=9))
    message = one_line_user_error(excinfo)
    assert f"the last good checkpoint is {good}" in message
    assert saver.last_good == good and ck.load_checkpoint(good)["step"] == 5
    with torch.no_grad():
        model.embed.weight[0, 0] = float("inf")
    with pytest.raises(UserError, match="NaN/inf"):
        saver.save(saver.final_path, record(model))
    assert not saver.final_path.exists()
    assert saver.resume_hint() == f"continue with --resume {good}"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["temp_0.model"]


def test_checkpointer_disabled_writes_nothing(tmp_path):
    saver = ck.Checkpointer(tmp_path, enabled=False)
    saver.save(saver.epoch_path(0), record())
    assert list(tmp_path.iterdir()) == [] and saver.last_good is None


def test_checkpointer_full_disk_names_the_last_good_file(tmp_path, monkeypatch):
    saver = ck.Checkpointer(tmp_path, enabled=True)
    saver.save(saver.epoch_path(0), record(epoch=0))

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(UserError) as excinfo:
        saver.save(saver.epoch_path(1), record(epoch=1))
    assert str(excinfo.value) == (f"cannot write {saver.epoch_path(1)}: No space left on device "
                                  f"(the last good checkpoint is {saver.epoch_path(0)})")
    assert saver.last_good == saver.epoch_path(0)


def test_remove_stale_partials(tmp_path):
    stale = [tmp_path / ".temp_0.model.k3j9x_1.tmp", tmp_path / ".temp_12.model.abcd.tmp",
             tmp_path / ".deepranknet.model.zz9.tmp"]
    keep = [tmp_path / "temp_0.model", tmp_path / "deepranknet.model", tmp_path / ".other.model.x.tmp",
            tmp_path / "notes.tmp"]
    for p in stale + keep:
        p.write_bytes(b"x")
    # Disabled (not rank 0): reports but deletes nothing.
    assert sorted(ck.Checkpointer(tmp_path, enabled=False).remove_stale_partials()) == sorted(stale)
    assert all(p.exists() for p in stale)
    assert sorted(ck.Checkpointer(tmp_path, enabled=True).remove_stale_partials()) == sorted(stale)
    assert not any(p.exists() for p in stale) and all(p.exists() for p in keep)
    assert ck.Checkpointer(tmp_path, enabled=True).remove_stale_partials() == []


def test_a_killed_save_leaves_a_partial_that_remove_stale_partials_finds(tmp_path, monkeypatch):
    """The partial file atomic_path creates has the name remove_stale_partials looks for."""
    seen = []

    def killed(obj, f, *a, **k):
        seen.append(Path(f))
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(torch, "save", killed)
    saver = ck.Checkpointer(tmp_path, enabled=True)
    with pytest.raises(UserError):
        saver.save(saver.epoch_path(3), record())
    (partial,) = seen
    assert partial.parent == tmp_path and partial.name.startswith(f".temp_3.model.{os.getpid()}.")
    assert partial.suffix == ".tmp"
    assert saver.remove_stale_partials() == []  # this process's own write in progress is never stale
    killed_run = partial.with_name(partial.name.replace(f".{os.getpid()}.", ".999999999."))
    killed_run.write_bytes(b"half")  # what another process, killed mid-write, left
    assert saver.remove_stale_partials() == [killed_run] and not killed_run.exists()


def test_existing_lists_final_first_then_epochs_in_order(tmp_path):
    saver = ck.Checkpointer(tmp_path, enabled=True)
    for name in ("temp_10.model", "temp_2.model", "deepranknet.model", "temp_0.model"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.name for p in saver.existing()] == ["deepranknet.model", "temp_0.model", "temp_2.model",
                                                  "temp_10.model"]
    saver.remove_all()
    assert list(tmp_path.iterdir()) == []


def test_weights_finite():
    assert ck.weights_finite({"w": torch.ones(2), "n": torch.tensor(3)})
    assert not ck.weights_finite({"w": torch.tensor([1.0, float("nan")])})
    assert not ck.weights_finite({"w": torch.tensor([float("-inf")], dtype=torch.bfloat16)})
