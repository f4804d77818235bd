"""Train the Deep Ranking network on a triplet CSV with the ranking hinge loss.

    python train_net.py --epochs 1 --optim sgd

Edit the hyperparameters below or override any of them on the command line.
Writes ``temp_<epoch>.model`` after every epoch (epoch counted from 0, as the
classic ``temp_net<epoch>.model``) and ``deepranknet.model`` at the end (in
``--output-dir``), plus ``metrics.jsonl`` and ``training_curves.png``.
``--resume temp_<epoch>.model`` continues a run exactly where it stopped; the
checkpoint must come from the same model and batch settings (else an error
names the flags to pass). Under ``torchrun --nproc_per_node N`` it trains with
DistributedDataParallel (rank 0 writes every file).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from deepranking import cli
import deep_rank_net
from deepranking import image_cache
from deepranking import image_data
from deepranking.cli import UserError

# ---------------------------------------------------------------------------
# Hyperparameters: edit here (each is also a command-line flag).
# ---------------------------------------------------------------------------
BATCH_SIZE = 25  # triplets per step (75 images per forward pass); the classic recipe
LEARNING_RATE = 0.001  # the course reference; higher rates wreck the pretrained layer4
EPOCHS = 1  # one pass over the triplet CSV; pretrained ResNet-101 keeps improving for ~10
LR_SCHEDULE = "constant"  # constant | cosine: cosine decays the lr to 0 by the last step of --epochs
WARMUP_STEPS = 0  # linear lr warm-up over the first N steps (a high lr from scratch can diverge early)
OPTIMIZER = "sgd"  # sgd | adam | rms; SGD + Nesterov is the classic recipe
MOMENTUM = 0.9  # SGD/RMSprop momentum, as in the classic code
NESTEROV = True  # Nesterov momentum for SGD, as in the classic code
WEIGHT_DECAY = 0.0  # the classic recipe uses none; the frozen backbone regularises enough
MARGIN = 1.0  # gap g in max(0, g + D(q,p) - D(q,n)); unit-norm embeddings: D in [0, 2]
IMAGE_SIZE = 224  # TinyImageNet's 64 px images are upsampled on the device, as classic
EMBEDDING_DIM = 4096  # the paper's embedding size
ARCH = "resnet101"  # backbone; resnet18 for a quick CPU run
WEIGHTS = "imagenet"  # imagenet | none | path to a state dict; pretrained converges far faster
TRAIN_FROM = "layer4"  # train layer4 + heads; earlier stages (and their BatchNorm) stay frozen
MULTISCALE = True  # the paper's two shallow sub-sampling paths next to the deep one
MINING = "none"  # none | batch-hard | hard-negative | semi-hard: harder examples found inside each batch
ID_LOSS_WEIGHT = 0.0  # > 0 adds a class (softmax) loss on the embeddings; converges faster from scratch
NUM_WORKERS = 2  # DataLoader workers gathering cached rows while the model computes
SEED = 0  # same seed + same CSV -> same weights (on the same device)
LOG_EVERY = 20  # steps between metrics.jsonl training records (a few per minute on a GPU)
COLLAPSE_DISTANCE = 1e-3  # mean pairwise distance in a batch below this = embeddings collapsed

OPTIMIZERS = ("sgd", "adam", "rms")
LR_SCHEDULES = ("constant", "cosine")
MINING_MODES = ("none", "batch-hard", "hard-negative", "semi-hard")
ID_LOSS_SCALE = 16.0  # cosine-classifier temperature: logits = 16 * cos(embedding, class weight)
FINAL_NAME = "deepranknet.model"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"
DEFAULT_TRIPLETS = Path("training_triplet_sample.csv")
DEFAULT_VAL_TRIPLETS = "val_triplet_sample.csv"
# Settings a resumed run must share with its checkpoint (else the weights or the batch order differ).
RESUME_MUST_MATCH = ("arch", "embedding_dim", "single_scale", "train_from", "image_size", "optim", "batch_size",
                     "seed", "id_loss_weight")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triplets", type=Path, default=DEFAULT_TRIPLETS, help="training triplet CSV")
    p.add_argument("--val-triplets", type=Path, default=None,
                   help=f"validation triplet CSV (default: {DEFAULT_VAL_TRIPLETS} next to --triplets, "
                        "skipped with a warning if absent)")
    p.add_argument("--val-fraction", type=cli.fraction, default=0.0,
                   help="hold out this fraction of the training queries (seeded) for validation instead "
                        "(for CSVs without a validation file)")
    p.add_argument("--epochs", type=cli.positive_int, default=EPOCHS, help="training epochs")
    p.add_argument("--optim", type=str.lower, choices=OPTIMIZERS, default=OPTIMIZER,
                   help="optimizer (case-insensitive)")
    p.add_argument("--batch-size", type=cli.positive_int, default=BATCH_SIZE, help="triplets per step")
    p.add_argument("--lr", type=cli.positive_float, default=LEARNING_RATE, help="learning rate (> 0)")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=LR_SCHEDULE,
                   help="constant, or cosine decay to 0 over all --epochs (--max-steps/--time-limit "
                        "stop early without shortening it)")
    p.add_argument("--warmup-steps", type=cli.non_negative_int, default=WARMUP_STEPS,
                   help="linear learning-rate warm-up over the first N optimizer steps")
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="momentum (sgd, rms)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="weight decay")
    p.add_argument("--margin", type=cli.positive_float, default=MARGIN, help="gap g of the hinge loss (> 0)")
    p.add_argument("--arch", choices=deep_rank_net.ARCHITECTURES, default=ARCH, help="backbone architecture")
    p.add_argument("--weights", default=WEIGHTS, help="imagenet, none, or a local state-dict file")
    p.add_argument("--train-from", choices=deep_rank_net.TRAIN_FROM_STAGES, default=TRAIN_FROM,
                   help="first backbone stage to train; earlier ones (and their BatchNorm) are frozen")
    p.add_argument("--single-scale", action="store_true", default=not MULTISCALE,
                   help="drop the two shallow paths (deep path only)")
    p.add_argument("--image-size", type=cli.positive_int, default=IMAGE_SIZE, help="training image size")
    p.add_argument("--embedding-dim", type=cli.positive_int, default=EMBEDDING_DIM, help="embedding size")
    p.add_argument("--mining", choices=MINING_MODES, default=MINING,
                   help="online mining inside each batch (needs class folders): batch-hard = every image is an "
                        "anchor with its hardest positive and negative; hard-negative / semi-hard = each "
                        "triplet's negative replaced")
    p.add_argument("--id-loss-weight", type=cli.non_negative_float, default=ID_LOSS_WEIGHT,
                   help="weight of a class (cosine softmax) loss added to the ranking loss (needs class "
                        "folders; 0: ranking loss only)")
    p.add_argument("--output-dir", type=Path, default=Path("."), help="where checkpoints and logs go")
    p.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint (temp_<epoch>.model)")
    p.add_argument("--force", action="store_true", help="start afresh: delete an earlier run's checkpoints, metrics.jsonl and curves in --output-dir")
    p.add_argument("--seed", type=int, default=SEED, help="random seed (init, triplet order, flips)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=cli.non_negative_int, default=NUM_WORKERS,
                   help="DataLoader worker processes (0: gather in the main process)")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast: auto = on for CUDA, off for CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model (faster steps, slow start)")
    p.add_argument("--max-steps", type=cli.positive_int, default=None,
                   help="stop after this many optimizer steps in total, saving a resumable checkpoint")
    p.add_argument("--time-limit", type=cli.positive_float, default=None,
                   help="stop after this many seconds of training (like --max-steps: resumable checkpoint)")
    p.add_argument("--save-every", type=cli.non_negative_int, default=0,
                   help="also save temp_<epoch>.model every N steps mid-epoch (0: end of epoch only)")
    p.add_argument("--cache-size", type=cli.non_negative_int, default=0,
                   help="side of the decoded-image cache (0: the images' own size when small, else --image-size)")
    p.add_argument("--log-every", type=cli.positive_int, default=LOG_EVERY,
                   help="steps between metrics.jsonl training records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------
# Loss and mining: small pure functions
# ---------------------------------------------------------------------------


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance [B] of a, b [B, D] (a tiny eps keeps the gradient finite at 0)."""
    return (a - b).pow(2).sum(1).add(1e-12).sqrt()


