"""Helpers shared by the bench scripts: run a pipeline script, write Fashion-MNIST in TinyImageNet layout."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def run(script: str, *argv) -> None:
    """Run a pipeline script of the repository as a user would (stdout hidden, errors raised)."""
    subprocess.run([sys.executable, str(REPO / script), *map(str, argv)], check=True, cwd=REPO,
                   stdout=subprocess.DEVNULL)


def fashion_mnist(data: Path, source: str, train_per_class: int, val_per_class: int, seed: int) -> Path:
    """Fashion-MNIST at 64 px in TinyImageNet's layout (val restructured into class folders); reused if present."""
    if not (data / "wnids.txt").exists():
        run("make_sample_data.py", "--source", source, "--output", data, "--size", 64, "--seed", seed,
            "--train-per-class", train_per_class, "--val-per-class", val_per_class, "--no-progress")
        run("transform_validation.py", "--data-dir", data)
    return data
