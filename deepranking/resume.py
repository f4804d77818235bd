"""The training side of the checkpoint contract: what a training checkpoint holds beyond the model,
what a resume must agree on and restores, and what in an output folder a run may overwrite.

``checkpoint.py`` owns the file (format, safe loading, the one writer, the model record); this
module owns what training puts in it and reads back::

    training_checkpoint(model_ckpt, state, position, args, record)
        = model_ckpt + {"epoch", "step", "step_in_epoch", "train_seconds", "optimizer", "grad_scaler",
                        "args", "rng", "run": record, "stats": {"epoch", "window"},
                        ["train_model", "ema_updates"] with --ema-decay, ["class_head"] with --id-loss-weight}

The resume rule compares everything: every argument the checkpoint saved must equal the new run's,
except the few named in :data:`MAY_DIFFER` (each with its reason). An argument an older checkpoint
did not save takes the parser's default, so a flag added later is compared with no list to update.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
import torch.nn as nn

from deepranking import argtypes, cli, file_io
from deepranking.checkpoint import (Checkpointer, capture_rng_state, first_line, newest_epoch_checkpoint,
                                    restore_rng_state, strip_wrapper_prefixes, to_plain)
from deepranking.cli import UserError
from deepranking.plots import data_path
from deepranking.preprocessing import Preprocessing
from deepranking.training_log import METRICS_NAME, MetricsLog, RunningStats

CONFIG_NAME = "config.json"  # the run's resolved arguments, beside its outputs
CURVES_NAME = "training_curves.png"
RUN_FILES = (METRICS_NAME, CONFIG_NAME, CURVES_NAME, data_path(CURVES_NAME).name)  # besides the checkpoints

# Arguments a resumed run may change, and why each cannot change what is trained. Every other
# argument (a flag added tomorrow included) must equal the checkpoint's.
MAY_DIFFER = {
    "triplets": "a path: the CSV's content is compared instead (SHA-1 in the run record)",
    "val_triplets": "a path: the validation CSV's content is compared instead (SHA-1 in the run record)",
    "weights": "the initial weights: a resume loads every weight from the checkpoint",
    "epochs": "where the run ends; with --lr-schedule cosine it sets the schedule and must match",
    "max_steps": "where this process stops, not what each step does",
    "time_limit": "where this process stops, not what each step does",
    "output_dir": "where files go; check_outputs decides whether the folder may be written",
    "resume": "the checkpoint itself",
    "force": "whether an earlier run's files may be replaced",
    "device": "where the same steps run (numerics agree to rounding, as between any two devices)",
    "deterministic": "which kernels run; on the CPU the same ones, on a GPU bit-identity only",
    "compile": "how the same graph runs",
    "num_workers": "how many processes gather the batches, not which rows they hold",
    "cache_budget": "where decoded images are kept, not their pixels",
    "save_every": "extra checkpoints mid-epoch",
    "keep_checkpoints": "how many checkpoints stay on disk",
    "log_every": "which steps write a metrics.jsonl record (and sync with the GPU)",
    "weight_growth_warning": "when a warning is printed",
    "collapse_distance": "when a warning is printed",
    "no_progress": "whether a progress bar is drawn",
}
SCHEDULE_FIXES_EPOCHS = "cosine"  # the lr schedule whose length is --epochs: a resume must keep them


@dataclass
class TrainingState:
    """The live objects a training checkpoint saves and a resume loads back."""

    net: nn.Module  # the weights being trained (the EMA, if any, is what "model" holds)
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    ema: object | None  # weight_average.WeightAverage with --ema-decay
    class_head: nn.Module | None  # the cosine classifier with --id-loss-weight
    epoch_stats: RunningStats
    window: RunningStats


@dataclass
class Position:
    """Where a run is: epoch (from 0), optimizer steps of the run, steps into the epoch, training seconds."""

    epoch: int = 0
    step: int = 0
    step_in_epoch: int = 0
    train_seconds: float = 0.0


# ---------------------------------------------------------------------------
# What a training checkpoint holds
# ---------------------------------------------------------------------------


def run_record(fingerprint: dict, train_triplets: int, world_size: int, spec: Preprocessing | None = None) -> dict:
    """What a resume must match besides the arguments: the data's content and the number of processes."""
    # the training triplets after the --val-fraction split: the CSV's hash alone does not fix them
    record = {**fingerprint, "world_size": world_size, "train_triplets": train_triplets}
    if spec is not None:
        record["cache_size"] = spec.cache_size
    return record


