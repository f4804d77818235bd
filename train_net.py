"""Train the Deep Ranking network on a triplet CSV with the ranking hinge loss.

    python train_net.py --epochs 1 --optim sgd

Edit the hyperparameters below or override any of them on the command line.
Writes ``temp_<epoch>.model`` after every epoch (epoch counted from 0, as the
classic ``temp_net<epoch>.model``) and ``deepranknet.model`` at the end (in
``--output-dir``), plus ``metrics.jsonl``, ``training_curves.png`` and ``config.json``.
``--resume temp_<epoch>.model`` continues a run exactly where it stopped (a stop by
--max-steps, --time-limit or Ctrl-C prints the file to pass); a checkpoint of other
settings is refused with the flags to pass. Under ``torchrun --nproc_per_node N`` it
trains with DistributedDataParallel (rank 0 writes every file). Once steps 3-8 are timed it
prints the step time with the epoch and run estimate (on a CPU, with hours to go, a pointer to
README.md's CPU recipe); with output not on a terminal, a progress line every minute replaces
the bar (deepranking/progress.py).
"""

from __future__ import annotations

import argparse
import contextlib
import itertools
import json
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

import deep_rank_net
from deepranking import argtypes, backbones, cli, distributed, embedding, file_io, image_cache, image_data, losses, resume, runtime
from deepranking import progress
from deepranking import checkpoint
from deepranking.checkpoint import Checkpointer, load_checkpoint
from deepranking.cli import UserError
from deepranking.preprocessing import Preprocessing, preprocess
from deepranking.training_log import METRICS_NAME, MetricsLog, RunningStats
from deepranking.weight_average import WeightAverage

# ---------------------------------------------------------------------------
# Hyperparameters: edit here. Each is the default of the flag named beside it.
# ---------------------------------------------------------------------------
BATCH_SIZE = 25  # --batch-size: triplets per step (75 images per forward pass); the classic recipe
LEARNING_RATE = 0.001  # --lr: the course reference; higher rates wreck the pretrained layer4
EPOCHS = 1  # --epochs: one pass over the triplet CSV (1.2: and a fifth of another); pretrained ResNet-101 keeps improving for ~10
LR_SCHEDULE = "constant"  # --lr-schedule: constant | cosine (decays to 0 by the last step of --epochs)
WARMUP_STEPS = 0  # --warmup-steps: linear lr warm-up over the first N steps (a high lr from scratch can diverge)
OPTIMIZER = "sgd"  # --optim: sgd | adam | adamw | rms; SGD + Nesterov is the classic recipe
MOMENTUM = 0.9  # --momentum: SGD/RMSprop momentum, as in the classic code
NESTEROV = True  # --nesterov/--no-nesterov: Nesterov momentum for SGD, as in the classic code
WEIGHT_DECAY = 0.0  # --weight-decay: the classic recipe uses none; the frozen backbone regularises enough
EMA_DECAY = 0.0  # --ema-decay: > 0 = checkpoints hold an EMA of the weights over ~1/(1-decay) steps; 0 = the last step's
MARGIN = 1.0  # --margin: gap g in max(0, g + D(q,p) - D(q,n)); unit-norm embeddings: D in [0, 2]
IMAGE_SIZE = 224  # --image-size: TinyImageNet's 64 px images are upsampled on the device, as classic
CACHE_SIZE = 0  # --cache-size: side of the decoded-image cache; 0 = the images' own size when small, else IMAGE_SIZE
EMBEDDING_DIM = 4096  # --embedding-dim: the paper's embedding size
ARCH = "resnet101"  # --arch: backbone; resnet18 for a quick CPU run, small-cnn for small images from scratch,
# any torchvision classification model (convnext_tiny, efficientnet_b0, vit_b_16, ...) or timm:<name>
WEIGHTS = "imagenet"  # --weights: imagenet | none | path to a state dict; pretrained converges far faster
TRAIN_FROM = "layer4"  # --train-from: train layer4 + heads; earlier stages (and their BatchNorm) stay frozen
SHALLOW = "paper"  # --shallow: paper (the image sub-sampled 4x and 8x, as the paper) | classic (the classic ports' strided convs) | none
MINING = "none"  # --mining: none | batch-hard | hard-negative | semi-hard (harder examples found in each batch)
ID_LOSS_WEIGHT = 0.0  # --id-loss-weight: > 0 adds a class (softmax) loss on the embeddings; faster from scratch
ID_LOSS_SCALE = 16.0  # --id-loss-scale: cosine-classifier temperature, logits = scale * cos(embedding, class)
ID_LOSS_MARGIN = 0.0  # --id-loss-margin: cosine margin of the true class in the class loss (CosFace); 0 = plain softmax
ID_LOSS_SMOOTHING = 0.0  # --id-loss-smoothing: label smoothing of the class loss (a regulariser); 0 = one-hot targets
BATCH_SAMPLER = "csv"  # --batch-sampler: csv = batches of CSV triplets | pk = P classes x K images (in-batch mining)
PK_CLASSES = 16  # --pk-classes: P, classes per P x K batch (more classes: more, harder negatives)
PK_IMAGES = 4  # --pk-images: K, images per class in a P x K batch (K-1 positives for every anchor)
NUM_WORKERS = 2  # --num-workers: DataLoader workers gathering cached rows while the model computes
SHIFT = 0.0  # --shift: also shift each training image by up to this fraction of its side (0: flips only); hurt centred Fashion-MNIST (RESULTS.md)
ERASE = 0.0  # --erase: also erase one random rectangle of each training image with this probability (random erasing)
CACHE_BUDGET = None  # --cache-budget: the image cache's size limit, over it images stream from disk (None: $DEEP_RANK_CACHE_BUDGET, else auto = half the free disk)
SEED = 0  # --seed: same seed + same CSV -> same weights (on the same device; see --deterministic for GPUs)
LOG_EVERY = 20  # --log-every: steps between metrics.jsonl records, the only steps that sync with the GPU
SAVE_EVERY = 0  # --save-every: also checkpoint every N steps mid-epoch (0: end of epoch only)
KEEP_CHECKPOINTS = 0  # --keep-checkpoints: 0 keeps every temp_<epoch>.model (classic); N keeps the newest N (each can be GBs)
WEIGHT_GROWTH_WARNING = 100.0  # --weight-growth-warning: warn when the trained weights' norm grows this many times (lr too high)
COLLAPSE_DISTANCE = 1e-3  # --collapse-distance: mean pairwise distance in a batch below this = collapsed
AMP = "auto"  # --amp: auto = bf16 on CUDA (fp16 + loss scaling without bf16), fp32 on CPU
DETERMINISTIC = False  # --deterministic/--no-deterministic: PyTorch deterministic algorithms (GPU: slower)
COMPILE = False  # --compile/--no-compile: torch.compile the model (faster steps, slow start)

