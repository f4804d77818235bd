"""Run the whole pipeline end to end, as the README's seven steps do.

With no ``--data-dir`` it uses the bundled Fashion-MNIST sample (written out in
TinyImageNet's layout), a small CPU-friendly model and a few epochs, so it
finishes in minutes on a 2-core laptop. Every stage is the real script, run as
a subprocess with the same command line a user would type; each command is
printed first, so the demo doubles as a worked example.

Stages whose output already exists are reused (nothing is overwritten); pass
``--force`` to redo them all.
"""

from __future__ import annotations

import argparse
import json
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

from deepranking import argtypes, cli
from deepranking.cli import UserError

REPO = Path(__file__).resolve().parent

# Small configuration that trains to a useful model in under a minute on 2 CPU cores (RESULTS.md section 2).
DEMO_ARCH = "small-cnn"  # the CPU recipe's net for small images (bench_time_to_quality); resnet18/101 work too
DEMO_IMAGE_SIZE = 32  # Fashion-MNIST is 28 px: upsampling to 224 costs 50x for no gain
DEMO_EMBEDDING_DIM = 128  # plenty for 10 classes; 4096 is the paper's size
DEMO_EPOCHS = 10  # 190 steps on the sample: small-cnn needs them (3 epochs: P@30 0.62, 10: 0.78; resnet18 3: 0.72)
DEMO_BATCH_SIZE = 32
DEMO_LR = 0.001
DEMO_LR_SCHEDULE = "cosine"  # decay to 0 by the last epoch: a better model than a constant lr in the same steps
DEMO_OPTIM = "adam"  # from scratch, Adam converges faster than SGD at this budget
DEMO_MINING = "batch-hard"  # every image an anchor with its hardest positive and negative in the batch
DEMO_MARGIN = 0.2  # with hard mining from scratch, a margin of 1.0 collapses the embeddings
DEMO_ID_LOSS_WEIGHT = 1.0  # a class loss next to the ranking loss: faster from scratch (bench_time_to_quality)
DEMO_NUM_POS = 1
DEMO_NUM_NEG = 1


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=None,
                   help="TinyImageNet root (or a folder of class folders); default: the bundled sample")
    p.add_argument("--download", action="store_true",
                   help="download TinyImageNet into --data-dir first (needs internet)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/demo"),
                   help="where every output goes (default: %(default)s)")
    p.add_argument("--epochs", type=argtypes.positive_int, default=DEMO_EPOCHS,
                   help="training epochs (default: %(default)s)")
    p.add_argument("--arch", default=DEMO_ARCH, help="backbone: any train_net.py --arch (small-cnn, resnet18, "
                                                     "convnext_tiny, ...; default: %(default)s)")
    p.add_argument("--weights", default="none",
                   help="backbone weights: none, imagenet or a state-dict path (default: %(default)s)")
    p.add_argument("--image-size", type=argtypes.positive_int, default=DEMO_IMAGE_SIZE,
                   help="training image size (default: %(default)s)")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed for every stage (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="redo every stage even if its output exists")
    return p


def run_stage(name: str, argv: list[str], done: Path | None, force: bool) -> None:
    """Run one pipeline script, unless ``done`` exists already (and not --force)."""
    cmd = [sys.executable, str(REPO / argv[0]), *argv[1:]]
    shown = " ".join(shlex.quote(a) for a in ["python", *argv])
    if done is not None and done.exists() and not force:
        print(f"\n== {name}: reusing {done} (pass --force to redo)", flush=True)
        return
    print(f"\n== {name}\n$ {shown}", flush=True)
    start = time.perf_counter()
    result = subprocess.run(cmd)
    if result.returncode != 0:
        raise UserError(f"stage '{name}' failed (exit {result.returncode}); command: {shown}")
    print(f"== {name}: done in {time.perf_counter() - start:.1f} s", flush=True)