def hinge_terms(d_pos: torch.Tensor, d_neg: torch.Tensor, margin: float) -> torch.Tensor:
    """Per-triplet loss [B]: max(0, g + D(q,p) - D(q,n))."""
    return F.relu(margin + d_pos - d_neg)


def triplet_hinge_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over the batch of max(0, g + D(q,p) - D(q,n)); q, p, n: [B, D], Euclidean D (not squared)."""
    return hinge_terms(pairwise_distance(q, p), pairwise_distance(q, n), margin).mean()


def batch_hard_distances(emb: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-hard (Hermans et al. 2017): every row of emb [M, D] is an anchor.

    Returns (d_pos [A], d_neg [A]) for the A anchors that have both another
    same-class row (the farthest is its positive) and an other-class row (the
    closest is its negative); labels [M]. Euclidean distances, differentiable.
    """
    e = emb.float()
    sq = (e * e).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2.0 * e @ e.T).clamp(min=1e-12).sqrt()  # [M, M]
    same = labels[:, None] == labels[None, :]
    same.fill_diagonal_(False)
    other = labels[:, None] != labels[None, :]
    valid = same.any(1) & other.any(1)
    d_pos = torch.where(same, dist, torch.full_like(dist, -1.0)).amax(1)
    d_neg = torch.where(other, dist, torch.full_like(dist, float("inf"))).amin(1)
    return d_pos[valid], d_neg[valid]


