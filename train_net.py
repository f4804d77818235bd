"""Train the Deep Ranking network on a triplet CSV with the ranking hinge loss.

    python train_net.py --epochs 1 --optim sgd

Edit the hyperparameters below or override any of them on the command line.
Writes ``temp_<epoch>.model`` after every epoch and ``deepranknet.model`` at the
end (in ``--output-dir``), plus ``metrics.jsonl`` and ``training_curves.png``.
Under ``torchrun --nproc_per_node N`` it trains with DistributedDataParallel.
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

import cli_utils
import deep_rank_net
import image_cache
import image_data
from cli_utils import UserError

# ---------------------------------------------------------------------------
# Hyperparameters: edit here (each is also a command-line flag).
# ---------------------------------------------------------------------------
BATCH_SIZE = 25  # triplets per step (75 images per forward pass); the classic recipe
LEARNING_RATE = 0.001  # the course reference; higher rates wreck the pretrained layer4
EPOCHS = 1  # one pass over the triplet CSV; pretrained ResNet-101 improves for ~10
OPTIMIZER = "sgd"  # sgd | adam | rms; SGD+Nesterov is the classic recipe
MOMENTUM = 0.9  # SGD/RMSprop momentum
NESTEROV = True  # Nesterov momentum for SGD, as in the classic code
WEIGHT_DECAY = 0.0  # the classic recipe uses none
MARGIN = 1.0  # gap g in max(0, g + D(q,p) - D(q,n)); must be > 0
IMAGE_SIZE = 224  # TinyImageNet's 64 px images are upsampled on the device, as classic
EMBEDDING_DIM = 4096  # the paper's embedding size
ARCH = "resnet101"  # backbone; resnet18 for a quick CPU run
WEIGHTS = "imagenet"  # imagenet | none | path to a state dict
TRAIN_FROM = "layer4"  # train layer4 + heads; earlier stages (and their BatchNorm) frozen
MULTISCALE = True  # add the paper's two shallow sub-sampling paths
MINING = "none"  # none | batch-hard | semi-hard: harder negatives inside each batch
NUM_WORKERS = 2  # DataLoader workers gathering cached images
SEED = 0  # same seed, same CSV -> same weights
LOG_EVERY = 20  # steps between metrics.jsonl training records

OPTIMIZERS = ("sgd", "adam", "rms")
MINING_MODES = ("none", "batch-hard", "semi-hard")
FINAL_NAME = "deepranknet.model"
METRICS_NAME = "metrics.jsonl"
CURVES_NAME = "training_curves.png"


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--triplets", type=Path, default=Path("training_triplet_sample.csv"), help="training triplet CSV")
    p.add_argument("--val-triplets", type=Path, default=None,
                   help="validation triplet CSV (default val_triplet_sample.csv if it exists)")
    p.add_argument("--val-fraction", type=cli_utils.fraction, default=0.0,
                   help="hold out this fraction of the training queries (seeded) for validation instead")
    p.add_argument("--epochs", type=cli_utils.positive_int, default=EPOCHS, help="training epochs")
    p.add_argument("--optim", type=str.lower, choices=OPTIMIZERS, default=OPTIMIZER, help="optimizer")
    p.add_argument("--batch-size", type=cli_utils.positive_int, default=BATCH_SIZE, help="triplets per step")
    p.add_argument("--lr", type=cli_utils.positive_float, default=LEARNING_RATE, help="learning rate")
    p.add_argument("--momentum", type=float, default=MOMENTUM, help="momentum (sgd, rms)")
    p.add_argument("--weight-decay", type=float, default=WEIGHT_DECAY, help="weight decay")
    p.add_argument("--margin", type=cli_utils.positive_float, default=MARGIN, help="gap g of the hinge loss (> 0)")
    p.add_argument("--arch", choices=deep_rank_net.ARCHITECTURES, default=ARCH, help="backbone architecture")
    p.add_argument("--weights", default=WEIGHTS, help="imagenet, none, or a local state-dict file")
    p.add_argument("--train-from", choices=deep_rank_net.TRAIN_FROM_STAGES, default=TRAIN_FROM,
                   help="first backbone stage to train; earlier ones are frozen")
    p.add_argument("--single-scale", action="store_true", default=not MULTISCALE,
                   help="drop the two shallow paths (deep path only)")
    p.add_argument("--image-size", type=cli_utils.positive_int, default=IMAGE_SIZE, help="training image size")
    p.add_argument("--embedding-dim", type=cli_utils.positive_int, default=EMBEDDING_DIM, help="embedding size")
    p.add_argument("--mining", choices=MINING_MODES, default=MINING, help="online negative mining in each batch")
    p.add_argument("--output-dir", type=Path, default=Path("."), help="where checkpoints and logs go")
    p.add_argument("--resume", type=Path, default=None, help="continue from this checkpoint")
    p.add_argument("--force", action="store_true", help="overwrite outputs of an earlier run")
    p.add_argument("--seed", type=int, default=SEED, help="random seed")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--num-workers", type=cli_utils.non_negative_int, default=NUM_WORKERS, help="DataLoader workers")
    p.add_argument("--amp", choices=("auto", "on", "off"), default="auto",
                   help="bf16 autocast: auto = on for CUDA, off for CPU")
    p.add_argument("--compile", action="store_true", help="torch.compile the model")
    p.add_argument("--max-steps", type=cli_utils.positive_int, default=None,
                   help="stop after this many optimizer steps in total (checkpoint saved)")
    p.add_argument("--save-every", type=cli_utils.non_negative_int, default=0,
                   help="also save temp_<epoch>.model every N steps (0: end of epoch only)")
    p.add_argument("--cache-size", type=cli_utils.non_negative_int, default=0,
                   help="side of the decoded-image cache (0: native size when small, else --image-size)")
    p.add_argument("--log-every", type=cli_utils.positive_int, default=LOG_EVERY, help="steps between log records")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


# ---------------------------------------------------------------------------
# Loss and mining: small pure functions
# ---------------------------------------------------------------------------


def triplet_hinge_loss(q: torch.Tensor, p: torch.Tensor, n: torch.Tensor, margin: float) -> torch.Tensor:
    """mean over the batch of max(0, g + D(q,p) - D(q,n)); q, p, n: [B, D], Euclidean D."""
    return F.relu(margin + pairwise_distance(q, p) - pairwise_distance(q, n)).mean()


def pairwise_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise Euclidean distance [B] (a small eps keeps the gradient finite at 0)."""
    return (a - b).pow(2).sum(1).add(1e-12).sqrt()


