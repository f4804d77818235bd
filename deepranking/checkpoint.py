"""Checkpoint files (``.model``): the format, safe loading, and the one writer training uses.

A checkpoint is a plain dict of tensors and Python values written with ``torch.save``
and read with ``torch.load(weights_only=True)`` — never a pickled module::

    {"format": "deep-ranking-checkpoint", "version": 2,
     "model": state_dict, "model_config": {"arch", "embedding_dim", "multiscale", "train_from", "image_size", ...},
     "preprocessing": Preprocessing.to_dict(),        # v2: the pixels every later stage must rebuild
     "epoch": int, "step": int, "args": {...}, "rng": {...} | None,
     # training checkpoints also hold: "optimizer", "grad_scaler", "step_in_epoch", "train_seconds",
     # "run" (what a resume must match), "stats" (running sums), "class_head" (with --id-loss-weight)}

Version 1 files (before the preprocessing record) still load: their later stages choose the
cache size from the images, as version-1 code did.

:class:`Checkpointer` owns the names (``temp_<epoch>.model``, ``deepranknet.model``), atomic
writes, the NaN guard (a non-finite model is never written; the last good file stays),
clean-up of partial files a kill left behind, and the "continue with --resume" hint.
"""

from __future__ import annotations

import argparse
import errno
import os
import pickle
import random
import re
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from deepranking.cli import UserError, os_reason
from deepranking.file_io import atomic_path, check_input_file, stale_temporaries
from deepranking.preprocessing import Preprocessing

CHECKPOINT_FORMAT = "deep-ranking-checkpoint"
CHECKPOINT_VERSION = 2
FINAL_NAME = "deepranknet.model"
EPOCH_PATTERN = "temp_*.model"
_WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / DataParallel, torch.compile


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message, without terminal colour codes (torch.load adds some)."""
    text = _ANSI.sub("", str(exc)).strip().splitlines()
    return text[0].strip() if text else type(exc).__name__


# ----------------------------------------------------------------------------
# Plain values
# ----------------------------------------------------------------------------


def to_plain(obj: Any) -> Any:
    """Values torch.load(weights_only=True) accepts: Paths -> str, numpy -> tensors/Python scalars."""
    if isinstance(obj, argparse.Namespace):
        obj = vars(obj)
    if isinstance(obj, dict):
        # int keys stay ints: an optimizer's state is keyed by parameter index
        return {k if isinstance(k, (str, int)) else str(k): to_plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(to_plain(v) for v in obj)
    if isinstance(obj, (str, int, float, bool, type(None), torch.Tensor)):
        return obj
    if isinstance(obj, np.ndarray):
        return torch.from_numpy(np.ascontiguousarray(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    return str(obj)  # Path, torch.device, dtype, ...


def capture_rng_state() -> dict:
    """Python, NumPy, torch (and CUDA) RNG states in a weights_only-safe form."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    """Inverse of capture_rng_state (after a weights_only load)."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def strip_wrapper_prefixes(state: dict) -> dict:
    """Drop DDP ``module.`` and torch.compile ``_orig_mod.`` key prefixes."""
    out = {}
    for k, v in state.items():
        changed = True
        while changed:
            changed = False
            for pre in _WRAPPER_PREFIXES:
                if k.startswith(pre):
                    k, changed = k[len(pre):], True
        out[k] = v
    return out


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return model


def weights_finite(state: dict) -> bool:
    """True when every floating-point tensor of a state dict is finite (no NaN/inf)."""
    return all(bool(torch.isfinite(t).all()) for t in state.values()
               if isinstance(t, torch.Tensor) and t.is_floating_point())


# ----------------------------------------------------------------------------
# The model record: what every checkpoint holds of its model
# ----------------------------------------------------------------------------


def model_record(model: nn.Module, spec: Preprocessing) -> dict:
    """What a checkpoint stores of a model: weights, architecture and the pixels it was trained on."""
    plain = unwrap_model(model)
    return {"model": strip_wrapper_prefixes(plain.state_dict()),
            "model_config": {**plain.config, "image_size": int(spec.image_size)},
            "preprocessing": spec.to_dict()}