OPTIMIZERS = ("sgd", "adam", "adamw", "rms")
LR_SCHEDULES = ("constant", "cosine")
DEFAULT_TRIPLETS = Path("training_triplet_sample.csv")
DEFAULT_VAL_TRIPLETS = "val_triplet_sample.csv"
def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (_data_flags, _model_flags, _loss_flags, _optimisation_flags, _run_flags):
        add_flags(p)
    return p


def _data_flags(p: argparse.ArgumentParser) -> None:
    data = p.add_argument_group("data")
    data.add_argument("--triplets", type=Path, default=DEFAULT_TRIPLETS,
                      help="training triplet CSV (default: %(default)s)")
    data.add_argument("--val-triplets", type=Path, default=None,
                      help=f"validation triplet CSV (default: {DEFAULT_VAL_TRIPLETS} next to --triplets, "
                           "skipped with a warning if absent)")
    data.add_argument("--val-fraction", type=argtypes.fraction, default=0.0,
                      help="hold out about this fraction of each class's training query images for validation "
                           "instead; training triplets that use one of them as positive or negative are left out "
                           f"(counted); {image_data.HELDOUT_RULE}")
    data.add_argument("--image-size", type=argtypes.bounded_int(32), default=IMAGE_SIZE,
                      help="net input side, >= 32 (default: %(default)s)")
    data.add_argument("--cache-size", type=argtypes.non_negative_int, default=CACHE_SIZE,
                      help="side of the decoded-image cache (0: the images' own size when small, else "
                           "--image-size; default: %(default)s)")
    data.add_argument("--batch-sampler", choices=("csv", "pk"), default=BATCH_SAMPLER,
                      help="csv: batches of --batch-size CSV triplets; pk: P classes x K images drawn from the CSV's "
                           "training images (needs class folders and --mining batch-hard or semi-hard; "
                           "default: %(default)s)")
    data.add_argument("--pk-classes", type=argtypes.bounded_int(2), default=PK_CLASSES,
                      help="P: classes per pk batch (default: %(default)s)")
    data.add_argument("--pk-images", type=argtypes.bounded_int(2), default=PK_IMAGES,
                      help="K: images per class in a pk batch (classes with fewer are drawn with replacement; "
                           "default: %(default)s)")
    data.add_argument("--num-workers", type=argtypes.non_negative_int, default=NUM_WORKERS,
                      help="DataLoader worker processes (0: gather in the main process; images decoded on the fly, "
                           "over --cache-budget, get at least min(8, CPU cores); default: %(default)s)")
    embedding.add_cache_budget_flag(data, CACHE_BUDGET)
    data.add_argument("--shift", type=argtypes.fraction, default=SHIFT,
                      help="augmentation: shift each training image by up to this fraction of --image-size in x and "
                           "y (border pixels repeated), after the random flip (0: flips only; default: %(default)s)")
    data.add_argument("--erase", type=argtypes.probability, default=ERASE,
                      help="augmentation: with this probability, set one random rectangle (2-33%% of the image) "
                           "of each training image to the mean colour, after flip and shift (0: never; "
                           "default: %(default)s)")


def checked_by(check):
    """An argparse type keeping the text that ``check`` accepts; its UserError becomes argparse's message.
    (--train-from blockN: whether the backbone has that block is checked when it is built.)"""

    def parse(text: str) -> str:
        try:
            check(text)
        except UserError as exc:
            raise argparse.ArgumentTypeError(str(exc))
        return text

    return parse


def _model_flags(p: argparse.ArgumentParser) -> None:
    model = p.add_argument_group("model")
    model.add_argument("--arch", type=checked_by(backbones.check_arch), default=ARCH,
                       help="backbone: small-cnn, any torchvision classification model (resnet18, convnext_tiny, "
                            "efficientnet_b0, regnet_y_800mf, swin_t, vit_b_16, ...), or timm:<name> (pip install "
                            "timm); its pretrained weights' mean and std normalise the images (default: %(default)s)")
    model.add_argument("--weights", default=WEIGHTS,
                       help="imagenet (torchvision's pretrained weights; offline, it says where to put the file), "
                            "none (random, seeded), or a state dict or checkpoint file (default: %(default)s)")
    model.add_argument("--train-from", type=checked_by(backbones.check_train_from), default=TRAIN_FROM,
                       help=f"first backbone stage to train ({', '.join(backbones.TRAIN_FROM_STAGES)}; for a ViT "
                            "also blockN); earlier ones (and their BatchNorm) are frozen (default: %(default)s)")
    model.add_argument("--shallow", choices=deep_rank_net.SHALLOW_MODES, default=SHALLOW,
                       help="shallow paths beside the deep one: paper = the image average-pooled 4x and 8x, then "
                            "conv + max pool (every pixel counts); classic = the classic ports' stride-16/32 convs "
                            "(to reproduce their numbers); none = the deep path alone (default: %(default)s)")
    # old spellings: --no-multiscale / --single-scale = --shallow none, --multiscale = --shallow paper
    model.add_argument("--no-multiscale", "--single-scale", dest="shallow", action="store_const", const="none",
                       help=argparse.SUPPRESS)
    model.add_argument("--multiscale", dest="shallow", action="store_const", const="paper", help=argparse.SUPPRESS)
    model.add_argument("--embedding-dim", type=argtypes.positive_int, default=EMBEDDING_DIM,
                       help="embedding size (default: %(default)s)")