def mine_negatives(q: torch.Tensor, pos_dist: torch.Tensor, pool: torch.Tensor, q_labels: torch.Tensor,
                   pool_labels: torch.Tensor, mode: str, margin: float) -> torch.Tensor:
    """Index into ``pool`` [M, D] of the negative to use for each query q [B, D].

    batch-hard: the closest pool embedding of another class. semi-hard: the
    closest one farther than the positive (within the margin band first), else
    the hardest. Queries with no other-class candidate keep index -1.
    """
    dist = torch.cdist(q.detach().float(), pool.detach().float())  # [B, M]
    other = q_labels[:, None] != pool_labels[None, :]  # [B, M]
    inf = torch.tensor(float("inf"), device=dist.device)
    hard = torch.where(other, dist, inf)
    idx = hard.argmin(1)
    if mode == "semi-hard":
        farther = other & (dist > pos_dist.detach()[:, None])
        semi = torch.where(farther, dist, inf)
        has_semi = farther.any(1)
        idx = torch.where(has_semi, semi.argmin(1), idx)
    return torch.where(other.any(1), idx, torch.full_like(idx, -1))


def label_ids(paths: np.ndarray) -> tuple[np.ndarray, int]:
    """Integer class id of each image path from its folder name; (ids [N], number of classes)."""
    names = np.array([image_data.label_from_path(p) for p in paths])
    uniq, ids = np.unique(names, return_inverse=True)
    return ids.astype(np.int64), len(uniq)