def checkpoint_preprocessing(ckpt: dict) -> Preprocessing:
    """The checkpoint's pixel contract. Version-1 files have none: cache_size 0 = choose from the images."""
    if isinstance(ckpt.get("preprocessing"), dict):
        return Preprocessing.from_dict(ckpt["preprocessing"])
    try:
        image_size = int(ckpt["model_config"]["image_size"])
    except (KeyError, TypeError, ValueError) as exc:
        raise UserError(f"checkpoint model_config is incomplete or invalid: {exc!r}")
    return Preprocessing(image_size=image_size, cache_size=0)


# ----------------------------------------------------------------------------
# Model fingerprint (what embedding files record of the model that made them)
# ----------------------------------------------------------------------------

FINGERPRINT_VERSION = 1


def model_fingerprint(ckpt: dict, preprocessing: dict, path: str | os.PathLike | None = None) -> dict:
    """Identify the model of a loaded checkpoint: same weights + same pixels = same ``id``.

    ``id`` is the SHA-256 of the model state (each tensor's name, dtype, shape and bytes,
    names sorted, DDP/compile prefixes stripped — so re-saving the same weights, in another
    run or another checkpoint, gives the same id) followed by the preprocessing record
    (``Preprocessing.to_dict()``, as ``deep_rank_net.model_from_checkpoint`` returns it:
    the same weights fed other pixels make other embeddings). ``checkpoint``, ``step`` and
    ``epoch`` are for humans only and never compared.
    """
    import hashlib
    import json

    state = strip_wrapper_prefixes(ckpt["model"])
    h = hashlib.sha256(b"deep-ranking-model-fingerprint-v1\0")
    for name in sorted(state):
        t = state[name]
        if not isinstance(t, torch.Tensor):
            h.update(f"{name}={t!r}\0".encode("utf-8"))
            continue
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{str(t.dtype)}:{tuple(t.shape)}\0".encode("utf-8"))
        # bytes of any dtype (bfloat16 has no numpy twin): view the storage as uint8
        if t.numel():
            h.update(t.reshape(-1).view(torch.uint8).numpy())  # the buffer itself, no copy
    pre = json.loads(json.dumps(to_plain(preprocessing)))  # plain, key order fixed below
    h.update(json.dumps(pre, sort_keys=True, separators=(",", ":")).encode("utf-8"))
    step, epoch = ckpt.get("step"), ckpt.get("epoch")
    return {"id": h.hexdigest(), "version": FINGERPRINT_VERSION, "preprocessing": pre,
            "checkpoint": None if path is None else str(Path(path).resolve()),
            "step": int(step) if isinstance(step, int) else None,
            "epoch": int(epoch) if isinstance(epoch, int) else None}


# ----------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------