def _loss_flags(p: argparse.ArgumentParser) -> None:
    loss = p.add_argument_group("loss")
    loss.add_argument("--margin", type=argtypes.positive_float, default=MARGIN,
                      help="gap g of the hinge loss max(0, g + D(q,p) - D(q,n)), > 0 (default: %(default)s)")
    loss.add_argument("--mining", choices=tuple(losses.MINERS), default=MINING,
                      help="online mining inside each batch (needs class folders): batch-hard = every image an "
                           "anchor with its hardest positive and negative; hard-negative = each triplet's negative "
                           "replaced by the batch's closest; semi-hard = negatives farther than the positive but "
                           "inside the margin (pairs without one are dropped); default: %(default)s")
    loss.add_argument("--id-loss-weight", type=argtypes.non_negative_float, default=ID_LOSS_WEIGHT,
                      help="weight of a class (cosine softmax) loss added to the ranking loss (needs class folders; "
                           "default: %(default)s)")
    loss.add_argument("--id-loss-scale", type=argtypes.positive_float, default=ID_LOSS_SCALE,
                      help="scale of the class loss's cosine logits: logits = scale * cos (default: %(default)s)")
    loss.add_argument("--id-loss-margin", type=argtypes.fraction, default=ID_LOSS_MARGIN,
                      help="cosine margin subtracted from the true class in the class loss (CosFace; 0: none; "
                           "default: %(default)s)")
    loss.add_argument("--id-loss-smoothing", type=argtypes.fraction, default=ID_LOSS_SMOOTHING,
                      help="label smoothing of the class loss (0: one-hot targets; default: %(default)s)")


def _optimisation_flags(p: argparse.ArgumentParser) -> None:
    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=argtypes.positive_float, default=EPOCHS,
                     help="passes over the triplet CSV; a fraction ends the run that share into its last pass "
                          "(1.2: one pass and 20%% of the next, the lr schedule included; default: %(default)s)")
    opt.add_argument("--optim", type=str.lower, choices=OPTIMIZERS, default=OPTIMIZER,
                     help="optimizer; rms = RMSprop (default: %(default)s)")
    opt.add_argument("--batch-size", type=argtypes.positive_int, default=BATCH_SIZE,
                     help="CSV triplets per step (default: %(default)s)")
    opt.add_argument("--lr", type=argtypes.positive_float, default=LEARNING_RATE,
                     help="learning rate, > 0 (default: %(default)s)")
    opt.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=LR_SCHEDULE,
                     help="constant, or cosine decay to 0 over all --epochs (--max-steps/--time-limit "
                          "stop early without shortening it; default: %(default)s)")
    opt.add_argument("--warmup-steps", type=argtypes.non_negative_int, default=WARMUP_STEPS,
                     help="linear learning-rate warm-up over the first N optimizer steps (default: %(default)s)")
    opt.add_argument("--momentum", type=argtypes.unit_interval, default=MOMENTUM,
                     help="momentum (sgd, rms), in [0, 1) (default: %(default)s)")
    opt.add_argument("--nesterov", action=argparse.BooleanOptionalAction, default=NESTEROV,
                     help="Nesterov momentum (sgd; default: %(default)s)")
    opt.add_argument("--weight-decay", type=argtypes.non_negative_float, default=WEIGHT_DECAY,
                     help="weight decay, >= 0: L2 in the gradient for sgd, adam and rms, decoupled for adamw "
                          "(default: %(default)s)")
    opt.add_argument("--ema-decay", type=argtypes.unit_interval, default=EMA_DECAY,
                     help="keep an exponential moving average of the weights with this decay, in [0, 1); "
                          "checkpoints, validation and every later stage use the average (0: off; "
                          "default: %(default)s)")


def _run_flags(p: argparse.ArgumentParser) -> None:
    both = argparse.BooleanOptionalAction
    run = p.add_argument_group("run")
    run.add_argument("--output-dir", type=Path, default=Path("."),
                     help="where checkpoints and logs go (default: the current folder)")
    run.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint (temp_<epoch>.model)")
    run.add_argument("--force", action="store_true",
                     help="start afresh: delete an earlier run's checkpoints, metrics.jsonl and curves")
    run.add_argument("--seed", type=argtypes.seed, default=SEED,
                     help="random seed (init, triplet order, flips; default: %(default)s)")
    run.add_argument("--device", default="auto",
                     help="auto (a GPU when there is one), cpu, cuda or cuda:N (default: %(default)s)")
    run.add_argument("--amp", choices=runtime.AMP_CHOICES, default=AMP,
                     help="mixed precision: auto = bf16 on CUDA (fp16 with loss scaling on GPUs without bf16), "
                          "fp32 on CPU (default: %(default)s)")
    run.add_argument("--deterministic", action=both, default=DETERMINISTIC,
                     help="deterministic algorithms and cuDNN flags (bit-identical GPU reruns, slower; "
                          "default: %(default)s)")
    run.add_argument("--compile", action=both, default=COMPILE, help="torch.compile the model (default: %(default)s)")
    run.add_argument("--max-steps", type=argtypes.positive_int, default=None,
                     help="stop after this many optimizer steps in total (the run's, resumes included; "
                          "default: no limit)")
    run.add_argument("--time-limit", type=argtypes.positive_float, default=None,
                     help="stop after this many seconds of training in total (the run's, resumes included; "
                          "default: no limit)")
    run.add_argument("--save-every", type=argtypes.non_negative_int, default=SAVE_EVERY,
                     help="also save temp_<epoch>.model every N steps mid-epoch (0: end of epoch only; "
                          "default: %(default)s)")
    run.add_argument("--keep-checkpoints", type=argtypes.non_negative_int, default=KEEP_CHECKPOINTS,
                     help="keep only the newest N temp_<epoch>.model files (0: every epoch's, as the classic "
                          "code; default: %(default)s)")
    run.add_argument("--log-every", type=argtypes.positive_int, default=LOG_EVERY,
                     help="steps between metrics.jsonl records, the only steps that read values back from a GPU "
                          "(default: %(default)s)")
    run.add_argument("--weight-growth-warning", type=argtypes.positive_float, default=WEIGHT_GROWTH_WARNING,
                     help="warn when the trained weights' norm grows this many times (a too-high lr; "
                          "default: %(default)s)")
    run.add_argument("--collapse-distance", type=argtypes.non_negative_float, default=COLLAPSE_DISTANCE,
                     help="warn when the mean pairwise distance in a batch falls below this (default: %(default)s)")
    run.add_argument("--no-progress", action="store_true", help="no progress bar")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(args) -> None:
    env = distributed.from_env()
    device = distributed.rank_device(args.device, env)
    runtime.configure_determinism(args.deterministic, device)
    ckpt = load_checkpoint(args.resume) if args.resume is not None else None
    if ckpt is not None:
        resume.check_training_record(ckpt, args.resume)
    else:  # a resume brings its own weights
        backbones.check_weights(args.arch, args.weights)
    data, labels, n_classes = load_data(args)
    parser = get_args_parser()  # every argument it knows is compared on resume (resume.MAY_DIFFER aside)
    if ckpt is not None:
        record = resume.run_record(data.fingerprint, len(data.train), env.world_size)
        resume.check_resume(ckpt, args, parser, record, resumed_model_settings(ckpt))
    saver = Checkpointer(args.output_dir, env.main, args.resume, keep=args.keep_checkpoints, epochs=math.ceil(args.epochs))
    resume.check_outputs(saver, args, parser)
    # One run per folder; taking the lock also proves the folder writable, before any long work.
    with file_io.folder_lock(args.output_dir) if env.main else contextlib.nullcontext():
        net = build_net(args, ckpt is not None, device)  # the weights are found (or not) before decoding
        with distributed.session(env, device, hint=saver.resume_hint):  # a lost peer: one line
            # Rank 0 decodes every image into the cache while the other ranks wait, then they map it.
            images, spec = distributed.rank_zero_first(env, lambda: cache_images(args, data, env, ckpt))
            run = start_run(args, env, device, data, labels, n_classes, images, spec, ckpt, saver, net)
            with resume.undone_on_failure(saver, args):  # no checkpoint yet: no config.json left either
                train(run)