def main(args) -> None:
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)
    force = ["--force"] if args.force else []
    started = time.perf_counter()

    if args.data_dir is None:
        data = out / "data" / "fashion-mnist-sample"
        if args.force and data.exists():
            shutil.rmtree(data)
        run_stage("1. write the bundled sample in TinyImageNet layout",
                  ["make_sample_data.py", "--output", str(data), "--seed", str(args.seed)],
                  data / "wnids.txt", False)
    else:
        data = args.data_dir
    if args.download:
        run_stage("2. download + restructure TinyImageNet",
                  ["transform_validation.py", "--data-dir", str(data), "--download"], None, True)
    else:
        # Idempotent: a no-op with a message when val/ is already restructured.
        run_stage("2. restructure val/ into class folders",
                  ["transform_validation.py", "--data-dir", str(data)], None, True)

    train_csv = out / "training_triplet_sample.csv"
    val_csv = out / "val_triplet_sample.csv"
    for training, csv in ((1, train_csv), (0, val_csv)):
        run_stage(f"3. sample {'training' if training else 'validation'} triplets",
                  ["triplet_sampler.py", "--training", str(training), "--data-dir", str(data),
                   "--num_pos_images", str(DEMO_NUM_POS), "--num_neg_images", str(DEMO_NUM_NEG),
                   "--output", str(csv), "--seed", str(args.seed), *force], csv, args.force)

    model = out / "deepranknet.model"
    run_stage("4. train the Deep Ranking net",
              ["train_net.py", "--triplets", str(train_csv), "--val-triplets", str(val_csv),
               "--arch", args.arch, "--weights", args.weights, "--image-size", str(args.image_size),
               "--embedding-dim", str(DEMO_EMBEDDING_DIM), "--epochs", str(args.epochs),
               "--batch-size", str(DEMO_BATCH_SIZE), "--lr", str(DEMO_LR), "--lr-schedule", DEMO_LR_SCHEDULE,
               "--optim", DEMO_OPTIM,
               "--mining", DEMO_MINING, "--margin", str(DEMO_MARGIN), "--id-loss-weight", str(DEMO_ID_LOSS_WEIGHT),
               "--train-from", "conv1", "--output-dir", str(out),
               "--seed", str(args.seed), "--device", args.device, *force], model, args.force)

    train_emb = out / "train_embedding.txt"
    test_emb = out / "test_embedding.txt"
    run_stage("5. embed every train and val image once",
              ["gen_embeddings.py", "--model", str(model), "--data-dir", str(data),
               "--train-output", str(train_emb), "--test-output", str(test_emb),
               "--device", args.device, *force], test_emb, args.force)

    metrics_path = out / "metrics.json"
    run_stage("6. evaluate top-30 precision, draw retrieval pictures, write report.html",
              ["eval.py", "--train-embeddings", str(train_emb), "--test-embeddings", str(test_emb),
               "--triplets", str(val_csv), "--output-dir", str(out), "--seed", str(args.seed), *force],
              metrics_path, args.force)

    summary(out, metrics_path, time.perf_counter() - started)


def summary(out: Path, metrics_path: Path, seconds: float) -> None:
    """The demo's last words: the headline figures and where the results are."""
    metrics = json.loads(metrics_path.read_text())
    print(f"\nDemo finished in {seconds:.0f} s. Results in {out}/:")
    print(f"  test top-{metrics['k']} precision : {metrics['test_precision_at_k']:.4f}")
    print(f"  train top-{metrics['k']} precision: {metrics['train_precision_at_k']:.4f}")
    print(f"  hit@{metrics['k']} (classic 'accuracy'): {metrics['hit_at_k']:.4f}")
    print(f"  metrics: {metrics_path}")
    report = out / "report.html"
    if report.exists():
        print(f"  report (open in a browser): {report}")
    else:  # metrics.json reused from an evaluation that wrote no report
        print(f"  report: none in {out} (its evaluation predates report.html; pass --force to redo it)")
    pictures = sorted(p.name for p in out.glob("*.png"))
    print(f"  pictures: {', '.join(pictures)}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