def training_checkpoint(model_ckpt: dict, state: TrainingState, position: Position, args, record: dict) -> dict:
    """The checkpoint dict of a run: ``model_ckpt`` (checkpoint.model_record) plus all a resume needs."""
    ckpt = dict(model_ckpt)  # "model": what later stages embed with (the EMA with --ema-decay)
    if state.ema is not None:  # the weights being trained, for --resume
        ckpt.update(train_model=strip_wrapper_prefixes(state.net.state_dict()), ema_updates=state.ema.updates)
    ckpt.update(epoch=position.epoch, step=position.step, step_in_epoch=position.step_in_epoch,
                train_seconds=position.train_seconds, optimizer=state.optimizer.state_dict(),
                grad_scaler=state.scaler.state_dict(), args=vars(args), rng=capture_rng_state(), run=record,
                stats={"epoch": state.epoch_stats.state(), "window": state.window.state()})
    if state.class_head is not None:
        ckpt["class_head"] = state.class_head.state_dict()
    return ckpt


def check_training_record(ckpt: dict, path) -> None:
    """The entries a resume reads have the types training_checkpoint writes (UserError naming the first
    that does not): a hand-edited or foreign file must not end in a traceback or a wrong trajectory."""
    def bad(key: str, expected: str):
        shown = repr(ckpt.get(key))
        return UserError(f"checkpoint {path} is not a training checkpoint train_net.py can resume: "
                         f"{key} is {shown if len(shown) <= 60 else shown[:57] + '...'}, expected {expected}")

    if "epoch" not in ckpt or "step" not in ckpt:
        raise UserError(f"checkpoint {path} holds no training state (epoch, step), so it cannot be resumed")
    for key in ("epoch", "step", "step_in_epoch"):
        if not argtypes.is_count(ckpt.get(key, 0)):
            raise bad(key, "a non-negative integer")
    seconds = ckpt.get("train_seconds", 0.0)
    if not isinstance(seconds, (int, float)) or isinstance(seconds, bool) or not 0 <= seconds < math.inf:
        raise bad("train_seconds", "a non-negative number")
    for key in ("args", "rng", "run", "stats", "preprocessing"):
        if ckpt.get(key) is not None and not isinstance(ckpt[key], dict):
            raise bad(key, "a dict")
    cfg = ckpt.get("model_config")
    if not isinstance(cfg, dict) or not all(k in cfg for k in ("arch", "embedding_dim", "image_size")):
        raise bad("model_config", "a dict with arch, embedding_dim and image_size")
    if ckpt.get("preprocessing"):
        try:
            Preprocessing.from_dict(ckpt["preprocessing"])
        except UserError as exc:
            raise UserError(f"checkpoint {path}: {exc}")


# ---------------------------------------------------------------------------
# What a resume must agree on
# ---------------------------------------------------------------------------


def plain_args(values: dict | argparse.Namespace) -> dict:
    """Arguments as a checkpoint or config.json stores them (paths as text, tuples as lists)."""
    return json.loads(json.dumps(to_plain(values), default=str))


def parser_defaults(parser: argparse.ArgumentParser) -> dict:
    """Every argument's default, as a run with no flags would have it (the first action of a dest sets
    it, as in argparse: --shallow's aliases --multiscale/--no-multiscale have none of their own)."""
    defaults: dict = {}
    for action in parser._actions:
        if action.dest not in (argparse.SUPPRESS, "help"):
            defaults.setdefault(action.dest, action.default)
    return defaults


def differing_args(saved: dict, args: argparse.Namespace, parser: argparse.ArgumentParser) -> list[tuple[str, object]]:
    """(name, saved value) of every argument of ``parser`` whose saved value differs from ``args``'s.

    An argument the saved record lacks (written before the flag existed) counts as its default;
    a saved argument the parser no longer has is not compared; :data:`MAY_DIFFER` are skipped, and
    so is ``epochs`` unless the lr schedule is the one whose length it sets.
    """
    now = plain_args(args)
    before = {**plain_args(parser_defaults(parser)), **plain_args(saved)}
    free = set(MAY_DIFFER) - ({"epochs"} if now.get("lr_schedule") == SCHEDULE_FIXES_EPOCHS else set())
    return [(k, before[k]) for k in now if k not in free and k in before and before[k] != now[k]]