@dataclass
class Run:
    """Everything one training run holds; built by start_run, advanced by train_one_epoch."""

    args: argparse.Namespace
    env: distributed.DistEnv
    device: torch.device
    data: image_data.TripletData
    images: np.ndarray | image_cache.StreamedImages  # the cache (or streamed rows), uint8 [N, c, c, 3]
    spec: Preprocessing
    net: deep_rank_net.DeepRankNet
    trainee: nn.Module  # net + class head: what the optimizer trains
    model: nn.Module  # trainee, wrapped for DDP / torch.compile
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    precision: runtime.Precision
    criterion: losses.RankingLoss
    ema: WeightAverage | None  # --ema-decay: the averaged weights that checkpoints hold, or None
    labels: torch.Tensor | None  # class id [N] of each image, on the device
    loader: torch.utils.data.DataLoader
    sampler: image_data.EpochBatchSampler | image_data.PKBatchSampler
    saver: Checkpointer
    log: MetricsLog
    steps_per_epoch: int
    epoch: int = 0
    step: int = 0  # optimizer steps of the whole run
    step_in_epoch: int = 0
    seconds_before: float = 0.0  # training seconds of the run before this process (resumes)
    started: float = field(default_factory=time.perf_counter)
    epoch_stats: RunningStats = field(default_factory=RunningStats)
    window: RunningStats = field(default_factory=RunningStats)
    nonfinite: torch.Tensor | None = None  # bool, on the device: a loss was NaN/inf since the last check
    interrupted: bool = False
    interrupt: type = KeyboardInterrupt  # raised once stopped: cli.Terminated for SIGTERM (exit 143, not 130)
    last_emb: torch.Tensor | None = None
    start_weight_norm: float | None = None  # of the trained parameters, when this process started
    warned: set = field(default_factory=set)  # warnings given once
    images_per_s: float = math.nan  # of the last finished epoch
    forecast: progress.Forecast | None = None  # rank 0: times the first steps, then prints the run's estimate

    @property
    def total_steps(self) -> int:  # the lr schedule's length, whatever stops the run earlier
        return planned_steps(self.args.epochs, self.steps_per_epoch)

    @property
    def planned_epochs(self) -> int:  # epochs begun, the last one partial with a fractional --epochs
        return math.ceil(self.total_steps / self.steps_per_epoch)

    def steps_in_epoch(self, epoch: int) -> int:
        """Steps of epoch ``epoch`` (0-based): all of them, or the share of a fractional --epochs' last one."""
        return min(self.steps_per_epoch, self.total_steps - epoch * self.steps_per_epoch)

    def train_seconds(self) -> float:
        return self.seconds_before + time.perf_counter() - self.started

    def state(self) -> resume.TrainingState:
        """The parts a checkpoint saves and a resume restores."""
        return resume.TrainingState(self.net, self.optimizer, self.scaler, self.ema, self.trainee.class_head,
                                    self.epoch_stats, self.window)

    def position(self) -> resume.Position:
        return resume.Position(self.epoch, self.step, self.step_in_epoch, self.train_seconds())


