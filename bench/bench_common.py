"""Helpers shared by the bench scripts.

Importing this module also puts the repository root on ``sys.path``, so that a bench
script run as ``python bench/bench_X.py`` can import the pipeline modules.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import re
import subprocess
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def run(script: str, *argv) -> float:
    """Run a pipeline script of the repository as a user would (stdout hidden); its peak memory in MB.

    See :func:`run_measured` (this is its ``peak_mb``).
    """
    return run_measured(script, *argv).peak_mb


@dataclasses.dataclass
class Measured:
    """One script run: wall seconds, peak resident memory of the process itself and of its whole tree."""

    seconds: float
    peak_mb: float  # the script's own VmHWM
    tree_peak_mb: float  # the largest sum of VmRSS over it and its children (DataLoader workers) seen


def run_measured(script: str, *argv, stdout=subprocess.DEVNULL) -> Measured:
    """Run a pipeline script of the repository as a user would (stdout hidden by default).

    Memory is read from /proc every 20 ms while it runs, so growth in its last 20 ms is
    missed (NaN where /proc is missing): the process's own VmHWM, and the sum of VmRSS
    over it and its descendants (shared pages, e.g. a memory-mapped cache read by
    several workers, count once per process: an upper bound). Not ru_maxrss: a child's
    ru_maxrss also counts the pages of this (big, torch-loaded) process that it shared
    between fork and exec, and RUSAGE_CHILDREN mixes every script a bench ran.
    A failure becomes a UserError naming the script; the script's own error line is
    already on stderr above it.
    """
    import time

    from deepranking.cli import UserError

    t0 = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / script), *map(str, argv)], cwd=REPO,
                            stdout=stdout)  # returns once the child has exec'd
    readings, tree = [float("nan")], [float("nan")]
    try:
        while True:
            try:
                readings.append(_status_mb("VmHWM", proc.pid))  # a high-water mark: never falls
                tree.append(sum(_rss_mb(pid) for pid in _process_tree(proc.pid)))
            except (OSError, AttributeError):  # exiting, or no /proc here
                pass
            try:
                proc.wait(timeout=0.02)
                break
            except subprocess.TimeoutExpired:
                continue
    except BaseException:  # Ctrl-C: end the child too, then let the interrupt through
        proc.kill()
        proc.wait()
        raise
    if proc.returncode != 0:
        raise UserError(f"{script} failed (exit {proc.returncode}); see its message above")
    return Measured(time.perf_counter() - t0, readings[-1], max_known(*tree))


def _process_tree(pid: int) -> list[int]:
    """``pid`` and all its descendants (Linux /proc/<pid>/task/<tid>/children)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for task in Path(f"/proc/{p}/task").glob("*/children"):
            try:
                todo.extend(int(c) for c in task.read_text().split())
            except OSError:
                continue
    return out


def _rss_mb(pid: int) -> float:
    try:
        return _status_mb("VmRSS", pid)
    except (OSError, AttributeError):  # exited meanwhile
        return 0.0


def _status_mb(field: str, pid: int | str = "self") -> float:
    """A memory line of /proc/<pid>/status (VmRSS, VmHWM, ...) in MB."""
    with open(f"/proc/{pid}/status") as f:
        return int(re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.M).group(1)) / 1024


class PeakRSS:
    """Peak resident memory of this process during a ``with`` block (Linux).

    Entry resets the kernel's high-water mark (``5`` into /proc/self/clear_refs), exit reads
    VmHWM, so methods timed one after another in one process each get their own peak:
    ``peak_mb`` (the whole process) and ``extra_mb`` (the peak above the RSS at entry: the
    method's own working memory). Both are NaN where /proc does not allow this, as
    run()'s figure is.
    """

    def __init__(self):
        self.start_mb = None
        self.peak_mb = self.extra_mb = float("nan")

    def __enter__(self) -> "PeakRSS":
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.start_mb = _status_mb("VmRSS")
        except (OSError, AttributeError):  # not Linux, or resetting not permitted
            self.start_mb = None
        return self

    def __exit__(self, *exc) -> None:
        if self.start_mb is not None:
            self.peak_mb = _status_mb("VmHWM")
            self.extra_mb = self.peak_mb - self.start_mb

    def __str__(self) -> str:
        return "n/a" if math.isnan(self.peak_mb) else f"{self.peak_mb:.0f} MB (+{self.extra_mb:.0f})"


def max_known(*readings: float) -> float:
    """The largest memory reading, NaN ("not measurable here") ones ignored; NaN if all are."""
    known = [x for x in readings if not math.isnan(x)]
    return max(known) if known else float("nan")


def comma_list(item_type):
    """argparse type: "a,b,c" -> [item_type("a"), ...], at least one item (item_type: e.g. argtypes.positive_int)."""

    def parse(text: str) -> list:
        items = [item_type(t.strip()) for t in text.split(",") if t.strip()]
        if not items:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r}")
        return items

    return parse