def check_labels_usable(trip: np.ndarray, labels: np.ndarray, n_classes: int) -> None:
    """Mining needs folder classes: q and p share one, n does not (for at least 90% of rows)."""
    lq, lp, ln = labels[trip[:, 0]], labels[trip[:, 1]], labels[trip[:, 2]]
    consistent = ((lq == lp) & (lq != ln)).mean()
    if n_classes < 2 or consistent < 0.9:
        raise UserError("mining needs class labels from folder names; this CSV has none "
                        f"({consistent:.0%} of triplets fit folder classes) — use --mining none")


# ---------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------


class TripletBatches(torch.utils.data.Dataset):
    """Item i = the uint8 images [3b, H, W, 3] (queries, positives, negatives) of batch i.

    Batches are precomputed lists of triplet indices; workers only gather rows
    of the memory-mapped cache, so no image is decoded during training.
    """

    def __init__(self, images: np.ndarray, triplets: np.ndarray, batches: list[np.ndarray]):
        self.images, self.triplets, self.batches = images, triplets, batches

    def __len__(self) -> int:
        return len(self.batches)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.triplets[self.batches[i]]  # [b, 3]
        order = rows.T.reshape(-1)  # queries, then positives, then negatives
        return torch.from_numpy(np.ascontiguousarray(self.images[order])), torch.from_numpy(order)


def epoch_batches(n_triplets: int, batch_size: int, seed: int, epoch: int, rank: int, world: int) -> list[np.ndarray]:
    """This rank's batches of an epoch: a seeded permutation cut into batches, the last one partial."""
    perm = np.random.default_rng([seed, epoch]).permutation(n_triplets)
    batches = [perm[i:i + batch_size] for i in range(0, n_triplets, batch_size)]
    # Every rank must take the same number of steps (DDP syncs each one): like
    # DistributedSampler, repeat the first batches to fill the last round.
    batches += batches[:(-len(batches)) % world]
    return batches[rank::world]


def split_by_query(trip: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Boolean masks (train, val) holding out a seeded ``fraction`` of the query images."""
    queries = np.unique(trip[:, 0])
    rng = np.random.default_rng([seed, 7919])
    n_val = max(1, int(round(fraction * len(queries))))
    held = rng.choice(queries, size=n_val, replace=False)
    val = np.isin(trip[:, 0], held)
    if val.all():
        raise UserError("--val-fraction leaves no training triplets")
    return ~val, val


def load_triplets(args) -> tuple[np.ndarray, np.ndarray, np.ndarray | None, np.ndarray]:
    """Read the CSV(s); returns (unique paths [N], train triplets [T,3], val triplets [V,3] | None)."""
    train_cols = image_data.read_triplet_csv(args.triplets)
    val_path = args.val_triplets
    if val_path is None and args.val_fraction == 0:
        default = Path("val_triplet_sample.csv") if args.triplets.parent == Path(".") else \
            args.triplets.parent / "val_triplet_sample.csv"
        if default.exists():
            val_path = default
        else:
            cli_utils.warn(f"no validation CSV ({default} not found): training without validation")
    val_cols = image_data.read_triplet_csv(val_path) if val_path is not None else None
    all_paths = np.concatenate(list(train_cols) + (list(val_cols) if val_cols is not None else []))
    paths, inverse = np.unique(all_paths.astype(str), return_inverse=True)
    t = len(train_cols[0])
    train = inverse[:3 * t].reshape(3, t).T.copy()
    val = inverse[3 * t:].reshape(3, -1).T.copy() if val_cols is not None else None
    if args.val_fraction > 0:
        if val is not None:
            raise UserError("give either --val-triplets or --val-fraction, not both")
        keep, held = split_by_query(train, args.val_fraction, args.seed)
        train, val = train[keep], train[held]
    return paths, train, val


# ---------------------------------------------------------------------------
# Training
# ---------------------------------------------------------------------------


def build_optimizer(name: str, params, args) -> torch.optim.Optimizer:
    if name == "sgd":
        return torch.optim.SGD(params, lr=args.lr, momentum=args.momentum, nesterov=NESTEROV and args.momentum > 0,
                               weight_decay=args.weight_decay)
    if name == "adam":
        return torch.optim.Adam(params, lr=args.lr, weight_decay=args.weight_decay)
    return torch.optim.RMSprop(params, lr=args.lr, momentum=args.momentum, weight_decay=args.weight_decay)


def check_outputs(out: Path, force: bool, resume: bool) -> None:
    """Refuse to overwrite an earlier run's files unless --force or --resume."""
    if force or resume:
        return
    existing = [out / FINAL_NAME, out / METRICS_NAME, *sorted(out.glob("temp_*.model"))]
    for path in existing:
        if path.exists():
            raise UserError(f"{path} already exists from an earlier run (use --force to overwrite or --resume)")


def flip_generator(seed: int, epoch: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + epoch * 100_003 + step) % (2**63))


