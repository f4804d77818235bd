"""What a training step costs with each backbone on this machine, and the memory it needs.

    python bench/bench_backbones.py [--archs resnet18,convnext_tiny,...] [--triplets 8] [--image-size 224]
                                    [--shallow paper|classic|none]

One step as train_net.py runs it in the paper's setting: ``--triplets`` CSV triplets (8: 24
images) decoded at 256 px, resized on the fly to 224 px with random flips (``preprocess``,
channels_last), the Deep Ranking net (4096-d embeddings, the paper's shallow paths) with the
backbone trained from layer4 (conv1 .. layer3 frozen, or what that means for the backbone:
``backbones.frozen_names``), the ranking loss on the CSV triplets, SGD with Nesterov momentum
(train_net.py's defaults). Random weights (``--weights none``): time and memory do not depend
on the values; ``--shallow none`` leaves the shallow paths out, to see what they cost. Each
backbone runs in a process of its own (``--one``), whose peak resident
memory (VmHWM, bench_common.run_measured) is its row's; the step time is the best of
``--steps`` after one warm-up step. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import bench_common  # noqa: F401  (puts the repository on sys.path)
from bench_common import comma_list, run_measured

import numpy as np
import torch

import deep_rank_net
from deepranking import argtypes, backbones, cli, losses, runtime
from deepranking.preprocessing import preprocess

ARCHS = ["small-cnn", "resnet18", "resnet50", "mobilenet_v3_small", "mobilenet_v3_large", "efficientnet_b0",
         "regnet_y_400mf", "regnet_y_800mf", "convnext_tiny", "swin_t", "vit_b_16"]
EMBEDDING_DIM = 4096  # train_net.py's default, the paper's
CACHE_SIDE = 256  # the decoded images' side (a cache above the net input, as for large photos)
MARGIN = 1.0  # train_net.py's default


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", type=comma_list(str), default=ARCHS,
                   help="backbones to time (any train_net.py --arch; timm:<name> with timm installed)")
    p.add_argument("--triplets", type=argtypes.positive_int, default=8, help="triplets per step (3x images)")
    p.add_argument("--image-size", type=argtypes.bounded_int(32), default=224, help="net input side")
    p.add_argument("--train-from", default="layer4", help="first backbone stage trained")
    p.add_argument("--shallow", choices=deep_rank_net.SHALLOW_MODES, default="paper",
                   help="the shallow paths beside the backbone (none: what the backbone and heads alone cost)")
    p.add_argument("--steps", type=argtypes.positive_int, default=3, help="timed steps (best of) after one warm-up")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the child process: time this backbone
    p.add_argument("--result", type=Path, default=None, help=argparse.SUPPRESS)  # where the child writes its row
    return p


def time_backbone(arch: str, args) -> dict:
    """Build the net for ``arch`` and time its training steps (this process's own row, no memory)."""
    torch.manual_seed(0)
    net = deep_rank_net.build_model(arch, EMBEDDING_DIM, None, "none", args.train_from, shallow=args.shallow,
                                    image_size=args.image_size)
    net = net.to(memory_format=torch.channels_last).train()
    spec = backbones.backbone_preprocessing(arch, args.image_size, CACHE_SIDE)
    criterion = losses.RankingLoss(MARGIN, "none")
    params = net.trainable_parameters()
    optimizer = torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True)
    images = np.random.default_rng(0).integers(0, 256, (3 * args.triplets, CACHE_SIDE, CACHE_SIDE, 3), dtype=np.uint8)
    batch, generator = torch.from_numpy(images), torch.Generator().manual_seed(0)
    seconds = []
    for _ in range(1 + args.steps):
        start = time.perf_counter()
        x = preprocess(batch, spec, train=True, generator=generator, memory_format=runtime.memory_format("cpu"))
        loss, _ = criterion(net(x), None, n_triplets=args.triplets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        seconds.append(time.perf_counter() - start)
    return {"arch": arch, "feature_dim": net.embed.in_features,
            "params_m": sum(p.numel() for p in net.backbone.parameters()) / 1e6,
            "trained_m": sum(p.numel() for p in params) / 1e6, "step_s": min(seconds[1:])}


def main(args) -> None:
    if args.one is not None:
        args.result.write_text(json.dumps(time_backbone(args.one, args)))
        return
    for arch in args.archs:  # unknown names fail here, before the first long run
        backbones.check_arch(arch)
    images = 3 * args.triplets
    print(f"{images} images ({args.triplets} triplets) at {args.image_size} px from {CACHE_SIDE} px, "
          f"train from {args.train_from}, shallow paths {args.shallow}, {torch.get_num_threads()} torch threads, "
          f"best of {args.steps} steps\n")
    print("| backbone | F | backbone params (M) | trained (M) | step (s) | images/s | peak RSS (MB) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    with tempfile.TemporaryDirectory() as tmp:
        for arch in args.archs:
            result = Path(tmp) / "row.json"
            measured = run_measured("bench/bench_backbones.py", "--one", arch, "--result", result,
                                    "--triplets", args.triplets, "--image-size", args.image_size,
                                    "--train-from", args.train_from, "--shallow", args.shallow, "--steps", args.steps)
            row = json.loads(result.read_text())
            print(f"| {arch} | {row['feature_dim']} | {row['params_m']:.1f} | {row['trained_m']:.1f} | "
                  f"{row['step_s']:.2f} | {images / row['step_s']:.1f} | {measured.peak_mb:.0f} |", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