def check_resume(ckpt: dict, args: argparse.Namespace, parser: argparse.ArgumentParser, record: dict,
                 model_settings: dict) -> None:
    """A resumed run must be the same run: every argument but MAY_DIFFER, the data and the process count.

    ``record``: this run's :func:`run_record`; ``model_settings``: the argument values the checkpoint's
    model_config fixes (they win over its saved arguments, which version-1 files named differently).
    """
    saved = {**(ckpt.get("args") or {}), **model_settings}
    differs = differing_args(saved, args, parser)
    if differs:
        flags = " ".join(_flag(k, v) for k, v in differs)
        raise UserError(f"checkpoint {args.resume} was trained with other settings; resume with: {flags}")
    saved_run = ckpt.get("run") or {}
    for key, what in (("triplets", "--triplets"), ("val_triplets", "the validation CSV")):
        if key in saved_run and saved_run[key] != record[key]:
            raise UserError(f"{what} differs from the one checkpoint {args.resume} was trained on "
                            f"(content changed); resume with the same file, or start afresh with --force")
    if "train_triplets" in saved_run and saved_run["train_triplets"] != record["train_triplets"]:
        raise UserError(f"checkpoint {args.resume} was trained on {saved_run['train_triplets']} training triplets, "
                        f"this run has {record['train_triplets']} from the same CSV (a --val-fraction split made "
                        f"by another version): its schedule and batches would differ; start afresh with --force")
    if "train_triplets" not in saved_run and args.val_fraction > 0:
        cli.warn(f"checkpoint {args.resume} does not record its training triplets: if it was made before held-out "
                 f"images left training in every role (--val-fraction), this resume trains on fewer triplets")
    if "world_size" in saved_run and saved_run["world_size"] != record["world_size"]:
        raise UserError(f"checkpoint {args.resume} was trained by {saved_run['world_size']} process(es), this run "
                        f"has {record['world_size']}: resume with torchrun --nproc_per_node {saved_run['world_size']}")


def _flag(name: str, value) -> str:
    """The command-line spelling of one argument's value."""
    if isinstance(value, bool):
        return f"--{name.replace('_', '-')}" if value else f"--no-{name.replace('_', '-')}"
    return f"--{name.replace('_', '-')} {value}"


# ---------------------------------------------------------------------------
# What a resume restores
# ---------------------------------------------------------------------------