def mine_negatives(q: torch.Tensor, pos_dist: torch.Tensor, pool: torch.Tensor, q_labels: torch.Tensor,
                   pool_labels: torch.Tensor, mode: str, margin: float) -> torch.Tensor:
    """Index [B] into ``pool`` [M, D] of the negative to use for each query of q [B, D].

    hard-negative: the closest pool embedding of another class. semi-hard: the
    closest other-class embedding farther than the positive (pos_dist [B]) yet
    inside the margin band D(q,p) < D(q,n) < D(q,p) + g; the hardest one when
    the band is empty. Queries with no other-class candidate get -1 (the
    caller keeps the CSV's negative). Labels: q_labels [B], pool_labels [M].
    """
    dist = torch.cdist(q.detach().float(), pool.detach().float())  # [B, M]
    other = q_labels[:, None] != pool_labels[None, :]  # [B, M]
    inf = torch.tensor(float("inf"), device=dist.device)
    idx = torch.where(other, dist, inf).argmin(1)  # hardest negative
    if mode == "semi-hard":
        dp = pos_dist.detach().float()[:, None]  # [B, 1]
        band = other & (dist > dp) & (dist < dp + margin)
        idx = torch.where(band.any(1), torch.where(band, dist, inf).argmin(1), idx)
    elif mode != "hard-negative":
        raise ValueError(f"unknown mining mode {mode!r}")
    return torch.where(other.any(1), idx, torch.full_like(idx, -1))


class Trainee(torch.nn.Module):
    """What the optimizer trains: the network, plus (``n_classes`` > 0) a cosine classifier on its embeddings.

    forward(x [B, 3, S, S]) -> (embeddings [B, D], class logits [B, C] or None). The
    classifier exists only during training (checkpoints keep it as ``id_head`` for
    --resume); embeddings and every later stage use the network alone.
    """

    def __init__(self, net: deep_rank_net.DeepRankNet, n_classes: int):
        super().__init__()
        self.net = net
        dim = net.config["embedding_dim"]
        self.id_head = torch.nn.Parameter(torch.randn(n_classes, dim) * dim ** -0.5) if n_classes else None

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self.net.trainable_parameters() + ([self.id_head] if self.id_head is not None else [])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        emb = self.net(x)
        if self.id_head is None:
            return emb, None
        return emb, ID_LOSS_SCALE * emb.float() @ F.normalize(self.id_head, dim=1).T


