"""Bring an embedding database up to date with its image folder: embed only what changed.

    python update_database.py --model deepranknet.model --database train_embedding.txt

The database (text, .npz or .npy, written by gen_embeddings.py) records the model that
made it, the class folder it lists and each image's size and modification time. This
command lists that folder again (``--images DIR`` for another place) and

* embeds the images that are new, or whose size or modification time changed,
* drops the rows of images that are gone,
* keeps every other row exactly as it was (its values are copied, not recomputed),

then writes the database (and its companions) back atomically, rows in the order
gen_embeddings.py uses (``image_data.list_class_folder``: by class name, then path), so
the result equals a full rebuild with the same model (kept rows bit for bit; new rows to 1e-6,
the rounding of embedding them in other batches, tested on the CPU). It refuses a --model other than
the one that built the database (their fingerprints differ): re-embedding everything with
the new model is gen_embeddings.py's job. ``--output`` writes elsewhere instead of in
place (``--force`` to overwrite an existing file); ``--dry-run`` only counts.
A saved query index beside the database (query.py) is rebuilt by the next query.

A database folder (gen_embeddings.py --shard-rows) is never rewritten whole: new images
become new shards at its end, a shard holding a changed or removed image is rewritten
(changed rows in place), the others stay as they are, and so do their FAISS indexes; the
new shards are indexed at once where FAISS and an index exist (deepranking/database.py).
Its rows are then those of a rebuild in another order (new images last).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from deepranking import cli, database, embedding, file_io, runtime
from deepranking.cli import UserError


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", type=Path, required=True, help="the checkpoint that built the database")
    p.add_argument("--database", type=Path, required=True,
                   help="database to update (from gen_embeddings.py: a .txt, .npz or .npy file, or a folder of "
                        "shards)")
    p.add_argument("--images", type=Path, default=None,
                   help="class folder to list (default: the one recorded in the database)")
    p.add_argument("--output", type=Path, default=None,
                   help="write the updated database here instead of replacing --database")
    p.add_argument("--force", action="store_true", help="overwrite an existing --output")
    p.add_argument("--dry-run", action="store_true", help="count new, changed and removed images; write nothing")
    embedding.add_embedding_flags(p)
    database.add_budget_flag(p)
    return p


@dataclass
class Plan:
    """What an update does. ``keep[i]``: the old row of new row i, -1 = embed it."""

    paths: list[str]  # the new rows, in list_class_folder order
    labels: list[str]
    stamps: np.ndarray  # int64 [N, 2] (size, mtime_ns)
    keep: np.ndarray  # int64 [N]
    new: int
    changed: int
    removed: int

    @property
    def to_embed(self) -> list[str]:
        return [p for p, k in zip(self.paths, self.keep) if k < 0]

    @property
    def unchanged(self) -> int:
        return int((self.keep >= 0).sum())


def plan_update(db, root: Path) -> Plan:
    """Compare the folder's images with the database's rows (path, label, size, mtime)."""
    from deepranking.image_data import image_stamps, list_class_folder

    images = list_class_folder(root)
    paths, labels = list(images.paths), images.label_names
    stamps = image_stamps(paths)
    old_stamps = db.stamps
    old_row = {p: i for i, p in enumerate(db.paths)}
    keep = np.full(len(paths), -1, dtype=np.int64)
    new = changed = 0
    for i, (p, label) in enumerate(zip(paths, labels)):
        j = old_row.get(p)
        if j is None:
            new += 1
        elif (old_stamps[j] == stamps[i]).all() and str(db.labels[j]) == label:
            keep[i] = j
        else:
            changed += 1
    removed = len(set(old_row) - set(paths))
    return Plan(paths, labels, stamps, keep, new, changed, removed)


def check_database(db, path: Path) -> None:
    """The database must say which model made it and which images it holds."""
    if db.model is None or not (db.record or {}).get("images") or db.stamps is None:
        reason = db.record_note or f"{path} records no model or image times"
        raise UserError(f"cannot update {path}: {reason}; rebuild it once with gen_embeddings.py "
                        f"(its files record what an update needs)")


def main(args) -> Plan:
    from deep_rank_net import model_from_checkpoint
    from deepranking.checkpoint import load_checkpoint, model_fingerprint
    from deepranking.embedding import embed_paths
    from deepranking import embedding_io
    from deepranking.embedding_io import files_of

    output = args.output or args.database
    if database.is_folder(args.database) and args.output is not None:
        raise UserError("a database folder is updated in place (only the shards that change are written); "
                        "--output is for one-file databases")
    if not args.dry_run:  # what an interrupted update of this database left (written or not, this run)
        for path in files_of(output):
            file_io.remove_stale_temporaries(path)
    if args.output is not None and not args.dry_run:
        if Path(args.output).resolve() != Path(args.database).resolve():
            file_io.check_output_path(args.output, args.force, "updated database")
    db = database.open(args.database, progress=not args.no_progress)
    check_database(db, args.database)
    ckpt = load_checkpoint(args.model)
    device = runtime.pick_device(args.device)
    model, spec = model_from_checkpoint(ckpt, device)
    fingerprint = model_fingerprint(ckpt, spec.to_dict(), args.model)
    del ckpt
    embedding_io.check_same_model("--model", fingerprint, f"database {args.database}", db.model,
                                  hint="an update keeps the database's model; re-embed everything with "
                                       "gen_embeddings.py to change it")
    root = Path(args.images) if args.images is not None else Path(db.record["images"]["root"])
    plan = plan_update(db, root)
    summary = (f"{len(plan.to_embed)} to embed ({plan.new} new, {plan.changed} changed), {plan.removed} removed, "
               f"{plan.unchanged} unchanged")
    if args.dry_run:
        print(f"{args.database}: {summary} (dry run: nothing written)")
        return plan
    if not plan.to_embed and not plan.removed and output == args.database:
        print(f"{args.database} is up to date: {plan.unchanged} images, nothing to do")
        return plan
    if not plan.paths:
        raise UserError(f"no images left in {root}: not writing an empty database")
    start = time.perf_counter()
    if isinstance(db, database.ShardedDatabase):
        summary += "; " + update_folder(db, plan, model, spec, fingerprint, root, device, args)
    else:
        emb = np.empty((len(plan.paths), db.dim), dtype=np.float32)
        kept = plan.keep >= 0
        emb[kept] = db[plan.keep[kept]]
        if plan.to_embed:
            precision = runtime.resolve_precision(device, args.amp)
            emb[~kept] = embed_paths(plan.to_embed, model, spec, batch_size=args.batch_size, device=device,
                                     precision=precision, cache_dir=args.cache_dir, progress=not args.no_progress,
                                     cache_budget=args.cache_budget)
        embedding_io.write_embeddings(output, plan.paths, plan.labels, emb, progress=not args.no_progress,
                                      model=fingerprint, images={"root": str(root.resolve()), "stamps": plan.stamps})
    seconds = time.perf_counter() - start
    print(f"updated {output}: {summary}; embedded in {seconds:.2f} s", file=sys.stderr)
    return plan


def update_folder(db, plan: Plan, model, spec, fingerprint: dict, root: Path, device, args) -> str:
    """Update a database folder shard by shard (database.update_folder) and its FAISS indexes; what it did."""
    precision = runtime.resolve_precision(device, args.amp)

    def embed(paths: list[str]):
        return embedding.embed_path_batches(paths, model, spec, batch_size=args.batch_size, device=device,
                                            precision=precision, cache_dir=args.cache_dir,
                                            progress=not args.no_progress, cache_budget=args.cache_budget)

    budget = database.memory_budget(args.memory_budget)
    done = database.update_folder(db, plan.paths, plan.labels, plan.stamps, plan.keep, embed, fingerprint,
                                  str(root.resolve()), budget)
    indexes = database.refresh_indexes(database.open(args.database), budget)
    return (f"shards: {done.kept} kept, {done.rewritten} rewritten, {done.dropped} dropped, {done.added} added"
            + (f"; {indexes} FAISS index(es) brought up to date" if indexes else ""))


if __name__ == "__main__":
    cli.run(main, get_args_parser())