def train(run: Run) -> None:
    """Epochs until the end, or until --max-steps / --time-limit / Ctrl-C stop the run resumably."""
    args = run.args
    # Ctrl-C and SIGTERM (a scheduler's preemption) alike: stop after the step with a resumable checkpoint
    handler = _on_interrupt(run)
    if run.env.main:
        run.forecast = progress.Forecast(lambda seconds, measured: announce_forecast(run, seconds, measured))
    previous = {sig: signal.signal(sig, handler) for sig in (signal.SIGINT, signal.SIGTERM)} \
        if cli.in_main_thread() else {}
    try:
        reason = stop_reason(run) if run.step else None  # a resume that has already reached its limit
        if reason is not None:
            return stop(run, reason)
        for epoch in range(run.epoch, run.planned_epochs):
            if run.step >= run.total_steps:  # resumed past the end of a shorter --epochs: nothing left to train
                break
            reason = train_one_epoch(run, epoch)
            if reason is None:
                end_epoch(run, epoch)
                reason = stop_reason(run) if epoch + 1 < run.planned_epochs else None
            if reason is not None:
                return stop(run, reason)
        run.saver.save(run.saver.final_path, lambda: training_checkpoint(run))
        if run.env.main:
            plot_curves(args.output_dir)
            print(f"wrote {run.saver.final_path}, {args.output_dir / METRICS_NAME} and "
                  f"{args.output_dir / resume.CURVES_NAME}")
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def train_one_epoch(run: Run, epoch: int) -> str | None:
    """One pass over this rank's batches; returns why it stopped early (a checkpoint is saved), or None."""
    args = run.args
    run.epoch = epoch
    image_cache.mark_in_use(run.images)  # an entry read for hours must not look unused to other stages' eviction
    run.sampler.set_epoch(epoch, run.step_in_epoch)
    total = run.steps_in_epoch(epoch)  # run.step_in_epoch of them done before a resume
    batches = itertools.islice(run.loader, total - run.step_in_epoch)  # a fractional --epochs' last pass ends early
    bar = cli.progress(batches, total=total, initial=run.step_in_epoch, desc=f"epoch {epoch + 1}/{run.planned_epochs}",
                       unit="step", enabled=run.env.main and not args.no_progress, forecast=run.forecast,
                       left_label="left in epoch")
    t0, images_seen = time.perf_counter(), 0
    for batch, order in bar:
        stats = training_step(run, batch, order, epoch)
        run.step += 1
        run.step_in_epoch += 1
        images_seen += len(batch) * run.env.world_size
        run.epoch_stats.add(stats)
        run.window.add(stats)
        if run.step % args.log_every == 0:
            log_window(run, epoch, images_seen / max(time.perf_counter() - t0, 1e-9), bar)
        if run.step_in_epoch < total:
            reason = stop_reason(run)
            if reason is not None:
                bar.close()
                return reason
            if args.save_every and run.step % args.save_every == 0:
                save_progress(run)
    bar.close()
    check_finite(run)
    run.images_per_s = images_seen / max(time.perf_counter() - t0, 1e-9)
    return None