def validate(model, images, val: np.ndarray, args, device, amp_dtype) -> dict:
    """Val triplet accuracy (D(q,p) < D(q,n)), mean loss and mean distances, in eval mode."""
    model.eval()
    uniq, inverse = np.unique(val, return_inverse=True)  # embed each val image once
    emb = deep_rank_net.embed_images(model, images[uniq], args.image_size, batch_size=max(64, args.batch_size * 3),
                                     device=device, amp=amp_dtype is not None, progress=False)  # [U, D]
    e = torch.from_numpy(emb)[torch.from_numpy(inverse.reshape(-1))].view(-1, 3, emb.shape[1])  # [V, 3, D]
    q, p, n = e[:, 0], e[:, 1], e[:, 2]
    dp, dn = pairwise_distance(q, p), pairwise_distance(q, n)
    model.train()
    return {"val_triplet_accuracy": float((dp < dn).float().mean()),
            "val_loss": float(F.relu(args.margin + dp - dn).mean()),
            "val_d_pos": float(dp.mean()), "val_d_neg": float(dn.mean())}


def main(args) -> None:
    if args.val_triplets is not None and not args.val_triplets.exists():
        raise UserError(f"validation triplet CSV not found: {args.val_triplets}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    distributed = world > 1
    out = args.output_dir
    is_main = rank == 0
    if is_main:
        out.mkdir(parents=True, exist_ok=True)
        check_outputs(out, args.force, args.resume is not None)
        if args.force:  # a fresh run starts a fresh log
            (out / METRICS_NAME).unlink(missing_ok=True)
    device = cli_utils.pick_device(args.device)
    if distributed:
        backend = "nccl" if device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend)
        if device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
    try:
        train(args, out, device, rank, world, is_main)
    finally:
        if distributed:
            torch.distributed.destroy_process_group()