def label_ids(paths: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer class id [N] of each image path from its folder name, and the number of classes."""
    names = np.array([image_data.label_from_path(p) for p in paths])
    uniq, ids = np.unique(names, return_inverse=True)
    return ids.astype(np.int64), len(uniq)


def check_labels_usable(trip: np.ndarray, labels: np.ndarray, n_classes: int, min_fit: float = 0.9) -> None:
    """Mining and the class loss need folder classes: q and p share one and n does not, for ``min_fit`` of the rows."""
    lq, lp, ln = labels[trip[:, 0]], labels[trip[:, 1]], labels[trip[:, 2]]
    fit = float(((lq == lp) & (lq != ln)).mean())
    if n_classes < 2 or fit < min_fit:
        raise UserError("--mining and --id-loss-weight need class labels from folder names; this CSV has none "
                        f"({n_classes} folder(s), {fit:.0%} of triplets fit them) — use --mining none "
                        "--id-loss-weight 0")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


def epoch_batches(n_triplets: int, batch_size: int, seed: int, epoch: int, rank: int = 0,
                  world: int = 1) -> list[np.ndarray]:
    """This rank's batches of triplet indices for ``epoch``: a seeded permutation cut into batches.

    The last batch may be partial (it is trained, not dropped). Every rank sees
    the same global order and takes every ``world``-th batch; the first batches
    are repeated to give all ranks the same step count (DDP syncs every step).
    """
    perm = np.random.default_rng([seed, epoch]).permutation(n_triplets)
    batches = [perm[i:i + batch_size] for i in range(0, n_triplets, batch_size)]
    batches += batches[:(-len(batches)) % world]
    return batches[rank::world]


class EpochBatchSampler(torch.utils.data.Sampler):
    """Yields this rank's batches (arrays of triplet indices) of the current epoch, minus ``skip`` done ones.

    Iterated in the main process, so ``set_epoch`` works with persistent workers.
    """

    def __init__(self, n_triplets: int, batch_size: int, seed: int, rank: int, world: int):
        self.args = (n_triplets, batch_size, seed)
        self.rank, self.world = rank, world
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def batches(self) -> list[np.ndarray]:
        n, b, seed = self.args
        return epoch_batches(n, b, seed, self.epoch, self.rank, self.world)[self.skip:]

    def __iter__(self):
        return iter(self.batches())

    def __len__(self) -> int:
        return len(self.batches())


class TripletImages(torch.utils.data.Dataset):
    """dataset[batch] = (uint8 images [3b, H, W, 3]: queries, positives, negatives; their image ids [3b]).

    ``images`` is the memory-mapped cache [N, H, W, 3]; workers only gather rows,
    so no image is decoded during training.
    """

    def __init__(self, images: np.ndarray, triplets: np.ndarray):
        self.images, self.triplets = images, triplets  # [N, H, W, 3], [T, 3]

    def __len__(self) -> int:
        return len(self.triplets)

    def __getitem__(self, batch: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        order = self.triplets[batch].T.reshape(-1)  # [3b]: queries, then positives, then negatives
        return torch.from_numpy(np.ascontiguousarray(self.images[order])), torch.from_numpy(order)


def split_by_query(trip: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) [T]: a seeded ``fraction`` of the query images goes to val."""
    queries = np.unique(trip[:, 0])
    n_val = max(1, int(round(fraction * len(queries))))
    held = np.random.default_rng([seed, 7919]).choice(queries, size=n_val, replace=False)
    val = np.isin(trip[:, 0], held)
    if val.all():
        raise UserError(f"--val-fraction {fraction} leaves no training triplets")
    return ~val, val


def resolve_val_path(args) -> Path | None:
    """The validation CSV: --val-triplets, else val_triplet_sample.csv next to --triplets if present."""
    if args.val_triplets is not None:
        if args.val_fraction > 0:
            raise UserError("give either --val-triplets or --val-fraction, not both")
        return cli.check_input_file(args.val_triplets, "validation triplet CSV")
    if args.val_fraction > 0:
        return None
    default = args.triplets.parent / DEFAULT_VAL_TRIPLETS
    if default.is_file():
        return default
    cli.warn(f"no validation CSV ({default} not found): training without validation "
                   "(use --val-triplets CSV or --val-fraction F)")
    return None


def load_triplets(args) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
    """Read the CSV(s): (unique image paths [N], train triplets [T, 3], val triplets [V, 3] or None)."""
    val_path = resolve_val_path(args)
    train_cols = image_data.read_triplet_csv(args.triplets)
    val_cols = image_data.read_triplet_csv(val_path) if val_path is not None else None
    all_paths = np.concatenate(list(train_cols) + (list(val_cols) if val_cols is not None else []))
    paths, inverse = np.unique(all_paths.astype(str), return_inverse=True)
    t = len(train_cols[0])
    train = inverse[:3 * t].reshape(3, t).T.copy()
    val = inverse[3 * t:].reshape(3, -1).T.copy() if val_cols is not None else None
    if args.val_fraction > 0:
        keep, held = split_by_query(train, args.val_fraction, args.seed)
        train, val = train[keep], train[held]
    return paths, train, val


# ---------------------------------------------------------------------------
# Training helpers
# ---------------------------------------------------------------------------


def build_optimizer(name: str, params, args) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=NESTEROV and args.momentum > 0,
                               weight_decay=args.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    if name == "rms":
        return torch.optim.RMSprop(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)
    raise UserError(f"unknown optimizer {name!r} (choose from {', '.join(OPTIMIZERS)})")


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


def check_outputs(out: Path, force: bool, resume: bool) -> None:
    """Refuse to overwrite an earlier run's files unless --force or --resume (names the file)."""
    if force or resume:
        return
    for path in [out / FINAL_NAME, out / METRICS_NAME, *sorted(out.glob("temp_*.model"))]:
        if path.exists():
            raise UserError(f"{path} already exists from an earlier run (use --force to overwrite or --resume CKPT)")


def check_resume_args(ckpt: dict, args, path: Path) -> None:
    """A resumed run must use the checkpoint's model and batch settings; say which flags differ."""
    saved = dict(ckpt.get("args") or {})
    cfg = ckpt["model_config"]
    saved.update(arch=cfg["arch"], embedding_dim=cfg["embedding_dim"], single_scale=not cfg["multiscale"],
                 image_size=cfg["image_size"], train_from=cfg.get("train_from", saved.get("train_from")))
    differs = [k for k in RESUME_MUST_MATCH if k in saved and saved[k] != getattr(args, k)]
    if differs:
        flags = " ".join(_flag(k, saved[k]) for k in differs)
        raise UserError(f"checkpoint {path} was trained with other settings; resume with: {flags}")


def _flag(name: str, value) -> str:
    if isinstance(value, bool):
        return f"--{name.replace('_', '-')}" if value else f"(no --{name.replace('_', '-')})"
    return f"--{name.replace('_', '-')} {value}"


def flip_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    """CPU generator of the random flips of one step: a function of (seed, epoch, global step) only."""
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 100_003 + step) % (2**63))


