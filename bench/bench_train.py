"""Training throughput: the classic loop vs our pipeline vs the bare model.

    python bench/bench_train.py [--arch resnet18] [--image-size 64] [--batch-size 25] [--steps 8] [--repeats 2]

Writes the bundled sample (make_sample_data.py, TinyImageNet layout, 600 train
JPEGs at 64 px) to a temporary folder and draws random (q, p, n) triplets from
train/. In one process, with the same model
(``deep_rank_net.build_model(arch, 128, True, "none", "layer4")``), image size
and batch, it times ``--steps`` optimizer steps (after 2 warm-up steps) of:

a. classic: per image PIL decode (preprocessing.load_rgb) + torchvision transforms
   (Resize, RandomHorizontalFlip, ToTensor, Normalize) every step, three
   separate forward passes (q, p, n), fp32, F.triplet_margin_loss;
b. ours (as train_net.py): uint8 rows gathered from the image cache
   (image_cache.cache_images, built before timing), preprocessing.preprocess on
   the device in runtime.memory_format, runtime.resolve_precision's autocast and
   GradScaler, one batched forward of 3B images, losses.RankingLoss;
c. bare model: forward + backward on random tensors [3B, 3, S, S].

Prints images/s of each, its peak resident memory while timed (bench_common.PeakRSS:
the whole process, and its rise above the start of the timed steps), (b)/(a) and
(b)/(c) (the pipeline's efficiency); on CUDA also each method's peak GPU memory.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import PeakRSS, run  # also puts the repo on sys.path

from deepranking import argtypes, cli, preprocessing  # noqa: E402

WARMUP_STEPS = 2
EMBEDDING_DIM = 128


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="backbone architecture")
    p.add_argument("--image-size", type=argtypes.positive_int, default=64, help="training image size S")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=25, help="triplets per step B")
    p.add_argument("--steps", type=argtypes.positive_int, default=8, help="timed steps per method")
    p.add_argument("--lr", type=float, default=0.001, help="SGD learning rate")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--seed", type=int, default=0, help="random seed")
    p.add_argument("--repeats", type=argtypes.positive_int, default=2,
                   help="rounds over the three methods (interleaved; the best round counts, as timeit does)")
    return p


def make_sample(root: Path) -> list[str]:
    """Write the bundled sample under ``root``; returns the train image paths."""
    from deepranking import image_data

    run("make_sample_data.py", "--output", root, "--no-progress")
    return list(image_data.list_class_folder(image_data.resolve_split_dir(root, "train")).paths)


def new_model_and_optimizer(arch: str, device, lr: float, channels_last: bool):
    import torch

    import deep_rank_net
    from deepranking import runtime

    torch.manual_seed(0)  # identical weights for every method
    model = deep_rank_net.build_model(arch, EMBEDDING_DIM, True, "none", "layer4").to(device)
    if channels_last:  # as train_net.py: runtime.memory_format (NHWC on GPUs, NCHW on CPU)
        model = model.to(memory_format=runtime.memory_format(device))
    opt = torch.optim.SGD(model.trainable_parameters(), lr=lr, momentum=0.9, nesterov=True)
    return model, opt


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(step_fn, batches: list[np.ndarray], device) -> float:
    """Seconds for the steps after the warm-up ones (batches: [steps + warm-up] of [B, 3] indices)."""
    for b in batches[:WARMUP_STEPS]:
        step_fn(b)
    sync(device)
    t0 = time.perf_counter()
    for b in batches[WARMUP_STEPS:]:
        step_fn(b)
    sync(device)
    return time.perf_counter() - t0


def classic_step_fn(model, opt, paths: list[str], size: int, device):
    """The classic loop: decode + transform every image each step, three forwards, fp32."""
    import torch
    import torch.nn.functional as F
    from torchvision import transforms

    tf = transforms.Compose([
        transforms.Resize((size, size)),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD),
    ])

    def load(idx: np.ndarray) -> torch.Tensor:  # -> [B, 3, S, S]
        return torch.stack([tf(preprocessing.load_rgb(paths[i])) for i in idx]).to(device)

    def step(trip: np.ndarray) -> None:
        q, p, n = (model(load(trip[:, j])) for j in range(3))  # each [B, D]
        loss = F.triplet_margin_loss(q, p, n, margin=1.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def ours_step_fn(model, opt, images: np.ndarray, size: int, device):
    """train_net.py's step: gather cached uint8 rows, preprocess on the device, one forward of 3B."""
    import torch

    from deepranking import losses, runtime

    precision = runtime.resolve_precision(device, "auto")
    scaler = precision.grad_scaler()  # a pass-through unless fp16
    layout = runtime.memory_format(device)
    criterion = losses.RankingLoss(1.0, "none")  # the CSV triplets as given
    spec = preprocessing.Preprocessing(image_size=size, cache_size=images.shape[1])
    gen = torch.Generator().manual_seed(0)

    def step(trip: np.ndarray) -> None:
        order = trip.T.reshape(-1)  # queries, then positives, then negatives: [3B]
        batch = torch.from_numpy(np.ascontiguousarray(images[order]))  # uint8 [3B, H, W, 3]
        x = preprocessing.preprocess(batch.to(device, non_blocking=True), spec, train=True, generator=gen,
                                     memory_format=layout)  # [3B, 3, S, S]
        with precision.autocast():
            emb = model(x)  # [3B, D]
        loss, _stats = criterion(emb.float(), None, n_triplets=len(trip))
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def bare_step_fn(model, opt, batch_size: int, size: int, device):
    """Forward + backward of random [3B, 3, S, S] tensors: the model's own cost, no data."""
    import torch

    from deepranking import runtime

    precision = runtime.resolve_precision(device, "auto")
    scaler = precision.grad_scaler()
    x = torch.randn(3 * batch_size, 3, size, size, device=device).contiguous(
        memory_format=runtime.memory_format(device))

    def step(_trip: np.ndarray) -> None:
        with precision.autocast():
            emb = model(x)
        loss = emb.float().sum()
        opt.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(opt)
        scaler.update()

    return step


