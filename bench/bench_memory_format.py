"""Which memory format should the net run in on this machine: NCHW or channels_last?

    python bench/bench_memory_format.py [--arch resnet18] [--sizes 32,64] [--threads 2]

Times an embedding pass (inference) and a training pass (forward + backward) of the Deep
Ranking net on random uint8 images, in both layouts, alternating them ``--repeats`` times in
one process (best of), and prints channels_last / NCHW (< 1: channels_last is faster).
``deepranking.runtime.memory_format`` is the one place that applies the answer.
"""

from __future__ import annotations

import argparse
import time

import bench_common  # noqa: F401  (puts the repository on sys.path)
from bench_common import comma_list

import numpy as np
import torch

import deep_rank_net
from deepranking import argtypes, cli
from deepranking.preprocessing import preprocess

LAYOUTS = {"nchw": torch.contiguous_format, "channels_last": torch.channels_last}


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet18", help="a train_net.py --arch (default resnet18)")
    p.add_argument("--sizes", type=comma_list(argtypes.bounded_int(32)), default=[32, 64], help="image sides")
    p.add_argument("--images", type=argtypes.positive_int, default=192, help="images per timed pass")
    p.add_argument("--batch", type=argtypes.positive_int, default=96, help="images per forward")
    p.add_argument("--repeats", type=argtypes.positive_int, default=4, help="alternating repeats (best of)")
    p.add_argument("--threads", type=argtypes.positive_int, default=None, help="torch threads (default: torch's)")
    return p


def timed_pass(images: torch.Tensor, size: int, layout, train: bool, batch: int, arch: str) -> float:
    torch.manual_seed(0)
    model = deep_rank_net.build_model(arch, 128, None, "none", "conv1", image_size=size)
    model = model.to(memory_format=layout).train(train)
    start = time.perf_counter()
    for i in range(0, len(images), batch):
        x = preprocess(images[i:i + batch], size, memory_format=layout)
        if train:
            model(x).sum().backward()
        else:
            with torch.inference_mode():
                model(x)
    return time.perf_counter() - start


def main(args) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"{args.arch}, {torch.get_num_threads()} threads, {args.images} images, best of {args.repeats}")
    for size in args.sizes:
        rng = np.random.default_rng(0)
        images = torch.from_numpy(rng.integers(0, 256, (args.images, size, size, 3), dtype=np.uint8))
        for train in (False, True):
            for layout in LAYOUTS.values():  # warm-up: oneDNN picks and caches its kernels on first use
                timed_pass(images, size, layout, train, args.batch, args.arch)
            best = {name: float("inf") for name in LAYOUTS}
            for _ in range(args.repeats):
                for name, layout in LAYOUTS.items():
                    best[name] = min(best[name], timed_pass(images, size, layout, train, args.batch, args.arch))
            ratio = best["channels_last"] / best["nchw"]
            print(f"{size:4d} px {'train' if train else 'embed':5s}: NCHW {best['nchw']:.2f} s, "
                  f"channels_last {best['channels_last']:.2f} s, channels_last/NCHW {ratio:.2f}", flush=True)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
