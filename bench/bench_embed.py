"""Embedding generation of a whole split: the classic per-triplet-row loop vs gen_embeddings.py.

    python bench/bench_embed.py [--train-per-class 200] [--image-size 64] [--arch resnet18]

Data: Fashion-MNIST (``--source``, default Debian's package) in TinyImageNet's
layout at 64 px, and a 2x2 triplet CSV of its train split (as the classic
pipeline made). One untrained model (``--weights none``, same seed) serves both:

a. classic: for every batch of 25 triplet rows, each of the query, positive and
   negative images is decoded by PIL, transformed by torchvision and embedded
   (three forward passes, no_grad, fp32); the last partial batch is dropped and
   the vectors are appended to a file as raw float32 bytes — the classic
   generation code. With 2x2 sampling every image is embedded many times.
b. ours: ``gen_embeddings.py --splits train`` as a user runs it (a new process:
   start-up, checkpoint load, decoded-image cache build, each image once under
   inference_mode, text file written), timed from outside.

Prints seconds, images/s of distinct images covered, embeddings computed, the
ratio, and each process's peak RSS.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from bench_common import PeakRSS, fashion_mnist, run  # also puts the repo on sys.path

from deepranking import argtypes, cli, preprocessing  # noqa: E402

CLASSIC_BATCH = 25


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--source", default="debian", help="make_sample_data.py --source (debian or bundled)")
    p.add_argument("--train-per-class", type=argtypes.positive_int, default=200, help="train images per class")
    p.add_argument("--arch", default="resnet18", help="backbone of the (untrained) model")
    p.add_argument("--image-size", type=argtypes.positive_int, default=64, help="model input size (both methods)")
    p.add_argument("--embedding-dim", type=argtypes.positive_int, default=4096, help="embedding size")
    p.add_argument("--seed", type=int, default=0, help="seed of data, triplets and weights")
    p.add_argument("--work-dir", type=Path, default=None, help="keep the data here (default: temporary)")
    return p


def classic_generate(model, csv: Path, size: int, output: Path) -> int:
    """The classic loop over triplet rows; returns the number of embeddings computed."""
    import torch
    from torchvision import transforms

    from deepranking import image_data

    tf = transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(),
                             transforms.Normalize(preprocessing.IMAGENET_MEAN, preprocessing.IMAGENET_STD)])
    q, p, n = image_data.read_triplet_csv(csv)
    columns = (q, p, n)
    computed = 0
    model.eval()
    with open(output, "wb") as f, torch.no_grad():
        for start in range(0, len(q) - CLASSIC_BATCH + 1, CLASSIC_BATCH):  # last partial batch dropped
            for column in columns:
                x = torch.stack([tf(preprocessing.load_rgb(path)) for path in column[start:start + CLASSIC_BATCH]])
                f.write(model(x).numpy().astype(np.float32).tobytes())
                computed += len(x)
    return computed


def main(args) -> None:
    import torch

    import deep_rank_net
    from deepranking import checkpoint, image_cache, image_data, runtime
    from deepranking.checkpoint import write_checkpoint

    with tempfile.TemporaryDirectory(prefix="bench_embed_") as tmp:
        root = args.work_dir or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        data = fashion_mnist(root / "fashion_mnist", args.source, args.train_per_class, 1, args.seed)
        csv = root / "train_2x2.csv"
        if not csv.exists():
            run("triplet_sampler.py", "--training", 1, "--data-dir", data, "--num_pos_images", 2,
                "--num_neg_images", 2, "--output", csv, "--seed", args.seed)
        train_paths = list(image_data.list_class_folder(data / "train").paths)
        n_images = len(train_paths)

        runtime.seed_everything(args.seed)
        model = deep_rank_net.build_model(args.arch, args.embedding_dim, True, "none", "conv1")
        ckpt = root / "untrained.model"
        # The cache side train_net.py would record for these images (their own 64 px).
        spec = preprocessing.Preprocessing(image_size=args.image_size,
                                           cache_size=image_cache.choose_cache_size(train_paths, args.image_size))
        write_checkpoint(ckpt, {**checkpoint.model_record(model, spec), "epoch": 0, "step": 0, "args": {}})

        print(f"  ours: gen_embeddings.py on {n_images} images ...", file=sys.stderr)
        cache = root / "cache"  # a fresh cache: the decode is part of the measured work
        t0 = time.perf_counter()
        ours_rss = run("gen_embeddings.py", "--model", ckpt, "--data-dir", data, "--splits", "train",
            "--train-output", root / "train_embedding.txt", "--device", "cpu", "--cache-dir", cache, "--force",
            "--no-progress")
        ours_s = time.perf_counter() - t0

        print(f"  classic: per-row loop over {csv.name} ...", file=sys.stderr)
        t0 = time.perf_counter()
        with PeakRSS() as classic_mem:
            computed = classic_generate(model, csv, args.image_size, root / "classic_embeddings.bin")
        classic_s = time.perf_counter() - t0
        classic_rss = classic_mem.peak_mb

    print(f"{args.arch}, {args.image_size} px, {args.embedding_dim}-d, CPU, {torch.get_num_threads()} torch threads; "
          f"{n_images} distinct train images")
    print(f"{'method':<40} {'seconds':>8} {'embeddings':>11} {'images/s':>9} {'peak RSS MB':>12}")
    print(f"{'classic (per triplet row, PIL, 3 passes)':<40} {classic_s:>8.1f} {computed:>11} "
          f"{n_images / classic_s:>9.1f} {classic_rss:>12.0f}")
    print(f"{'ours (gen_embeddings.py, each image once)':<40} {ours_s:>8.1f} {n_images:>11} "
          f"{n_images / ours_s:>9.1f} {ours_rss:>12.0f}")
    print(f"ours is {classic_s / ours_s:.1f}x faster for the whole split "
          f"(images/s counts each distinct image once)")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