def weights_finite_state(state: dict) -> bool:
    """True when every floating-point tensor of a state dict is finite (no NaN/inf)."""
    return all(bool(torch.isfinite(t).all()) for t in state.values() if t.is_floating_point())


def validate(model, images, val: np.ndarray, args, device, amp: bool) -> dict:
    """Val triplet accuracy (fraction with D(q,p) < D(q,n)), mean hinge loss and distances; eval mode."""
    uniq, inverse = np.unique(val, return_inverse=True)  # embed each val image once
    emb = deep_rank_net.embed_images(model, images[uniq], args.image_size, batch_size=max(64, 3 * args.batch_size),
                                     device=device, amp=amp, progress=False)  # [U, D]
    e = torch.from_numpy(emb)[torch.from_numpy(inverse.reshape(-1))].view(-1, 3, emb.shape[1])  # [V, 3, D]
    dp, dn = pairwise_distance(e[:, 0], e[:, 1]), pairwise_distance(e[:, 0], e[:, 2])
    model.train()
    return {"val_triplet_accuracy": float((dp < dn).float().mean()),
            "val_loss": float(hinge_terms(dp, dn, args.margin).mean()),
            "val_d_pos": float(dp.mean()), "val_d_neg": float(dn.mean()), "val_triplets": int(len(val))}


class RunningStats:
    """Per-key sums of the per-step training statistics since the last reset.

    Each key is averaged over the steps that reported it: a batch-hard step with no
    usable anchor reports no distances.
    """

    KEYS = ("loss", "d_pos", "d_neg", "active_fraction", "id_loss")

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.sums, self.counts = dict.fromkeys(self.KEYS, 0.0), dict.fromkeys(self.KEYS, 0)

    def add(self, **values: float) -> None:
        for k, v in values.items():
            self.sums[k] += v
            self.counts[k] += 1

    def means(self) -> dict:
        return {k: v / self.counts[k] if self.counts[k] else float("nan") for k, v in self.sums.items()}


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------


def main(args) -> None:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    is_main = rank == 0
    out = args.output_dir
    if out.exists() and not out.is_dir():
        raise UserError(f"--output-dir is not a folder: {out}")
    check_outputs(out, args.force, args.resume is not None)
    device = cli.pick_device(args.device)
    if world > 1:
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        torch.distributed.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        train(args, out, device, rank, world, is_main)
    finally:
        if world > 1:
            torch.distributed.destroy_process_group()