def restore(ckpt: dict, path, state: TrainingState, steps_per_epoch: int) -> Position:
    """Load a checkpoint's weights, optimizer, scaler, RNG and running statistics into ``state``;
    returns where the run stands. UserError for a checkpoint that does not fit."""
    try:
        state.net.load_state_dict(strip_wrapper_prefixes(ckpt.get("train_model", ckpt["model"])))
        if state.ema is not None:
            state.ema.load(strip_wrapper_prefixes(ckpt["model"]), ckpt["ema_updates"])
        if state.class_head is not None:
            head = ckpt.get("class_head") or {"weight": ckpt["id_head"]}  # id_head: version-1 name
            state.class_head.load_state_dict(head)
        if ckpt.get("optimizer"):
            state.optimizer.load_state_dict(ckpt["optimizer"])
        if ckpt.get("grad_scaler"):
            state.scaler.load_state_dict(ckpt["grad_scaler"])
    except (RuntimeError, ValueError, KeyError, TypeError) as exc:
        raise UserError(f"checkpoint {path} does not fit this model/optimizer: {first_line(exc)}")
    # types checked by check_training_record
    position = Position(ckpt["epoch"], ckpt["step"], ckpt.get("step_in_epoch", 0),
                        float(ckpt.get("train_seconds", 0.0)))
    if position.step_in_epoch >= steps_per_epoch:  # an epoch's end is saved as the next epoch's step 0
        raise UserError(f"checkpoint {path} is at step {position.step_in_epoch} of an epoch that has "
                        f"{steps_per_epoch} steps here: not a checkpoint of this run")
    try:
        if ckpt.get("rng"):
            restore_rng_state(ckpt["rng"])
        stats = ckpt.get("stats") or {}
        state.epoch_stats.load_state(stats.get("epoch", {}))
        state.window.load_state(stats.get("window", {}))
    except (RuntimeError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise UserError(f"checkpoint {path} has a malformed random-number or statistics state: {first_line(exc)}")
    return position


# ---------------------------------------------------------------------------
# What a run may overwrite in its output folder
# ---------------------------------------------------------------------------


def resumes_in_place(args) -> bool:
    """--resume of a checkpoint in --output-dir itself: the run continues its own folder and log."""
    return args.resume is not None and Path(args.resume).resolve().parent == args.output_dir.resolve()


def check_outputs(saver: Checkpointer, args, parser: argparse.ArgumentParser) -> None:
    """Refuse to overwrite an earlier run's files (names the file) unless --force, or --resume of a
    checkpoint in --output-dir itself: a checkpoint resumed into another folder must not overwrite
    the run found there. A folder holding only the start of an interrupted run of the same command
    (its config.json, no checkpoint) is taken over, with a line saying so."""
    out = args.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir is not a folder: {out}")
    if args.force:
        return
    if resumes_in_place(args):
        later = saver.later_than(Path(args.resume))
        if later:
            newest = saver.final_path if saver.final_path in later else later[-1]
            raise UserError(f"{out} holds checkpoints written after {Path(args.resume).name} "
                            f"({', '.join(p.name for p in later)}): resuming from it would overwrite them and cut "
                            f"{METRICS_NAME} back to its step; to continue the run, --resume {newest}; to go "
                            f"back to {Path(args.resume).name} anyway (removing the later ones), --force")
        return
    found = [p for p in [*saver.existing(), *(out / name for name in RUN_FILES)] if p.exists()]
    if found and _interrupted_start_of(out, args, parser, saver):
        if saver.enabled:
            print(f"taking over {out}: it holds only the start of an interrupted run of the same command "
                  f"(no checkpoint yet), which this run replaces", file=sys.stderr, flush=True)
        return
    for path in found:
        if args.resume is None:
            raise UserError(f"{path} already exists from an earlier run (use --force to overwrite or --resume CKPT)")
        newest = saver.final_path if saver.final_path.exists() else newest_epoch_checkpoint(out)
        if newest is not None:  # perhaps this very run, resumed into here earlier and stopped
            raise UserError(f"{out} already holds a run's checkpoints: to continue that run, --resume {newest}; "
                            f"to write over it, --force")
        raise UserError(f"{path} already exists from another run: --resume {args.resume} continues in its own "
                        f"folder (--output-dir {Path(args.resume).parent}); use --force to write into {out} anyway")


def _interrupted_start_of(out: Path, args, parser: argparse.ArgumentParser, saver: Checkpointer) -> bool:
    """True when ``out`` holds no checkpoint and the config.json of a fresh run with the same CSVs and
    the same arguments (but MAY_DIFFER): a run of this command stopped before its first checkpoint."""
    if args.resume is not None or saver.existing():
        return False
    try:
        with file_io.open_regular(out / CONFIG_NAME) as f:  # a FIFO named config.json must not block
            config = json.loads(f.read().decode("utf-8"))
    except (OSError, ValueError):
        return False
    known = parser_defaults(parser)
    if not isinstance(config, dict) or not set(known) <= set(config):
        return False  # not a config.json train_net.py wrote with these flags
    saved = {k: v for k, v in config.items() if k in known}
    now = plain_args(args)
    same_data = all(saved[k] == now[k] for k in ("triplets", "val_triplets"))
    return saved["resume"] is None and same_data and not differing_args(saved, args, parser)


def clear_for_run(saver: Checkpointer, args, log: MetricsLog, step: int) -> None:
    """Rank 0, after check_outputs: remove what this run replaces. A fresh run (or a resume into another
    folder) removes an earlier run's checkpoints and records; a resume in place removes the checkpoints
    after its own and the metrics records a killed process wrote after the checkpoint's step."""
    for stale in saver.remove_stale_partials():
        cli.warn(f"removed {stale}, a partial checkpoint left by an interrupted save")
    if not resumes_in_place(args):
        saver.remove_all()  # an earlier run's checkpoints and records must not pass for this one's
        for name in RUN_FILES:
            (args.output_dir / name).unlink(missing_ok=True)
    else:
        for later in saver.later_than(Path(args.resume)):  # --force: going back to an older one
            later.unlink()
        log.truncate_after(step)  # records a killed run wrote after its checkpoint


@contextlib.contextmanager
def undone_on_failure(saver: Checkpointer, args) -> Iterator[None]:
    """A run that fails before its first checkpoint (a full disk, a NaN, a second Ctrl-C) removes the
    config.json and records it wrote into --output-dir: a folder holding nothing a resume could use
    must not make a rerun with other flags ask for --force. A resume in place keeps its folder's files."""
    try:
        yield
    except BaseException:
        if saver.enabled and not resumes_in_place(args) and not saver.existing():
            for name in RUN_FILES:
                try:
                    (args.output_dir / name).unlink(missing_ok=True)
                except OSError:  # the error on its way out says what went wrong
                    pass
        raise