def fashion_mnist(data: Path, source: str, train_per_class: int, val_per_class: int, seed: int,
                  tints: int = 0) -> Path:
    """Fashion-MNIST at 64 px in TinyImageNet's layout (val restructured into class folders); reused if present.
    ``tints`` > 0: the fine-grained set, each garment in that many hues (make_sample_data.py --tints), with
    its hierarchy.csv (hue under garment)."""
    if not (data / "wnids.txt").exists():
        run("make_sample_data.py", "--source", source, "--output", data, "--size", 64, "--seed", seed,
            "--train-per-class", train_per_class, "--val-per-class", val_per_class, "--no-progress",
            *(["--tints", tints] if tints else []))
        run("transform_validation.py", "--data-dir", data)
    # a kept --work-dir is reused: its images must be the ones asked for, or every figure is of other data;
    # counted by the listing the Evaluator scores
    from deepranking import image_data
    from deepranking.cli import UserError
    from make_sample_data import FASHION_MNIST_CLASSES
    n_classes = len(FASHION_MNIST_CLASSES) * max(tints, 1)  # the garments, each in --tints hues
    train, val = (image_data.list_class_folder(data / split) for split in ("train", "val"))
    held = (len(train.class_names), len(train.paths), len(val.paths))
    if held != (n_classes, n_classes * train_per_class, n_classes * val_per_class):
        raise UserError(f"{data} holds {held[0]} classes, {held[1]} train and {held[2]} val images, not the "
                        f"{n_classes} classes x {train_per_class} + {val_per_class} asked for: delete it or pass the "
                        "flags it was made with")
    return data


def latest_checkpoint(out: Path) -> Path:
    """train_net.py's final model in ``out``, else its newest temp_<epoch>.model."""
    final = out / "deepranknet.model"
    if final.exists():
        return final
    return max(out.glob("temp_*.model"), key=lambda p: p.stat().st_mtime)


class Evaluator:
    """Test precision@k of a model: val images query the train images (as eval.py).

    Images are decoded as gen_embeddings.py decodes them: at the checkpoint's
    ``Preprocessing.cache_size`` (0, or a bare image size: chosen from the images).
    """

    def __init__(self, data: Path, k: int, device):
        from deepranking import image_data

        self.train = image_data.list_class_folder(data / "train")
        self.val = image_data.list_class_folder(data / "val")
        self.k, self.device = k, device
        hierarchy = data / image_data.HIERARCHY_FILE  # graded figures too (parent precision@k, NDCG@k)
        self.parents = image_data.read_class_hierarchy(hierarchy) if hierarchy.exists() else None
        self._cache: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def spec(self, spec_or_size):
        """A Preprocessing with a real cache side (a bare int is an image size)."""
        from deepranking import image_cache
        from deepranking.preprocessing import Preprocessing

        spec = Preprocessing(int(spec_or_size), 0) if isinstance(spec_or_size, int) else spec_or_size
        if not spec.cache_size:
            spec = dataclasses.replace(spec, cache_size=image_cache.choose_cache_size(self.train.paths,
                                                                                      spec.image_size))
        return spec

    def images(self, spec_or_size) -> tuple[np.ndarray, np.ndarray]:
        """(train, val) uint8 images [N, c, c, 3] decoded at the spec's cache side c."""
        from deepranking import image_cache

        side = self.spec(spec_or_size).cache_size
        if side not in self._cache:
            self._cache[side] = tuple(image_cache.cache_images(p, side, progress=False)
                                      for p in (self.train.paths, self.val.paths))
        return self._cache[side]

    def scores(self, db: np.ndarray, queries: np.ndarray) -> dict:
        """float [Q] arrays of each val query against the train images (scoring.evaluate, as eval.py):
        "precision" (at k) and, with a class hierarchy, "parent_precision" and "ndcg" (at k)."""
        from deepranking import scoring

        result = scoring.evaluate(db, self.train.label_names, queries, self.val.label_names, self.k,
                                  device=self.device, progress=False, parents=self.parents)
        return result.per_query

    def per_query(self, db: np.ndarray, queries: np.ndarray) -> np.ndarray:
        """float [Q]: each val query's precision@k against the train images."""
        return self.scores(db, queries)["precision"]

    def score(self, db: np.ndarray, queries: np.ndarray) -> float:
        return float(self.per_query(db, queries).mean())

    def embed(self, model, images: np.ndarray, spec_or_size) -> np.ndarray:
        """float32 [N, D] embeddings of cached uint8 images [N, H, W, 3] (as gen_embeddings.py)."""
        from deepranking import embedding

        return embedding.embed_images(model, images, self.spec(spec_or_size), batch_size=128,
                                      device=self.device, progress=False)

    def model(self, model, spec_or_size) -> float:
        """precision@k of ``model`` with its Preprocessing (a checkpoint's) or a bare image size."""
        return float(self.model_per_query(model, spec_or_size).mean())

    def model_per_query(self, model, spec_or_size) -> np.ndarray:
        """float [Q]: per-query precision@k of ``model`` (mean: ``model``; spread: retrieval.standard_error)."""
        return self.model_scores(model, spec_or_size)["precision"]

    def model_scores(self, model, spec_or_size) -> dict:
        """:meth:`scores` of ``model`` with its Preprocessing (a checkpoint's) or a bare image size."""
        spec = self.spec(spec_or_size)
        train_images, val_images = self.images(spec)
        return self.scores(self.embed(model, train_images, spec), self.embed(model, val_images, spec))

    def raw_pixels(self) -> float:
        return float(self.raw_pixel_scores()["precision"].mean())

    def raw_pixel_scores(self, side: int = 64) -> dict:
        """:meth:`scores` of the images at ``side`` px flattened and unit-normalised (the reference row)."""
        train_images, val_images = self.images(side)

        def flat(x: np.ndarray) -> np.ndarray:  # [N, H, W, 3] uint8 -> unit rows [N, H*W*3]
            v = x.reshape(len(x), -1).astype(np.float32)
            return v / np.linalg.norm(v, axis=1, keepdims=True).clip(min=1e-12)

        return self.scores(flat(train_images), flat(val_images))
