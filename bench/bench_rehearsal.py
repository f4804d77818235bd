"""TinyImageNet-scale dress rehearsal: every stage of the pipeline on 200 classes, 100,000 + 10,000 images.

    python bench/bench_rehearsal.py [--work-dir DIR] [--train-seconds 600] [--r101-steps 3]

A million images within a memory budget (database folders, images decoded on the fly)::

    python bench/bench_rehearsal.py --train-per-class 5000 --size 32 --shard-rows 100000 \
        --memory-budget 1G --cache-budget 0 --train-seconds 300 --stages data train search update \
        --work-dir runs/rehearsal_1m --output-dir docs/results/rehearsal_1m

Data: Fashion-MNIST from Debian's ``dataset-fashion-mnist``, 10 garments x 20 hues
(``make_sample_data.py --tints 20``: "Coat hue 036", a fine-grained task: one shape in
20 colours), 500 train + 50 val images per class at 64 px, TinyImageNet's layout.
Then, each stage a separate process as a user runs it, with its own image cache folder
(``$DEEP_RANK_CACHE_DIR`` = WORK/cache):

1. make_sample_data.py, transform_validation.py, triplet_sampler.py (train: 100,000 1x1
   triplets; val: 10,000);
2. train_net.py with the recommended CPU recipe (bench_time_to_quality.OUR_RECIPE: small-cnn
   at 32 px) with its cosine schedule sized to the budget
   (``--recipe-epochs``), stopped by ``--time-limit`` if it has not ended;
3. gen_embeddings.py (all 110,000 images), eval.py (10,000 queries against 100,000,
   precision@30), query.py for one image twice (the first builds the saved index);
4. the default ResNet-101 at 224 px, 4096-d (``--weights none``: no download here), for
   ``--r101-steps`` steps, and gen_embeddings.py with it on ``--r101-probe`` val images
   (a folder of classes), whose images/s say what the full 110,000 would take;
5. the cache budget: the recipe trained for ``--stream-steps`` steps and gen_embeddings.py
   over the whole set, with ``--cache-budget 0`` (decoded on the fly in worker processes)
   against the cached runs;
6. update (``--update-images N``): N val images copied into the train classes under new names,
   then update_database.py on the database.

``--shard-rows N`` makes the embeddings database folders (shards of N rows) instead of ``.npy``
files; ``--memory-budget`` goes to eval.py, query.py and update_database.py, ``--cache-budget``
to train_net.py, gen_embeddings.py and update_database.py; queries search exactly (``--ann
exact``), and ``--faiss-nlist L`` adds a FAISS query, cold (training and filling the index) and warm.

For each stage: wall seconds, the process's peak resident memory and that of its
process tree (DataLoader workers included: shared pages counted once per process), and
the disk it wrote (its outputs plus the cache folder's growth). Writes
``rehearsal.json`` (after every stage, so a long run that stops leaves what it measured) and
``rehearsal.md`` into ``--output-dir``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from bench_common import latest_checkpoint, run_measured  # also puts the repo on sys.path
from bench_time_to_quality import OUR_RECIPE

from deepranking import argtypes, cli, file_io  # noqa: E402
from make_sample_data import FASHION_MNIST_CLASSES  # noqa: E402


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work-dir", type=Path, default=Path("runs/rehearsal_work"),
                   help="data, runs and cache go here (about 3 GB; kept for a look afterwards)")
    p.add_argument("--output-dir", type=Path, default=Path("runs/rehearsal"), help="where the table goes")
    p.add_argument("--source", default="debian", help="make_sample_data.py --source")
    p.add_argument("--tints", type=argtypes.bounded_int(2), default=20, help="hues per garment, >= 2 (20: 200 classes)")
    p.add_argument("--train-per-class", type=argtypes.positive_int, default=500)
    p.add_argument("--val-per-class", type=argtypes.positive_int, default=50)
    p.add_argument("--train-seconds", type=argtypes.positive_float, default=600.0,
                   help="--time-limit of the recipe's training run")
    p.add_argument("--recipe-epochs", type=argtypes.positive_float, default=1,
                   help="the recipe's --epochs here (a fraction ends the schedule part way into the last pass): its "
                        "cosine schedule should end with the budget, and one pass over 100,000 triplets (3,125 "
                        "steps) is about 10 minutes on 2 cores")
    p.add_argument("--r101-steps", type=argtypes.positive_int, default=3, help="ResNet-101 training steps")
    p.add_argument("--r101-probe", type=argtypes.positive_int, default=400,
                   help="val images ResNet-101 embeds (images/s gives the full set's time)")
    p.add_argument("--stream-steps", type=argtypes.positive_int, default=200,
                   help="steps of the cached and the streamed (--cache-budget 0) training runs compared")
    p.add_argument("--size", type=argtypes.positive_int, default=64, help="image side of the data (make_sample_data)")
    p.add_argument("--shard-rows", type=argtypes.positive_int, default=None,
                   help="embeddings as database folders of shards of this many rows (default: .npy files)")
    p.add_argument("--memory-budget", default=None, help="--memory-budget of eval.py, query.py, update_database.py")
    p.add_argument("--cache-budget", default=None,
                   help="--cache-budget of train_net.py, gen_embeddings.py and update_database.py (0: decode on the fly)")
    p.add_argument("--update-images", type=argtypes.positive_int, default=1000,
                   help="images the update stage adds (copies of val images, into their train class)")
    p.add_argument("--faiss-nlist", type=argtypes.positive_int, default=None,
                   help="also query through FAISS with this many lists, cold and warm")
    p.add_argument("--seed", type=int, default=1, help="seed of data, triplets and training")
    p.add_argument("--stages", nargs="+", default=["data", "train", "search", "r101", "stream"],
                   choices=["data", "train", "search", "r101", "stream", "update"],
                   help="stages to run (in this order)")
    return p


def recipe_flag(flag: str) -> str:
    """The value OUR_RECIPE gives ``flag`` (the recipe is a flat flag/value list)."""
    return OUR_RECIPE[OUR_RECIPE.index(flag) + 1]


def disk_bytes(*paths: Path) -> int:
    """Bytes of the files under ``paths`` (files or folders; missing ones count 0)."""
    total = 0
    for path in paths:
        if path.is_file():
            total += path.stat().st_size
        elif path.is_dir():
            total += sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    return total


class Rehearsal:
    def __init__(self, args, on_row=None):
        self.args, self.rows, self.on_row = args, [], on_row
        self.work = args.work_dir.resolve()
        self.cache = self.work / "cache"
        self.data = self.work / "fm200"
        os.environ["DEEP_RANK_CACHE_DIR"] = str(self.cache)  # inherited by every stage
        sharded = args.shard_rows is not None
        self.train_emb = self.work / ("train_db" if sharded else "train_embedding.npy")
        self.test_emb = self.work / ("test_db" if sharded else "test_embedding.npy")

    def flags(self, *names: str) -> list:
        """The rehearsal's --shard-rows / --memory-budget / --cache-budget for a stage, where set."""
        out = []
        for name in names:
            value = getattr(self.args, name.replace("-", "_"))
            if value is not None:
                out += [f"--{name}", value]
        return out

    def stage(self, name: str, script: str, *argv, outputs=(), note: str = "", cache_dir: Path | None = None):
        """Run one stage, record its time, memory and disk (its outputs + the cache's growth)."""
        cache = cache_dir or self.cache
        before = disk_bytes(cache)
        print(f"[{time.strftime('%H:%M:%S')}] {name}: {script} {' '.join(map(str, argv))}", file=sys.stderr)
        m = run_measured(script, *argv)
        row = dict(stage=name, command=f"{script} {' '.join(map(str, argv))}", seconds=m.seconds,
                   peak_mb=m.peak_mb, tree_peak_mb=m.tree_peak_mb,
                   output_bytes=disk_bytes(*map(Path, outputs)), cache_bytes=disk_bytes(cache) - before, note=note)
        self.rows.append(row)
        print(f"  {m.seconds:.1f} s, peak {m.peak_mb:.0f} MB (tree {m.tree_peak_mb:.0f} MB), "
              f"wrote {row['output_bytes'] / 1e6:.0f} MB + cache {row['cache_bytes'] / 1e6:.0f} MB", file=sys.stderr)
        if self.on_row is not None:
            self.on_row()
        return row

    # --- the stages --------------------------------------------------------------------------

    def data_stages(self) -> None:
        a, w = self.args, self.work
        if self.data.exists():
            shutil.rmtree(self.data)
        self.stage("make data", "make_sample_data.py", "--source", a.source, "--tints", a.tints,
                   "--train-per-class", a.train_per_class, "--val-per-class", a.val_per_class, "--size", a.size,
                   "--seed", a.seed, "--output", self.data, "--no-progress", outputs=[self.data])
        self.stage("transform_validation", "transform_validation.py", "--data-dir", self.data)
        for split, csv in ((1, w / "train.csv"), (0, w / "val.csv")):
            self.stage(f"triplet_sampler ({'train' if split else 'val'})", "triplet_sampler.py", "--training", split,
                       "--data-dir", self.data, "--num_pos_images", 1, "--num_neg_images", 1, "--output", csv,
                       "--seed", a.seed, "--force", outputs=[csv])

    def train_stage(self) -> None:
        a, w = self.args, self.work
        out = w / "run_recipe"
        shutil.rmtree(out, ignore_errors=True)
        self.stage("train_net (recipe)", "train_net.py", *OUR_RECIPE, "--epochs", a.recipe_epochs,
                   "--triplets", w / "train.csv",
                   "--val-triplets", w / "val.csv", "--time-limit", a.train_seconds, "--seed", a.seed,
                   *self.flags("cache-budget"), "--output-dir", out, "--no-progress", outputs=[out],
                   note=f"{recipe_flag('--arch')} {recipe_flag('--image-size')} px, {recipe_flag('--embedding-dim')}-d, "
                        f"--epochs {a.recipe_epochs:g}, --time-limit {a.train_seconds:.0f}")

    def recipe_model(self) -> Path:
        return latest_checkpoint(self.work / "run_recipe")

    def search_stages(self) -> None:
        a, w = self.args, self.work
        n_classes = len(FASHION_MNIST_CLASSES) * a.tints  # each garment in --tints hues
        n_train, n_val = n_classes * a.train_per_class, n_classes * a.val_per_class
        model = self.recipe_model()
        train_emb, test_emb = self.train_emb, self.test_emb
        form = f"database folders of {a.shard_rows:,}-row shards" if a.shard_rows else "binary files"
        self.stage("gen_embeddings (recipe)", "gen_embeddings.py", "--model", model, "--data-dir", self.data,
                   "--train-output", train_emb, "--test-output", test_emb, *self.flags("shard-rows", "cache-budget"),
                   "--device", "cpu", "--no-progress", "--force", outputs=[train_emb, test_emb],
                   note=f"{n_train + n_val:,} images, 128-d, {form}")
        row = self.stage("eval (recipe)", "eval.py", "--train-embeddings", train_emb, "--test-embeddings", test_emb,
                         *self.flags("memory-budget"), "--output-dir", w / "eval_recipe", "--device", "cpu",
                         "--no-progress", "--force", outputs=[w / "eval_recipe"],
                         note=f"{n_val:,} queries x {n_train:,}, exact")
        metrics = json.loads((w / "eval_recipe" / "metrics.json").read_text())
        row["precision_at_30"] = metrics["test_precision_at_k"]
        row["metrics"] = {k: v for k, v in metrics.items() if isinstance(v, (int, float))}
        self.query_stages(model, "exact", [])
        if a.faiss_nlist:
            self.query_stages(model, "faiss", ["--nlist", a.faiss_nlist])

    def query_stages(self, model: Path, ann: str, extra: list) -> None:
        """query.py for one image twice: cold (no saved index) and warm."""
        train_emb = self.train_emb
        query = sorted((self.data / "val").rglob("*.JPEG"))[0]
        shutil.rmtree(Path(str(train_emb) + ".index"), ignore_errors=True)  # cold: no saved index yet
        for folder in train_emb.glob("ivf-*") if train_emb.is_dir() else ():
            shutil.rmtree(folder)
        if train_emb.is_dir():  # a folder is searched as it is; FAISS keeps its indexes inside it
            built = [train_emb / f"ivf-nlist{extra[1]}-pq0-seed0"] if ann == "faiss" else []
        else:
            built = [Path(str(train_emb) + ".index")]
        for kind in ("cold", "warm"):
            self.stage(f"query ({ann}, {kind})", "query.py", "--model", model, "--embeddings", train_emb, "--top", 5,
                       "--ann", ann, *extra, *self.flags("memory-budget"), "--device", "cpu", query,
                       outputs=built if kind == "cold" else [],
                       note="one image" + ("; cold builds the saved index" if kind == "cold" and built else ""))

    def update_stage(self) -> None:
        """update_database.py after ``--update-images`` val images are copied into their train classes."""
        a = self.args
        val = sorted((self.data / "val").iterdir())
        added = 0
        for i in range(a.update_images):
            folder = val[i % len(val)]
            images = sorted((folder / "images").glob("*.JPEG"))
            source = images[(i // len(val)) % len(images)]
            target = self.data / "train" / folder.name / "images" / f"added_{i}_{source.name}"
            shutil.copy(source, target)
            added += 1
        self.stage("update_database (recipe)", "update_database.py", "--model", self.recipe_model(),
                   "--database", self.train_emb, *self.flags("memory-budget", "cache-budget"), "--device", "cpu",
                   "--no-progress", outputs=[], note=f"{added:,} images added to the database")

    def r101_stages(self) -> None:
        a, w = self.args, self.work
        out = w / "run_r101"
        shutil.rmtree(out, ignore_errors=True)
        self.stage("train_net (ResNet-101 224 px)", "train_net.py", "--weights", "none", "--triplets", w / "train.csv",
                   "--max-steps", a.r101_steps, "--seed", a.seed, "--output-dir", out, "--no-progress",
                   outputs=[out], note=f"defaults (batch 25, 4096-d, layer4 trained), {a.r101_steps} steps")
        probe = w / "probe"
        shutil.rmtree(probe, ignore_errors=True)
        val = sorted((self.data / "val").iterdir())
        per_class = max(1, a.r101_probe // len(val))
        for folder in val:
            (probe / folder.name).mkdir(parents=True)
            for image in sorted(folder.rglob("*.JPEG"))[:per_class]:
                shutil.copy(image, probe / folder.name / image.name)
        emb = w / "probe_r101.npy"
        self.stage("gen_embeddings (ResNet-101 224 px)", "gen_embeddings.py", "--model", latest_checkpoint(out),
                   "--data-dir", probe, "--train-output", emb, "--device", "cpu", "--no-progress", "--force",
                   outputs=[emb], note=f"{per_class * len(val)} val images")

    def stream_stages(self) -> None:
        a, w = self.args, self.work
        for budget in ("auto", "0"):
            cache = w / f"cache_{'streamed' if budget == '0' else 'fresh'}"
            shutil.rmtree(cache, ignore_errors=True)
            os.environ["DEEP_RANK_CACHE_DIR"] = str(cache)
            label = "streamed, --cache-budget 0" if budget == "0" else "cached (cold cache)"
            # gen_embeddings then finds the training run's entry (same paths, same size): a hit
            embed_label = label if budget == "0" else "cached (the training run's entry: a hit)"
            out = w / f"run_stream_{budget}"
            shutil.rmtree(out, ignore_errors=True)
            row = self.stage(f"train_net {a.stream_steps} steps ({label})", "train_net.py", *OUR_RECIPE,
                             "--triplets", w / "train.csv", "--max-steps", a.stream_steps, "--seed", a.seed,
                             "--cache-budget", budget, "--log-every", 10, "--output-dir", out, "--no-progress", outputs=[out],
                             cache_dir=cache)
            records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
            rates = [r["images_per_s"] for r in records if r.get("event") == "train"][1:]  # after warm-up
            row["images_per_s"] = sum(rates) / len(rates) if rates else float("nan")
            emb = w / f"stream_{budget}.npy"
            self.stage(f"gen_embeddings ({embed_label})", "gen_embeddings.py", "--model", self.recipe_model(),
                       "--data-dir", self.data, "--splits", "train", "--train-output", emb, "--cache-budget", budget,
                       "--device", "cpu", "--no-progress", "--force", outputs=[emb], cache_dir=cache)
            shutil.rmtree(cache, ignore_errors=True)
        os.environ["DEEP_RANK_CACHE_DIR"] = str(self.cache)

    # --- the report --------------------------------------------------------------------------

    def report(self) -> str:
        lines = ["| stage | seconds | peak memory (process / tree) | disk written (outputs + cache) | note |",
                 "|---|---|---|---|---|"]
        for r in self.rows:
            extra = []
            if "precision_at_30" in r:
                extra.append(f"precision@30 **{r['precision_at_30']:.4f}**")
            if "images_per_s" in r:
                extra.append(f"{r['images_per_s']:.0f} img/s")
            note = "; ".join(x for x in [r["note"], *extra] if x)
            lines.append(f"| {r['stage']} | {r['seconds']:.1f} | {r['peak_mb']:,.0f} / {r['tree_peak_mb']:,.0f} MB | "
                         f"{r['output_bytes'] / 1e6:,.0f} + {r['cache_bytes'] / 1e6:,.0f} MB | {note} |")
        return "\n".join(lines) + "\n"


def main(args) -> None:
    import torch

    args.work_dir.mkdir(parents=True, exist_ok=True)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    def save() -> None:
        summary = dict(cpu_cores=os.cpu_count(), torch_threads=torch.get_num_threads(), seed=args.seed,
                       recipe=OUR_RECIPE, argv=sys.argv[1:], rows=rehearsal.rows)
        with file_io.atomic_path(args.output_dir / "rehearsal.json") as tmp:
            tmp.write_text(json.dumps(summary, indent=1))

    rehearsal = Rehearsal(args, on_row=save)
    steps = {"data": rehearsal.data_stages, "train": rehearsal.train_stage, "search": rehearsal.search_stages,
             "r101": rehearsal.r101_stages, "stream": rehearsal.stream_stages, "update": rehearsal.update_stage}
    for name in args.stages:
        steps[name]()
    save()
    table = rehearsal.report()
    with file_io.atomic_path(args.output_dir / "rehearsal.md") as tmp:
        tmp.write_text(table)
    print(table)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