def train(args, out: Path, device, rank: int, world: int, is_main: bool) -> None:
    ckpt = deep_rank_net.load_checkpoint(args.resume) if args.resume is not None else None
    paths, trip, val = load_triplets(args)
    labels = None
    if args.mining != "none":
        labels, n_classes = label_ids(paths)
        check_labels_usable(trip, labels, n_classes)
    if ckpt is not None:
        image_size = int(ckpt["model_config"]["image_size"])
        if image_size != args.image_size:
            cli_utils.warn(f"using the checkpoint's image size {image_size} (not --image-size {args.image_size})")
            args.image_size = image_size
    cache_size = args.cache_size or image_cache.choose_cache_size(list(paths), args.image_size)
    images = image_cache.cache_images(list(paths), cache_size, progress=is_main and not args.no_progress)

    cli_utils.seed_everything(args.seed)
    if ckpt is not None:
        model, _ = deep_rank_net.model_from_checkpoint(ckpt)
        cfg = model.config
        wanted = {"arch": args.arch, "embedding_dim": args.embedding_dim, "multiscale": not args.single_scale}
        differs = {k: v for k, v in wanted.items() if cfg[k] != v}
        if differs:
            cli_utils.warn(f"resuming with the checkpoint's model ({cfg['arch']}, dim {cfg['embedding_dim']}, "
                           f"multiscale {cfg['multiscale']}); ignoring {differs}")
        model.train()
    else:
        model = deep_rank_net.build_model(args.arch, args.embedding_dim, not args.single_scale, args.weights,
                                          args.train_from)
    model = model.to(device).to(memory_format=torch.channels_last)
    optimizer = build_optimizer(args.optim, model.trainable_parameters(), args)
    start_epoch, global_step, skip = 0, 0, 0
    if ckpt is not None:
        if ckpt.get("optimizer"):
            try:
                optimizer.load_state_dict(ckpt["optimizer"])
            except (ValueError, KeyError) as exc:
                raise UserError(f"cannot restore the optimizer state from {args.resume} "
                                f"(was it trained with another --optim?): {exc}")
        start_epoch, global_step = int(ckpt["epoch"]), int(ckpt["step"])
        skip = int(ckpt.get("step_in_epoch", 0))
        print(f"resuming from {args.resume}: epoch {start_epoch}, step {global_step}", file=sys.stderr)
    train_model = model
    if world > 1:
        train_model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None)
    if args.compile:
        train_model = torch.compile(train_model)
    amp_dtype = deep_rank_net.resolve_amp_dtype(device, {"auto": None, "on": True, "off": False}[args.amp])
    labels_t = torch.from_numpy(labels).to(device) if labels is not None else None

    def save(path: Path, epoch: int, step_in_epoch: int) -> None:
        if is_main:
            deep_rank_net.save_checkpoint(path, model, optimizer, epoch=epoch, step=global_step,
                                          image_size=args.image_size, args=vars(args),
                                          extra={"step_in_epoch": step_in_epoch})

    def log(record: dict) -> None:
        if is_main:
            with open(out / METRICS_NAME, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    from tqdm import tqdm

    stopped_early = False
    last_good: Path | None = None
    for epoch in range(start_epoch, args.epochs):
        batches = epoch_batches(len(trip), args.batch_size, args.seed, epoch, rank, world)
        done_in_epoch = skip if epoch == start_epoch else 0
        loader = torch.utils.data.DataLoader(
            TripletBatches(images, trip, batches[done_in_epoch:]), batch_size=None, shuffle=False,
            num_workers=args.num_workers, pin_memory=device.type == "cuda",
            persistent_workers=False)
        bar = tqdm(loader, total=len(batches) - done_in_epoch, desc=f"epoch {epoch + 1}/{args.epochs}",
                   unit="step", disable=not is_main or args.no_progress, dynamic_ncols=True)
        collapse_warned = False
        sums = {"loss": 0.0, "d_pos": 0.0, "d_neg": 0.0, "active": 0.0, "n": 0}
        t0 = time.perf_counter()
        n_images = 0
        for batch, order in bar:
            step_in_epoch = done_in_epoch
            x = deep_rank_net.preprocess(batch.to(device, non_blocking=True), args.image_size, train=True,
                                         generator=flip_generator(args.seed, epoch, global_step))
            with torch.autocast(device.type, dtype=amp_dtype or torch.bfloat16, enabled=amp_dtype is not None):
                emb = train_model(x)
            emb = emb.float()
            b = emb.shape[0] // 3
            q, p, n = emb[:b], emb[b:2 * b], emb[2 * b:]
            d_pos = pairwise_distance(q, p)
            if labels_t is not None:
                batch_labels = labels_t[order.to(device)]
                neg_idx = mine_negatives(q, d_pos, emb, batch_labels[:b], batch_labels, args.mining, args.margin)
                n = torch.where((neg_idx >= 0)[:, None], emb[neg_idx.clamp(min=0)], n)
            d_neg = pairwise_distance(q, n)
            per_triplet = F.relu(args.margin + d_pos - d_neg)
            loss = per_triplet.mean()
            if not torch.isfinite(loss):
                kept = f"; the last good checkpoint is {last_good}" if last_good else ""
                raise UserError(f"loss became {loss.item()} at epoch {epoch + 1}, step {global_step + 1} "
                                f"(try a lower --lr){kept}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            global_step += 1
            done_in_epoch += 1
            n_images += emb.shape[0]
            sums["loss"] += loss.item()
            sums["d_pos"] += d_pos.mean().item()
            sums["d_neg"] += d_neg.mean().item()
            sums["active"] += (per_triplet > 0).float().mean().item()
            sums["n"] += 1
            spread = torch.pdist(emb.detach()).mean().item() if emb.shape[0] > 1 else 1.0
            if spread < 1e-3 and not collapse_warned and is_main:
                cli_utils.warn("embeddings collapsed to a point (loss stuck at the margin): try a lower --lr, "
                               "a smaller --margin or --mining semi-hard")
                collapse_warned = True
            rate = n_images / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix(loss=f"{loss.item():.4f}", img_s=f"{rate:.0f}")
            if global_step % args.log_every == 0:
                k = sums["n"]
                log({"event": "train", "epoch": epoch + 1, "step": global_step, "loss": sums["loss"] / k,
                     "d_pos": sums["d_pos"] / k, "d_neg": sums["d_neg"] / k, "active_fraction": sums["active"] / k,
                     "images_per_s": rate})
            if args.save_every and global_step % args.save_every == 0:
                last_good = out / f"temp_{epoch}.model"
                save(last_good, epoch, done_in_epoch)
            if args.max_steps is not None and global_step >= args.max_steps:
                stopped_early = done_in_epoch < len(batches)
                break
        bar.close()
        if stopped_early:
            last_good = out / f"temp_{epoch}.model"
            save(last_good, epoch, done_in_epoch)
            if is_main:
                print(f"stopped after {global_step} steps (--max-steps); resume with --resume {last_good}")
            return
        k = max(sums["n"], 1)
        record = {"event": "epoch", "epoch": epoch + 1, "step": global_step, "loss": sums["loss"] / k,
                  "d_pos": sums["d_pos"] / k, "d_neg": sums["d_neg"] / k, "active_fraction": sums["active"] / k,
                  "images_per_s": n_images / max(time.perf_counter() - t0, 1e-9)}
        if val is not None and is_main:
            record.update(validate(model, images, val, args, device, amp_dtype))
        if is_main:
            msg = (f"epoch {epoch + 1}: loss {record['loss']:.4f}, D(q,p) {record['d_pos']:.3f}, "
                   f"D(q,n) {record['d_neg']:.3f}, active {record['active_fraction']:.0%}")
            if "val_triplet_accuracy" in record:
                msg += f", val triplet accuracy {record['val_triplet_accuracy']:.4f}, val loss {record['val_loss']:.4f}"
            print(msg, flush=True)
        log(record)
        last_good = out / f"temp_{epoch}.model"
        save(last_good, epoch + 1, 0)
        if args.max_steps is not None and global_step >= args.max_steps:
            if is_main:
                print(f"stopped after {global_step} steps (--max-steps); resume with --resume {last_good}")
            return
    if is_main:
        save(out / FINAL_NAME, args.epochs, 0)
        plot_curves(out)
        print(f"wrote {out / FINAL_NAME}, {out / METRICS_NAME} and {out / CURVES_NAME}")


def plot_curves(out: Path) -> None:
    """Training loss per log record and val accuracy/loss per epoch, from metrics.jsonl."""
    import plots

    records = [json.loads(line) for line in (out / METRICS_NAME).read_text().splitlines() if line.strip()]
    epochs = [r for r in records if r["event"] == "epoch"]
    series = {"train loss (epoch mean)": ([r["epoch"] for r in epochs], [r["loss"] for r in epochs])}
    if any("val_loss" in r for r in epochs):
        series["val loss"] = ([r["epoch"] for r in epochs], [r.get("val_loss", math.nan) for r in epochs])
        series["val triplet accuracy"] = ([r["epoch"] for r in epochs],
                                          [r.get("val_triplet_accuracy", math.nan) for r in epochs])
    plots.line_chart(out / CURVES_NAME, series, "Deep Ranking training", "epoch", "loss / accuracy")


if __name__ == "__main__":
    cli_utils.run(main, get_args_parser())