def read_torch_file(path: str | os.PathLike, what: str) -> Any:
    """torch.load(weights_only=True) with one-line errors for missing, truncated and pickled files."""
    p = check_input_file(path, what)
    try:
        return torch.load(p, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if not zipfile.is_zipfile(p):  # torch.save writes zip archives; anything else is damaged
            raise UserError(f"{what} {p} is truncated or corrupt (not a torch.save file)")
        if what == "checkpoint":  # e.g. a classic temp_net<N>.model: a whole pickled module
            raise UserError(
                f"{p} is not a deep-ranking checkpoint: it holds pickled Python objects (like the classic "
                f"whole-model .model files), which are not loaded for safety")
        raise UserError(
            f"{what} {p} holds pickled Python objects (e.g. a whole model saved with torch.save(model), "
            f"like the classic .model files), which are not loaded for safety; save model.state_dict() "
            f"instead ({first_line(exc)})")
    except (RuntimeError, EOFError, ValueError, OSError, zipfile.BadZipFile, KeyError, IndexError) as exc:
        raise UserError(f"{what} {p} is truncated or corrupt: {first_line(exc)}")


def newest_epoch_checkpoint(folder: Path) -> Path | None:
    """The temp_<epoch>.model with the highest epoch in ``folder`` (a run that stopped early leaves only these)."""
    def epoch(p: Path) -> int:
        try:
            return int(p.stem.split("_", 1)[1])
        except (IndexError, ValueError):
            return -1
    found = sorted(folder.glob(EPOCH_PATTERN), key=epoch)
    return found[-1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint written by this project (weights_only); UserError for anything else."""
    p = Path(path)
    if not p.exists() and p.name == FINAL_NAME:  # the run stopped early (--max-steps, --time-limit, Ctrl-C)
        newest = newest_epoch_checkpoint(p.parent)
        if newest is not None:
            raise UserError(f"checkpoint not found: {p} (its run stopped before the end); the newest checkpoint "
                            f"there is {newest}: pass --model {newest}, or finish training with --resume {newest}")
    ckpt = read_torch_file(path, "checkpoint")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        if isinstance(ckpt, dict) and ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            raise UserError(f"{p} is a plain state dict, not a deep-ranking checkpoint "
                            f"(a torchvision ResNet state dict can be used with --weights PATH)")
        raise UserError(f"{p} is not a deep-ranking checkpoint (no format marker {CHECKPOINT_FORMAT!r})")
    version = ckpt.get("version")
    if not isinstance(version, int) or isinstance(version, bool) or not 1 <= version <= CHECKPOINT_VERSION:
        raise UserError(f"checkpoint {p} has version {version!r}; this code reads versions 1 to {CHECKPOINT_VERSION}")
    for key in ("model", "model_config"):
        if not isinstance(ckpt.get(key), dict):
            raise UserError(f"checkpoint {p} is incomplete: no {key!r} entry")
    return ckpt


# ----------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------


def write_checkpoint(path: str | os.PathLike, ckpt: dict) -> None:
    """Write ``ckpt`` (plain values) atomically: a crash or a full disk leaves any earlier file as it was."""
    body = {"format": CHECKPOINT_FORMAT, "version": CHECKPOINT_VERSION, **to_plain(ckpt)}
    try:
        with atomic_path(path) as tmp:
            torch.save(body, tmp)
    except (OSError, RuntimeError) as exc:  # torch wraps ENOSPC in a RuntimeError without the reason
        raise UserError(f"cannot write {path}: {_os_reason(exc, Path(path))}")


def _os_reason(exc: BaseException, path: Path) -> str:
    if isinstance(exc, OSError):
        return os_reason(exc)
    try:  # torch.save's RuntimeError hides the errno: a full disk is the usual cause
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < 64 << 20:
            return os.strerror(errno.ENOSPC)
    except OSError:
        pass
    return first_line(exc)


def _epoch_of(path: Path) -> int | None:
    """N of a ``temp_<N>.model`` name, else None."""
    match = re.fullmatch(r"temp_(\d+)\.model", Path(path).name)
    return int(match.group(1)) if match else None


class Checkpointer:
    """The one writer of training checkpoints (rank 0 only; other ranks get ``enabled=False``).

    Names: ``temp_<epoch>.model`` (epoch counted from 0, the classic ``temp_net<epoch>.model``),
    rewritten mid-epoch by --save-every / a stop, and ``deepranknet.model`` at the end.
    ``last_good`` is the newest file that was written completely with finite weights.
    ``keep``: 0 keeps every ``temp_<epoch>.model`` (the classic); N > 0 keeps the newest N epochs'
    (an older one is removed only after a newer one is written completely).
    """

    def __init__(self, out_dir: Path, enabled: bool, resumed_from: Path | None = None, keep: int = 0,
                 epochs: int | None = None):
        self.out_dir, self.enabled, self.keep = Path(out_dir), enabled, int(keep)
        self.last_good: Path | None = resumed_from
        self.epochs = epochs  # planned: how many temp_<epoch>.model files --keep-checkpoints 0 will leave
        self._space_checked = False

    def epoch_path(self, epoch: int) -> Path:
        return self.out_dir / f"temp_{epoch}.model"

    @property
    def final_path(self) -> Path:
        return self.out_dir / FINAL_NAME

    def existing(self) -> list[Path]:
        """Checkpoints of an earlier run in the folder (final first, then by epoch)."""
        epochs = sorted(self.out_dir.glob(EPOCH_PATTERN), key=lambda p: (len(p.name), p.name))
        return [p for p in [self.final_path, *epochs] if p.exists()]

    def remove_stale_partials(self) -> list[Path]:
        """Delete the partial checkpoints (``file_io.stale_temporaries``) a killed save left behind;
        returns them. The run holds the folder's lock, so every one but its own is stale."""
        stale = [p for name in (EPOCH_PATTERN, FINAL_NAME)
                 for p in stale_temporaries(self.out_dir / name, locked=True) if p.suffix == ".tmp"]
        if self.enabled:
            for p in stale:
                p.unlink(missing_ok=True)
        return stale

    def later_than(self, path: Path) -> list[Path]:
        """Checkpoints in this folder written after ``temp_<k>.model`` ``path`` by the same run: the
        ``temp_<n>.model`` with n > k, and ``deepranknet.model``. A resume from ``path`` would
        overwrite them with another trajectory (and metrics.jsonl is cut back to its step)."""
        k = _epoch_of(path)
        if k is None or Path(path).resolve().parent != self.out_dir.resolve():
            return []
        return [p for p in self.existing() if p.resolve() != Path(path).resolve()
                and (p == self.final_path or (_epoch_of(p) or 0) > k)]

    def remove_all(self) -> None:
        """--force: an earlier run's checkpoints must never pass for this run's."""
        if self.enabled:
            for p in self.existing():
                p.unlink(missing_ok=True)

    def save(self, path: Path, ckpt) -> None:
        """Write ``ckpt`` to ``path`` unless its weights are not finite (then keep the last good one).

        ``ckpt``: the dict, or a function making it (called on the writing rank only).
        """
        if not self.enabled:
            return
        if callable(ckpt):
            ckpt = ckpt()
        if not weights_finite(ckpt["model"]):
            raise UserError(f"the weights became NaN/inf at step {ckpt.get('step')}; not saving {path} "
                            f"({self.kept()}; try a lower --lr)")
        try:
            write_checkpoint(path, ckpt)
        except UserError as exc:
            raise UserError(f"{exc} ({self.kept()})")
        self.last_good = path
        epoch = _epoch_of(path)
        self._check_space(path, epoch)
        if self.keep and epoch is not None and path.parent == self.out_dir:
            for old in self.out_dir.glob(EPOCH_PATTERN):
                number = _epoch_of(old)
                if number is not None and number <= epoch - self.keep:
                    old.unlink(missing_ok=True)

    def _check_space(self, written: Path, epoch: int | None) -> None:
        """Once, after the first checkpoint: warn if the files still to come will not fit on the disk.

        With --keep-checkpoints 0 every epoch leaves its file (GBs each for ResNet-101 with Adam's
        state); finding out when a save fails hours later costs the run its end.
        """
        if self._space_checked or epoch is None or not self.epochs:
            return
        self._space_checked = True
        import shutil

        from deepranking.cli import warn

        size = written.stat().st_size
        files = self.keep + 1 if self.keep else self.epochs - epoch  # the epochs to come (kept ones) + final
        free = shutil.disk_usage(self.out_dir).free
        if size * files > free:
            warn(f"each checkpoint is {size / 2**20:,.0f} MiB and this run will write {files} more "
                 f"({size * files / 2**30:,.1f} GiB), but only {free / 2**30:,.1f} GiB are free on the disk of "
                 f"{self.out_dir}" + ("; --keep-checkpoints N keeps only the newest N" if not self.keep else ""))

    def kept(self) -> str:
        return f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written"

    def resume_hint(self) -> str:
        """What to pass to continue. A rank that writes no checkpoints (``enabled`` False) names the
        newest one it can see in the folder (rank 0 writes them; on one machine they are the same)."""
        last = self.last_good
        if not self.enabled:
            on_disk = [p for p in (self.final_path, newest_epoch_checkpoint(self.out_dir)) if p and p.exists()]
            last = on_disk[0] if on_disk else last
        return f"continue with --resume {last}" if last else "no checkpoint to resume from"
