"""What a training step of the net costs on this machine, with and without its CPU speed-up.

    python bench/bench_train_step.py [--arch resnet18] [--sizes 32,64] [--threads 2]

One step = forward, backward and optimizer step of the Deep Ranking net on a batch of random
images (channels_last, as train_net.py runs it), a sum of the embeddings as the loss. Six
variants, alternated ``--repeats`` times in one process (best of each):

* the convs: every backbone conv a plain ``nn.Conv2d`` (``torch``), or
  ``backbones.PaddingSkippingConv2d`` (``skip-padding``, what the net uses), which leaves
  out the kernel taps that read only zero padding (at 32 px, layer4's 3x3 convs on 1x1 maps);
* the optimizer: torch's CPU default (a loop over the parameters), ``foreach=True``, or
  ``fused=True``, what train_net.build_optimizer uses for Adam and AdamW (with a step pre-hook
  that gives every gradient its weight's layout, which torch 2.14's fused CPU kernel needs;
  autograd's gradients already have it, so the hook copies nothing here).

Prints ms per step and the ratio to the first variant (torch convs, default optimizer: the
step before the speed-up); the skip-padding net's embeddings are checked against the plain
net's (same weights).
"""

from __future__ import annotations

import argparse
import time

import bench_common  # noqa: F401  (puts the repository on sys.path)
from bench_common import comma_list

import torch
from torch import nn

import deep_rank_net
from deepranking import argtypes, backbones

OPTIMIZERS = ("adam", "sgd")


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="a train_net.py --arch (default resnet18); the padding-skipping convs are a ResNet's")
    p.add_argument("--sizes", type=comma_list(argtypes.bounded_int(32)), default=[32, 64], help="image sides")
    p.add_argument("--batch", type=argtypes.positive_int, default=96, help="images per step (the recipe: 32 triplets)")
    p.add_argument("--optim", choices=OPTIMIZERS, default="adam", help="optimizer of the timed steps")
    p.add_argument("--steps", type=argtypes.positive_int, default=5, help="timed steps per variant and repeat")
    p.add_argument("--repeats", type=argtypes.positive_int, default=3, help="alternating repeats (best of)")
    p.add_argument("--threads", type=argtypes.positive_int, default=None, help="torch threads (default: torch's)")
    return p


def build_net(arch: str, skip_padding: bool) -> nn.Module:
    torch.manual_seed(0)  # both variants start from the same weights
    net = deep_rank_net.build_model(arch, 128, None, "none", "conv1")
    if not skip_padding:
        for module in net.modules():
            if type(module) is backbones.PaddingSkippingConv2d:
                module.__class__ = nn.Conv2d
    return net.to(memory_format=torch.channels_last).train()


IMPLEMENTATIONS = {"default": {}, "foreach": {"foreach": True}, "fused": {"fused": True}}


def make_optimizer(name: str, params, implementation: str) -> torch.optim.Optimizer:
    kw = IMPLEMENTATIONS[implementation]
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, nesterov=True, **kw)
    return torch.optim.Adam(params, lr=1e-3, **kw)


def step_seconds(net: nn.Module, opt: torch.optim.Optimizer, x: torch.Tensor, steps: int) -> float:
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        net(x).sum().backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.arch}, {torch.get_num_threads()} threads, batch {args.batch}, {args.optim}, "
          f"{args.steps} steps, best of {args.repeats}")
    variants = [(skip, impl) for skip in (False, True) for impl in IMPLEMENTATIONS]
    for size in args.sizes:
        gen = torch.Generator().manual_seed(size)
        x = torch.randn(args.batch, 3, size, size, generator=gen).to(memory_format=torch.channels_last)
        runs = {}
        for skip, impl in variants:
            net = build_net(args.arch, skip)
            runs[skip, impl] = (net, make_optimizer(args.optim, net.trainable_parameters(), impl))
            step_seconds(*runs[skip, impl], x, 1)  # warm-up: oneDNN primitives, optimizer state
        with torch.no_grad():
            plain, skipping = build_net(args.arch, False).eval(), build_net(args.arch, True).eval()
            gap = (plain(x) - skipping(x)).abs().max().item()
        best = {v: float("inf") for v in variants}
        for _ in range(args.repeats):
            for v in variants:
                best[v] = min(best[v], step_seconds(*runs[v], x, args.steps))
        base = best[False, "default"]
        print(f"\n{size} px (skip-padding vs torch convs, same weights: max |embedding difference| {gap:.1e})")
        print(f"{'convs':<20}{'optimizer':<12}{'ms/step':>9}{'ratio':>8}")
        for skip, impl in variants:
            s = best[skip, impl]
            print(f"{'skip-padding' if skip else 'torch':<20}{impl:<12}{1000 * s:>9.1f}{s / base:>8.2f}")


if __name__ == "__main__":
    main(get_args_parser().parse_args())