def train(args, out: Path, device: torch.device, rank: int, world: int, is_main: bool) -> None:
    # --- inputs: everything that can fail does so before any output is touched ---
    ckpt = None
    if args.resume is not None:
        ckpt = deep_rank_net.load_checkpoint(args.resume)
        check_resume_args(ckpt, args, args.resume)
    paths, trip, val = load_triplets(args)
    labels, n_classes = None, 0
    if args.mining != "none" or args.id_loss_weight > 0:
        labels, n_classes = label_ids(paths)
        check_labels_usable(trip, labels, n_classes)
    cache_size = args.cache_size or image_cache.choose_cache_size(list(paths), args.image_size)
    images = image_cache.cache_images(list(paths), cache_size, progress=is_main and not args.no_progress)

    # --- model and optimizer ---
    cli.seed_everything(args.seed)
    model = deep_rank_net.build_model(args.arch, args.embedding_dim, not args.single_scale,
                                      "none" if ckpt is not None else args.weights, args.train_from)
    # channels_last helps GPU convolutions; on CPU (oneDNN, small images) NCHW measured ~1.6x faster.
    memory_format = torch.channels_last if device.type == "cuda" else torch.contiguous_format
    model = model.to(device).to(memory_format=memory_format)
    trainee = Trainee(model, n_classes if args.id_loss_weight > 0 else 0).to(device)
    optimizer = build_optimizer(args.optim, trainee.trainable_parameters(), args)
    start_epoch, global_step, skip, seconds_before = 0, 0, 0, 0.0
    if ckpt is not None:
        try:
            model.load_state_dict(deep_rank_net.strip_wrapper_prefixes(ckpt["model"]))
            if trainee.id_head is not None:
                trainee.id_head.data.copy_(ckpt["id_head"])
            if ckpt.get("optimizer"):
                optimizer.load_state_dict(ckpt["optimizer"])
        except (RuntimeError, ValueError, KeyError, TypeError) as exc:
            raise UserError(f"checkpoint {args.resume} does not fit this model/optimizer: "
                            f"{str(exc).strip().splitlines()[0]}")
        if ckpt.get("rng"):
            deep_rank_net.restore_rng_state(ckpt["rng"])
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["step"])
        seconds_before = float(ckpt.get("train_seconds", 0.0))
        skip = int(ckpt.get("step_in_epoch", 0))
        if is_main:
            print(f"resuming from {args.resume}: epoch {start_epoch + 1}, step {global_step}", file=sys.stderr)
    trainee.train()
    train_model = trainee
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            trainee, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    amp_dtype = deep_rank_net.resolve_amp_dtype(device, {"auto": None, "on": True, "off": False}[args.amp])
    labels_t = torch.from_numpy(labels).to(device) if labels is not None else None

    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        if ckpt is None:  # a fresh (--force) run: an earlier run's model must not pass for this one's
            for stale in [out / METRICS_NAME, out / CURVES_NAME, out / FINAL_NAME, *out.glob("temp_*.model")]:
                stale.unlink(missing_ok=True)

    def save(path: Path, epoch: int, step_in_epoch: int) -> None:
        if not is_main:
            return
        if not weights_finite_state(model.state_dict()):
            raise UserError(f"the weights became NaN/inf at step {global_step}; not saving {path} "
                            f"(the last good checkpoint is kept; try a lower --lr)")
        extra = {"step_in_epoch": step_in_epoch, "train_seconds": train_seconds()}
        if trainee.id_head is not None:
            extra["id_head"] = trainee.id_head.detach().cpu()
        deep_rank_net.save_checkpoint(path, model, optimizer, epoch=epoch, step=global_step,
                                      image_size=args.image_size, args=vars(args),
                                      rng=deep_rank_net.capture_rng_state(), extra=extra)

    def train_seconds() -> float:
        """Wall seconds of training so far, the parts before a --resume included."""
        return seconds_before + time.perf_counter() - train_start

    def log(record: dict) -> None:
        if is_main:
            with open(out / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    from tqdm import tqdm

    sampler = EpochBatchSampler(len(trip), args.batch_size, args.seed, rank, world)
    loader = torch.utils.data.DataLoader(
        TripletImages(images, trip), sampler=sampler, batch_size=None, num_workers=args.num_workers,
        pin_memory=device.type == "cuda", persistent_workers=args.num_workers > 0)
    last_good: Path | None = Path(args.resume) if args.resume is not None else None
    steps_per_epoch = len(epoch_batches(len(trip), args.batch_size, args.seed, 0, rank, world))
    total_steps = args.epochs * steps_per_epoch  # the lr schedule's length, whatever stops the run earlier
    if is_main:
        print(f"training on {len(trip)} triplets ({len(paths)} images, cache {cache_size} px) for "
              f"{args.epochs} epoch(s), {steps_per_epoch} steps each, "
              f"{'validating on ' + str(len(val)) + ' triplets' if val is not None else 'no validation'}",
              file=sys.stderr)
    lr = scheduled_lr(args.lr, global_step, total_steps, args.lr_schedule, args.warmup_steps)
    train_start = time.perf_counter()
    for epoch in range(start_epoch, args.epochs):
        done = skip if epoch == start_epoch else 0  # steps of this epoch already taken
        sampler.set_epoch(epoch, done)
        total = done + len(sampler)
        bar = tqdm(loader, total=total, initial=done, desc=f"epoch {epoch + 1}/{args.epochs}", unit="step",
                   disable=not is_main or args.no_progress, dynamic_ncols=True)
        epoch_stats, log_stats = RunningStats(), RunningStats()
        collapse_warned = False
        t0, n_images = time.perf_counter(), 0
        stop = False
        for batch, order in bar:
            x = deep_rank_net.preprocess(batch.to(device, non_blocking=True), args.image_size, train=True,
                                         generator=flip_generator(args.seed, epoch, global_step))
            x = x.contiguous(memory_format=memory_format)  # [3b, 3, S, S]
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                # ONE forward of queries, positives and negatives: emb [3b, D], logits [3b, C] or None
                emb, logits = train_model(x)
            emb = emb.float()
            b = emb.shape[0] // 3
            q, p, n = emb[:b], emb[b:2 * b], emb[2 * b:]
            batch_labels = labels_t[order.to(device)] if labels_t is not None else None  # [3b]
            if args.mining == "batch-hard":
                d_pos, d_neg = batch_hard_distances(emb, batch_labels)  # [A], A <= 3b anchors
            else:
                d_pos = pairwise_distance(q, p)  # [b]
                if args.mining != "none":
                    neg = mine_negatives(q, d_pos, emb, batch_labels[:b], batch_labels, args.mining, args.margin)
                    n = torch.where((neg >= 0)[:, None], emb[neg.clamp(min=0)], n)
                d_neg = pairwise_distance(q, n)
            per_triplet = hinge_terms(d_pos, d_neg, args.margin)  # [b] (or [A])
            loss = per_triplet.mean() if len(per_triplet) else emb.sum() * 0.0  # no anchor: no ranking term
            id_loss = torch.zeros((), device=emb.device)
            if logits is not None:
                id_loss = F.cross_entropy(logits.float(), batch_labels)
                loss = loss + args.id_loss_weight * id_loss
            check_finite(loss, epoch, global_step, last_good, world)
            lr = scheduled_lr(args.lr, global_step, total_steps, args.lr_schedule, args.warmup_steps)
            for group in optimizer.param_groups:
                group["lr"] = lr
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            done += 1
            n_images += emb.shape[0] * world
            stats = dict(loss=loss.item(), id_loss=id_loss.item())
            if len(per_triplet):  # batch-hard: a batch may hold no anchor with both a positive and a negative
                stats.update(d_pos=d_pos.mean().item(), d_neg=d_neg.mean().item(),
                             active_fraction=(per_triplet > 0).float().mean().item())
            epoch_stats.add(**stats)
            log_stats.add(**stats)
            spread = torch.pdist(emb.detach()).mean().item() if emb.shape[0] > 1 else 1.0
            if spread < COLLAPSE_DISTANCE and not collapse_warned and is_main:
                cli.warn(f"epoch {epoch + 1}: embeddings collapsed to a point (mean pairwise distance "
                               f"{spread:.2g}; loss stuck at the margin {args.margin}): try a lower --lr, "
                               "a smaller --margin or --mining semi-hard")
                collapse_warned = True
            rate = n_images / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{stats['loss']:.4f}", img_s=f"{rate:.0f}", refresh=False)
            if global_step % args.log_every == 0:
                log({"event": "train", "epoch": epoch + 1, "step": global_step, **log_stats.means(),
                     "lr": lr, "images_per_s": rate, "train_seconds": train_seconds()})
                log_stats.reset()
            at_limit = reached_limit(args, global_step, train_start, world, device)
            if done < total and (at_limit or (args.save_every and global_step % args.save_every == 0)):
                last_good = out / f"temp_{epoch}.model"
                save(last_good, epoch, done)
            if at_limit and done < total:
                stop = True
                break
        bar.close()
        if stop:
            if is_main:
                print(f"stopped after {global_step} steps ({limit_name(args)}); continue with --resume {last_good}")
            return
        record = {"event": "epoch", "epoch": epoch + 1, "step": global_step, **epoch_stats.means(), "lr": lr,
                  "images_per_s": n_images / max(time.perf_counter() - t0, 1e-9), "train_seconds": train_seconds()}
        if val is not None and is_main:
            record.update(validate(model, images, val, args, device, amp_dtype is not None))
        if is_main:
            msg = (f"epoch {epoch + 1}: loss {record['loss']:.4f}, D(q,p) {record['d_pos']:.3f}, "
                   f"D(q,n) {record['d_neg']:.3f}, active triplets {record['active_fraction']:.0%}")
            if "val_triplet_accuracy" in record:
                msg += (f", val triplet accuracy {record['val_triplet_accuracy']:.4f}, "
                        f"val loss {record['val_loss']:.4f}")
            print(msg, flush=True)
        log(record)
        last_good = out / f"temp_{epoch}.model"
        save(last_good, epoch + 1, 0)
        if epoch + 1 < args.epochs and reached_limit(args, global_step, train_start, world, device):
            if is_main:
                print(f"stopped after {global_step} steps ({limit_name(args)}); continue with --resume {last_good}")
            return
    if is_main:
        save(out / FINAL_NAME, args.epochs, 0)
        plot_curves(out)
        print(f"wrote {out / FINAL_NAME}, {out / METRICS_NAME} and {out / CURVES_NAME}")


def reached_limit(args, global_step: int, train_start: float, world: int, device: torch.device) -> bool:
    """--max-steps or --time-limit reached (under DDP: on any rank, so that all ranks stop together)."""
    hit = args.max_steps is not None and global_step >= args.max_steps
    if args.time_limit is not None:
        hit = hit or time.perf_counter() - train_start >= args.time_limit
        if world > 1:
            flag = torch.tensor([float(hit)], device=device)  # NCCL reduces CUDA tensors only
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
            hit = bool(flag.item() > 0)
    return hit


def limit_name(args) -> str:
    return " / ".join(n for n, v in (("--max-steps", args.max_steps), ("--time-limit", args.time_limit)) if v)


def check_finite(loss: torch.Tensor, epoch: int, global_step: int, last_good: Path | None, world: int) -> None:
    """Stop (exit 2) on a NaN/inf loss, before the optimizer step can spoil the weights; all ranks agree."""
    bad = (~torch.isfinite(loss.detach())).float().reshape(1)
    if world > 1:
        torch.distributed.all_reduce(bad, op=torch.distributed.ReduceOp.MAX)
    if bad.item() > 0:
        kept = f"; the last good checkpoint is {last_good}" if last_good else "; no checkpoint was written"
        raise UserError(f"loss became {loss.item()} at epoch {epoch + 1}, step {global_step + 1} "
                        f"(try a lower --lr){kept}")


def plot_curves(out: Path) -> None:
    """Training loss (per log record and per epoch) and val accuracy/loss per epoch vs step."""
    from deepranking import plots

    records = [json.loads(line) for line in (out / METRICS_NAME).read_text(encoding="utf-8").splitlines()
               if line.strip()]
    steps = [r for r in records if r.get("event") == "train"]
    epochs = [r for r in records if r.get("event") == "epoch"]
    series = {}
    if steps:
        series["train loss"] = ([r["step"] for r in steps], [r["loss"] for r in steps])
    series["train loss (epoch mean)"] = ([r["step"] for r in epochs], [r["loss"] for r in epochs])
    with_val = [r for r in epochs if "val_loss" in r]
    if with_val:
        series["val loss"] = ([r["step"] for r in with_val], [r["val_loss"] for r in with_val])
        series["val triplet accuracy"] = ([r["step"] for r in with_val],
                                          [r["val_triplet_accuracy"] for r in with_val])
    plots.line_chart(out / CURVES_NAME, series, "Deep Ranking training", "step", "loss / accuracy")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