def main(args) -> None:
    import torch

    from deepranking import image_cache, runtime

    device = runtime.pick_device(args.device)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="bench_train_") as tmp:
        paths = make_sample(Path(tmp) / "sample")
        # Random triplets over the train images: [steps + warm-up] batches of [B, 3] indices.
        batches = [rng.integers(0, len(paths), size=(args.batch_size, 3))
                   for _ in range(args.steps + WARMUP_STEPS)]
        cache_size = image_cache.choose_cache_size(paths, args.image_size)
        images = image_cache.cache_images(paths, cache_size, cache_dir=Path(tmp) / "cache", progress=False)

        n_img = 3 * args.batch_size * args.steps
        methods = {
            "a classic (PIL+torchvision, 3 forwards, fp32)":
                lambda m, o: classic_step_fn(m, o, paths, args.image_size, device),
            "b ours (cache + preprocess, 1 forward of 3B)":
                lambda m, o: ours_step_fn(m, o, images, args.image_size, device),
            "c bare model fwd+bwd (random tensors)":
                lambda m, o: bare_step_fn(m, o, args.batch_size, args.image_size, device),
        }
        results = dict.fromkeys(methods, 0.0)
        peaks = {name: [] for name in methods}  # name -> [(process peak, rise during the steps) per round]
        gpu_mb = dict.fromkeys(methods, 0.0)
        # Interleaved rounds: load from other processes hits every method alike; keep each one's best.
        for round_ in range(args.repeats):
            for name, make in methods.items():
                model, opt = new_model_and_optimizer(args.arch, device, args.lr, channels_last=not name.startswith("a"))
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(device)
                with PeakRSS() as mem:
                    secs = timed(make(model, opt), batches, device)
                results[name] = max(results[name], n_img / secs)
                if not math.isnan(mem.peak_mb):
                    peaks[name].append((mem.peak_mb, mem.extra_mb))
                if device.type == "cuda":
                    gpu_mb[name] = max(gpu_mb[name], torch.cuda.max_memory_allocated(device) / 2**20)
                print(f"  round {round_ + 1}: {name}: {secs:.2f} s for {args.steps} steps", file=sys.stderr)
                del model, opt
        threads = torch.get_num_threads()
    a, b, c = results.values()
    print(f"device {device}, torch threads {threads}, {args.arch}, image {args.image_size} px, "
          f"batch {args.batch_size} triplets ({3 * args.batch_size} images/step), {args.steps} timed steps "
          f"after {WARMUP_STEPS} warm-up, best of {args.repeats} interleaved rounds, cpu_count {os.cpu_count()}")
    gpu_head = f" {'GPU peak MB':>12}" if device.type == "cuda" else ""
    print(f"{'method':<50} {'images/s':>10} {'peak RSS MB':>12} {'+MB':>7}{gpu_head}")
    for name, rate in results.items():
        gpu = f" {gpu_mb[name]:>12.0f}" if device.type == "cuda" else ""
        peak, extra = max(peaks[name], default=(math.nan, math.nan))  # the worst round; NaN: not measurable
        print(f"{name:<50} {rate:>10.1f} {peak:>12.0f} {extra:>7.0f}{gpu}")
    print(f"speed-up (b)/(a): {b / a:.2f}x")
    print(f"pipeline efficiency (b)/(c): {b / c:.2f}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