def training_step(run: Run, batch: torch.Tensor, order: torch.Tensor, epoch: int) -> dict:
    """Forward, loss, backward, optimizer step; returns the step's (sum, count) statistics (no sync)."""
    args = run.args
    x = preprocess(batch.to(run.device, non_blocking=True), run.spec, train=True,
                   generator=flip_generator(args.seed, epoch, run.step),
                   memory_format=runtime.memory_format(run.device), shift=args.shift,
                   erase=args.erase)  # [3b, 3, S, S]
    with run.precision.autocast():
        emb, logits = run.model(x)  # ONE forward of queries, positives, negatives: [3b, D], [3b, C] or None
    emb = emb.float()
    labels = run.labels[order.to(run.device, non_blocking=True)] if run.labels is not None else None  # [3b]
    csv_batch = args.batch_sampler == "csv"  # rows [q|p|n] of CSV triplets, else P x K images
    loss, stats = run.criterion(emb, labels, n_triplets=len(batch) // 3 if csv_batch else None)
    if logits is not None:
        id_loss, id_stats = losses.class_loss(logits.float(), labels, args.id_loss_scale * args.id_loss_margin,
                                               args.id_loss_smoothing)
        loss = loss + args.id_loss_weight * id_loss
        stats.update(id_stats)
    bad = ~torch.isfinite(loss.detach())
    run.nonfinite = bad if run.nonfinite is None else run.nonfinite | bad
    lr = scheduled_lr(args.lr, run.step, run.total_steps, args.lr_schedule, args.warmup_steps)
    for group in run.optimizer.param_groups:
        group["lr"] = lr
    run.optimizer.zero_grad(set_to_none=True)
    run.scaler.scale(loss).backward()  # a pass-through unless fp16 (runtime.Precision)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    if run.ema is not None:
        run.ema.update(run.net)
    run.last_emb = emb.detach()
    return stats


def end_epoch(run: Run, epoch: int) -> None:
    """Validation, the epoch's summary line and record, and its checkpoint."""
    if epoch + 1 == run.planned_epochs and run.window.sums:  # the last steps' record: the curves reach the end
        write_window(run, epoch, run.images_per_s)
    record = {"event": "epoch", "epoch": epoch + 1, "step": run.step, **run.epoch_stats.means(),
              "lr": current_lr(run), "images_per_s": run.images_per_s,
              "train_seconds": run.train_seconds()}
    if run.data.val is not None and run.env.main:
        record.update(validate(run))
    if run.env.main:
        msg = (f"epoch {epoch + 1}/{run.planned_epochs}: step {run.step}, loss {record.get('loss', math.nan):.4f}, "
               f"D(q,p) {record.get('d_pos', math.nan):.3f}, D(q,n) {record.get('d_neg', math.nan):.3f}, "
               f"active {record.get('active_fraction', math.nan):.0%}")
        if "class_loss" in record:
            msg += f", class loss {record['class_loss']:.4f}"
        if "val_triplet_accuracy" in record:
            msg += f", val triplet accuracy {record['val_triplet_accuracy']:.4f}, val loss {record['val_loss']:.4f}"
        print(msg + f", lr {record['lr']:.3g}, {record['images_per_s']:.0f} img/s", flush=True)
    run.log.write(record)
    run.epoch, run.step_in_epoch = epoch + 1, 0
    run.epoch_stats.reset()
    check_growth(run)
    run.saver.save(run.saver.epoch_path(epoch), lambda: training_checkpoint(run))


def announce_forecast(run: Run, seconds_per_step: float, measured: str) -> None:
    """Rank 0, once the first steps are timed: the epoch and run estimate (progress.training_forecast),
    with a pointer to the CPU recipe when a CPU run has hours left."""
    args = run.args
    run_steps, scope = run.total_steps, f"{args.epochs:g} epoch{'s' if args.epochs != 1 else ''}"
    if args.max_steps is not None and args.max_steps < run_steps:
        run_steps, scope = args.max_steps, f"--max-steps {args.max_steps}"
    seconds_left = seconds_per_step * max(run_steps - run.step, 0)
    if args.time_limit is not None:
        seconds_left = min(seconds_left, max(args.time_limit - run.train_seconds(), 0.0))
    for line in progress.training_forecast(seconds_per_step, measured, run.steps_per_epoch, run_steps, scope,
                                           seconds_left, on_cpu=run.device.type == "cpu"):
        progress.say(line)


def stop(run: Run, reason: str) -> None:
    """The one stop path (--max-steps, --time-limit, Ctrl-C): a resumable checkpoint and the file to pass."""
    if run.step_in_epoch:  # mid-epoch (an epoch's end has just been saved)
        save_progress(run)
    if run.env.main:
        print(f"stopped after {run.step} steps ({reason}); {run.saver.resume_hint()}", flush=True)
    if run.interrupted:
        raise run.interrupt


# ---------------------------------------------------------------------------
# Setup
# ---------------------------------------------------------------------------


def load_data(args) -> tuple[image_data.TripletData, np.ndarray | None, int]:
    """Triplets (and, for mining / the class loss, folder labels), checked before any work."""
    file_io.check_input_file(args.triplets, "triplet CSV", allow_empty=False)  # before looking for its val CSV
    data = image_data.load_triplet_data(args.triplets, resolve_val_path(args), args.val_fraction)
    if args.batch_sampler == "pk" and args.mining not in losses.LABEL_ONLY_MINERS:
        raise UserError(f"--batch-sampler pk needs --mining {' or '.join(losses.LABEL_ONLY_MINERS)} "
                        "(P x K batches hold no CSV triplets)")
    labels, n_classes = None, 0
    if args.mining != "none" or args.id_loss_weight > 0 or args.batch_sampler == "pk":
        labels, n_classes = image_data.label_ids(data.paths)
        image_data.check_labels_usable(data.train, labels, n_classes)
    return data, labels, n_classes


def resolve_val_path(args) -> Path | None:
    """The validation CSV: --val-triplets, else val_triplet_sample.csv next to --triplets if present."""
    if args.val_triplets is not None:
        if args.val_fraction > 0:
            raise UserError("give either --val-triplets or --val-fraction, not both")
        return file_io.check_input_file(args.val_triplets, "validation triplet CSV")
    if args.val_fraction > 0:
        return None
    default = args.triplets.parent / DEFAULT_VAL_TRIPLETS
    problem = file_io.regular_file_problem(default)
    if problem is None:
        return default
    cli.warn(f"no validation CSV ({default} {problem}): training without validation "
             "(use --val-triplets CSV or --val-fraction F)")
    return None


def cache_images(args, data: image_data.TripletData, env, ckpt: dict | None) -> tuple[np.ndarray, Preprocessing]:
    """Decode every image once (the cache) and fix the pixel contract the checkpoint records.

    A resumed run keeps its checkpoint's cache size (the images may have changed size since).
    """
    paths = list(data.paths)
    if args.cache_size and args.cache_size < args.image_size and env.main:
        cli.warn(f"--cache-size {args.cache_size} is below --image-size {args.image_size}: the net sees every "
                 f"image upsampled from {args.cache_size} px (the default, 0, chooses from the images)")
    resumed = (ckpt or {}).get("preprocessing") or {}
    cache_size = (args.cache_size or int(resumed.get("cache_size", 0))
                  or image_cache.choose_cache_size(paths, args.image_size))
    images = image_cache.cache_images(paths, cache_size, progress=env.main and not args.no_progress,
                                      budget=args.cache_budget)  # a cache, or StreamedImages over the budget
    return images, backbones.backbone_preprocessing(args.arch, args.image_size, cache_size)


class Trainee(nn.Module):
    """What the optimizer trains: the net and, with --id-loss-weight, a cosine classifier on its embeddings.

    forward(x [B, 3, S, S]) -> (embeddings [B, D], class logits [B, C] or None). The classifier
    is saved as ``class_head`` for --resume only; every later stage uses the net alone.
    """

    def __init__(self, net: deep_rank_net.DeepRankNet, class_head: losses.CosineClassifier | None):
        super().__init__()
        self.net, self.class_head = net, class_head

    def forward(self, x: torch.Tensor):
        emb = self.net(x)
        return emb, (self.class_head(emb) if self.class_head is not None else None)


def resumed_model_settings(ckpt: dict) -> dict:
    """The argument values a checkpoint's model_config fixes (version-1 files saved them under other names)."""
    cfg = ckpt["model_config"]
    settings = {"arch": cfg["arch"], "embedding_dim": cfg["embedding_dim"], "image_size": cfg["image_size"],
                "shallow": deep_rank_net.config_shallow(cfg)}
    if "train_from" in cfg:
        settings["train_from"] = cfg["train_from"]
    return settings


def build_net(args, resuming: bool, device: torch.device) -> deep_rank_net.DeepRankNet:
    """The seeded net (pretrained weights unless resuming: the checkpoint brings its own)."""
    runtime.seed_everything(args.seed)
    net = deep_rank_net.build_model(args.arch, args.embedding_dim, None, "none" if resuming else args.weights,
                                    args.train_from, shallow=args.shallow, image_size=args.image_size)
    return net.to(device).to(memory_format=runtime.memory_format(device))


def start_run(args, env, device, data, labels, n_classes, images, spec, ckpt, saver, net) -> Run:
    """Optimizer, class head, loader and (with --resume) the checkpoint's state."""
    head = (losses.CosineClassifier(args.embedding_dim, n_classes, args.id_loss_scale)
            if args.id_loss_weight > 0 else None)
    trainee = Trainee(net, head).to(device)
    params = net.trainable_parameters() + (list(head.parameters()) if head is not None else [])
    optimizer = build_optimizer(args, params)
    precision = runtime.resolve_precision(device, args.amp)
    if args.batch_sampler == "pk":
        sampler = image_data.PKBatchSampler(labels, args.pk_classes, args.pk_images, args.seed, env.rank,
                                            env.world_size, images=np.unique(data.train))
        dataset = image_data.PKImages(images)
    else:
        sampler = image_data.EpochBatchSampler(len(data.train), args.batch_size, args.seed, env.rank, env.world_size)
        dataset = image_data.TripletImages(images, data.train)
    steps_per_epoch = len(sampler)  # before restore() sets a skip: the whole epoch (the same every epoch)
    workers = image_cache.loader_workers(images, args.num_workers)
    loader = torch.utils.data.DataLoader(dataset, sampler=sampler, batch_size=None, num_workers=workers,
                                         pin_memory=device.type == "cuda", persistent_workers=workers > 0,
                                         worker_init_fn=image_data.worker_signals)
    run = Run(args=args, env=env, device=device, data=data, images=images, spec=spec, net=net, trainee=trainee,
              model=trainee, optimizer=optimizer, scaler=precision.grad_scaler(), precision=precision,
              criterion=losses.RankingLoss(args.margin, args.mining),
              ema=WeightAverage(net, args.ema_decay) if args.ema_decay > 0 else None,
              labels=torch.from_numpy(labels).to(device) if labels is not None else None, loader=loader,
              sampler=sampler, saver=saver, log=MetricsLog(args.output_dir / METRICS_NAME, env.main),
              steps_per_epoch=steps_per_epoch)
    if ckpt is not None:
        restore(run, ckpt)
    run.start_weight_norm = weight_norm(trainee)
    prepare_output(run)
    trainee.train()
    if env.active:
        run.model = nn.parallel.DistributedDataParallel(trainee, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        run.model = torch.compile(run.model)
    if env.main:
        print(f"training on {len(data.train)} triplets ({len(data.paths)} images, cache {spec.cache_size} px, "
              f"net {spec.image_size} px) on {device}{f' x {env.world_size}' if env.active else ''} "
              f"({precision.name}) for {args.epochs:g} epoch(s) of {run.steps_per_epoch} steps"
              f"{f' ({run.total_steps} in all)' if run.total_steps % run.steps_per_epoch else ''}, "
              f"{f'validating on {len(data.val)} triplets' if data.val is not None else 'no validation'}",
              file=sys.stderr)
    return run


def build_optimizer(args, params) -> torch.optim.Optimizer:
    """The optimizer of --optim. Adam and AdamW run torch's fused kernel: one pass over each
    parameter instead of ~10 elementwise ops with temporaries, on CPU 70 -> 13 ms a step for
    resnet18 (``bench/bench_train_step.py``). torch 2.14's fused CPU kernel pairs a weight with
    its gradient by memory order, so a channels_last weight handed an NCHW gradient would get
    another element's update: the step pre-hook gives every gradient its weight's layout first
    (autograd already does, so it copies nothing in training; a gradient set by hand is copied)."""
    if args.optim == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum,
                               nesterov=args.nesterov and args.momentum > 0, weight_decay=args.weight_decay)
    if args.optim == "rms":
        return torch.optim.RMSprop(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    adam = torch.optim.Adam if args.optim == "adam" else torch.optim.AdamW  # AdamW: decay apart from Adam's scaling
    optimizer = adam(params, lr=args.lr, weight_decay=args.weight_decay, fused=True)  # adam: L2 in the gradient
    optimizer.register_step_pre_hook(_grads_in_weight_layout)
    return optimizer


def _grads_in_weight_layout(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
    """Before a fused step: each gradient strided as its parameter (see build_optimizer)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            g = p.grad
            # strides of size-1 dims say nothing about memory order (autograd's own contract)
            if g is not None and any(n > 1 and a != b for n, a, b in zip(p.shape, p.stride(), g.stride())):
                p.grad = torch.empty_like(p).copy_(g)  # empty_like keeps p's strides


def prepare_output(run: Run) -> None:
    """Rank 0: clear what this run replaces (resume.clear_for_run), then write config.json."""
    if not run.env.main:
        return
    resume.clear_for_run(run.saver, run.args, run.log, run.step)
    config = {**{k: v for k, v in vars(run.args).items()}, "device": str(run.device),
              "world_size": run.env.world_size, "precision": run.precision.name,
              "preprocessing": run.spec.to_dict()}
    file_io.atomic_write_text(run.args.output_dir / resume.CONFIG_NAME, json.dumps(config, indent=2, default=str) + "\n")


def save_progress(run: Run) -> None:
    """A mid-epoch checkpoint (temp_<epoch>.model, rewritten), after checking the loss stayed finite."""
    check_finite(run)
    check_growth(run)
    run.saver.save(run.saver.epoch_path(run.epoch), lambda: training_checkpoint(run))


def training_checkpoint(run: Run) -> dict:
    """The checkpoint dict of the run's current state (resume.training_checkpoint of its parts)."""
    return resume.training_checkpoint(checkpoint.model_record(embedding_net(run), run.spec), run.state(),
                                      run.position(), run.args,
                                      resume.run_record(run.data.fingerprint, len(run.data.train),
                                                        run.env.world_size, run.spec))


def restore(run: Run, ckpt: dict) -> None:
    """Load a checkpoint into the run (resume.restore) and take up its position."""
    position = resume.restore(ckpt, run.args.resume, run.state(), run.steps_per_epoch)
    run.epoch, run.step, run.step_in_epoch = position.epoch, position.step, position.step_in_epoch
    run.seconds_before = position.train_seconds
    if run.step < run.epoch * run.steps_per_epoch + run.step_in_epoch and run.step < run.total_steps:
        # a fractional --epochs' end is saved as the next pass's start: the rest of its last pass is not kept
        raise UserError(f"{run.args.resume} ends a run of --epochs {float(ckpt['args']['epochs']):g} part way into "
                        f"pass {run.epoch} (step {run.step}), and a resume cannot train the rest of that pass: "
                        f"start a new run for --epochs {run.args.epochs:g}")
    if run.env.main:
        print(f"resuming from {run.args.resume}: epoch {run.epoch + 1}, step {run.step}", file=sys.stderr)



# ---------------------------------------------------------------------------
# Step helpers
# ---------------------------------------------------------------------------


def planned_steps(epochs: float, steps_per_epoch: int) -> int:
    """The run's optimizer steps: --epochs passes of ``steps_per_epoch``, a fraction rounded to a step (at least 1)."""
    return max(1, round(epochs * steps_per_epoch))


def scheduled_lr(base_lr: float, step: int, total_steps: int, schedule: str, warmup_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based) in a run of ``total_steps``.

    Linear warm-up from base_lr / warmup_steps over the first ``warmup_steps`` steps; then
    constant, or cosine: base_lr * (1 + cos(pi * step / total_steps)) / 2, which reaches 0
    only after the last step. A function of the step alone, so --resume stays exact.
    """
    lr = base_lr * min(1.0, (step + 1) / warmup_steps) if warmup_steps else base_lr
    if schedule == "cosine":
        lr *= 0.5 * (1.0 + math.cos(math.pi * min(step / max(total_steps, 1), 1.0)))
    elif schedule != "constant":
        raise ValueError(f"unknown lr schedule {schedule!r}")
    return lr


def embedding_net(run: Run) -> deep_rank_net.DeepRankNet:
    """The weights the run's checkpoints hold and its validation scores: the EMA with --ema-decay."""
    return run.ema.module if run.ema is not None else run.net


def current_lr(run: Run) -> float:
    """The lr of the last step taken."""
    a = run.args
    return scheduled_lr(a.lr, max(run.step - 1, 0), run.total_steps, a.lr_schedule, a.warmup_steps)


def flip_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """CPU generator of the random flips of one step: a function of (seed, epoch, global step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 100_003 + step) % (2**63))


def stop_reason(run: Run) -> str | None:
    """Why to stop now, the same answer on every rank: --max-steps (exact), --time-limit, Ctrl-C.

    Called after every step: under DDP the ranks OR their clock and Ctrl-C flags over the CPU
    (gloo) group, so a stop never waits for the GPU, comes within one step of Ctrl-C (torchrun
    kills workers 30 s after forwarding it) and every rank stops for the same reason.
    """
    args = run.args
    if args.max_steps is not None and run.step >= args.max_steps:
        return "--max-steps"  # the same step count on every rank: no agreement needed
    timed_out = args.time_limit is not None and run.train_seconds() >= args.time_limit
    timed_out, interrupted = distributed.any_rank_host(run.env, timed_out, run.interrupted)
    run.interrupted = interrupted
    if interrupted:
        return "interrupted"
    return "--time-limit" if timed_out else None


def check_finite(run: Run) -> None:
    """Stop (exit 2) if a loss since the last check was NaN/inf; the last good checkpoint stays."""
    bad = run.nonfinite if run.nonfinite is not None else torch.zeros((), dtype=torch.bool, device=run.device)
    if distributed.any_rank(run.env, bool(bad.item()), run.device):
        raise UserError(f"the loss became NaN/inf by step {run.step} (epoch {run.epoch + 1}; try a lower --lr); "
                        f"{run.saver.kept()}")
    run.nonfinite = None


def log_window(run: Run, epoch: int, images_per_s: float, bar) -> None:
    """A log step (the syncs): NaN check, metrics.jsonl record, collapse and weight-growth warnings, progress."""
    check_finite(run)
    means = write_window(run, epoch, images_per_s)
    emb = run.last_emb
    spread = float(torch.pdist(emb).mean()) if emb is not None and len(emb) > 1 else 1.0
    if spread < run.args.collapse_distance:
        warn_once(run, "collapse", f"epoch {epoch + 1}: embeddings collapsed to a point (mean pairwise distance "
                  f"{spread:.2g}; loss stuck at the margin {run.args.margin}): try a lower --lr, a smaller "
                  "--margin or --mining semi-hard")
    check_growth(run)
    bar.set_postfix(refresh=False, loss=f"{means.get('loss', math.nan):.4f}", **{"img/s": f"{images_per_s:.0f}"})


def check_growth(run: Run) -> None:
    """Warn (once) when the trained weights' norm grew --weight-growth-warning times since the run
    started, or stopped being finite. One sync: on log steps, and before every checkpoint, so growth
    between two log steps is still named by the next checkpoint."""
    norm = weight_norm(run.trainee)
    if not norm <= run.args.weight_growth_warning * run.start_weight_norm:  # NaN too
        warn_once(run, "growth", f"step {run.step}: the trained weights' norm grew {norm / run.start_weight_norm:.3g}x "
                  f"since this run started ({run.start_weight_norm:.3g} -> {norm:.3g}): the learning rate is "
                  f"probably too high (--lr {run.args.lr}); try a lower --lr")


def write_window(run: Run, epoch: int, images_per_s: float) -> dict:
    """The metrics.jsonl record of the steps since the last one (their means); returns the means."""
    means = run.window.means()
    run.window.reset()
    run.log.write({"event": "train", "epoch": epoch + 1, "step": run.step, **means, "lr": current_lr(run),
                   "images_per_s": images_per_s, "train_seconds": run.train_seconds()})
    return means


def weight_norm(trainee: nn.Module) -> float:
    """L2 norm of all trained parameters together (one sync)."""
    params = [p.detach().float().norm() for p in trainee.parameters() if p.requires_grad]
    return float(torch.linalg.vector_norm(torch.stack(params))) if params else 0.0


def warn_once(run: Run, key: str, message: str) -> None:
    if run.env.main and key not in run.warned:
        cli.warn(message)
        run.warned.add(key)


def validate(run: Run) -> dict:
    """Val triplet accuracy (fraction with D(q,p) < D(q,n)), mean hinge loss and distances; eval mode."""
    val = run.data.val
    uniq, inverse = np.unique(val, return_inverse=True)  # embed each val image once
    emb = embedding.embed_images(embedding_net(run), image_cache.subset(run.images, uniq), run.spec, batch_size=max(64, 3 * run.args.batch_size),
                                 device=run.device, precision=run.precision, progress=False)  # [U, D]
    e = torch.from_numpy(emb)[torch.from_numpy(inverse.reshape(-1))].view(-1, 3, emb.shape[1])  # [V, 3, D]
    dp, dn = losses.pairwise_distance(e[:, 0], e[:, 1]), losses.pairwise_distance(e[:, 0], e[:, 2])
    return {"val_triplet_accuracy": float((dp < dn).float().mean()),
            "val_loss": float(losses.hinge_terms(dp, dn, run.args.margin).mean()),
            "val_d_pos": float(dp.mean()), "val_d_neg": float(dn.mean()), "val_triplets": int(len(val))}


def plot_curves(out: Path) -> None:
    from deepranking import plots

    plots.training_curves(MetricsLog(out / METRICS_NAME, True).records(), out / resume.CURVES_NAME)


def _on_interrupt(run: Run):
    """First Ctrl-C or SIGTERM: stop after this step with a checkpoint; a second one stops at once."""
    def handler(signum, frame):
        if run.interrupted:
            raise run.interrupt
        run.interrupted = True
        run.interrupt = cli.Terminated if signum == signal.SIGTERM else KeyboardInterrupt
        what = "SIGTERM" if signum == signal.SIGTERM else "interrupt"
        print(f"\n{what}: stopping after this step with a resumable checkpoint (Ctrl-C again to abort)",
              file=sys.stderr, flush=True)
    return handler



if __name__ == "__main__":
    cli.run(main, get_args_parser())
