"""Find the images most similar to query images in an embedding database.

    python query.py --model runs/deepranknet.model --embeddings train_embedding.txt --top 10 \\
        my_photo.jpg some/folder "more/*.png" --grid neighbours.png

QUERY may be image files, folders (every image inside, recursively, sorted) or
glob patterns (quote them; ``**`` recurses). The database is read once, the
queries are embedded in batches with the same model that made the database,
and each query's top-N neighbours are printed with their Euclidean distances
(0 = identical embedding, 2 = opposite). ``--grid`` also draws one picture row
per query: the query, then its neighbours (green border = same class as the
query's folder, red = other class, when that is known).

Search is exact by default; ``--ann faiss`` (or ``auto`` on databases above
200,000 rows, when faiss-cpu is installed) searches only the nearest clusters.

The first query builds a saved index beside the database (``<file>.index/``: the
matrix as a memory-mapped .npy, the paths, FAISS indexes; see
deepranking/saved_index.py); later queries reuse it until the database changes.
A database folder (gen_embeddings.py --shard-rows) needs no copy: exact search reads
its shards block by block within --memory-budget, and FAISS keeps one index per shard
inside the folder (deepranking/database.py).
The database must come from --model (their fingerprints are compared).
"""

from __future__ import annotations

import argparse
import glob
import os
import sys
import time
from pathlib import Path

import numpy as np

from deepranking import argtypes, cli, database, file_io, runtime
from deepranking import retrieval
from deepranking.cli import UserError

GLOB_CHARS = set("*?[")


def get_args_parser() -> argparse.ArgumentParser:
    from deepranking.ann_search import ANN_CHOICES, DEFAULT_NPROBE

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("queries", nargs="+", metavar="QUERY", help="image files, folders or glob patterns")
    p.add_argument("--model", type=Path, required=True, help="checkpoint that made the embeddings")
    p.add_argument("--embeddings", type=Path, required=True,
                   help="database from gen_embeddings.py: an embedding file (.txt, .npz or .npy) or a database "
                        "folder (--shard-rows)")
    p.add_argument("--top", type=argtypes.positive_int, default=10,
                   help="neighbours to show per query (default: %(default)s)")
    p.add_argument("--grid", type=Path, default=None,
                   help="also write a PNG grid of the results (and its table: the same name with .csv)")
    p.add_argument("--force", action="store_true", help="overwrite an existing --grid file and its .csv")
    p.add_argument("--exclude-self", action="store_true",
                   help="leave out database rows that are the query image itself")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default: %(default)s)")
    p.add_argument("--batch-size", type=argtypes.positive_int, default=256,
                   help="query images per forward pass (default: %(default)s)")
    p.add_argument("--ann", choices=ANN_CHOICES, default="auto",
                   help="exact search, FAISS cluster search (pip install faiss-cpu), or auto "
                        "(FAISS above 200,000 rows when installed; default: %(default)s)")
    p.add_argument("--nprobe", type=argtypes.positive_int, default=DEFAULT_NPROBE,
                   help="FAISS: clusters searched per query (more = slower, closer to exact; default: %(default)s)")
    p.add_argument("--nlist", type=argtypes.positive_int, default=None,
                   help="FAISS: clusters in the index (default about 4 * sqrt(rows))")
    p.add_argument("--index", type=Path, default=None,
                   help="FAISS: keep the built index in this file (and its key in FILE.key) and reuse it while "
                        "--embeddings is the file it was built from")
    p.add_argument("--pq", type=argtypes.non_negative_int, default=0, metavar="M",
                   help="FAISS on a database folder: IVF-PQ with M bytes per vector (M divides the dimension; "
                        "approximate distances, a fraction of the memory); 0 (default) = IVF-Flat")
    p.add_argument("--seed", type=argtypes.seed, default=0, help="seed of the FAISS k-means (default: %(default)s)")
    database.add_budget_flag(p)
    p.add_argument("--no-saved-index", action="store_true",
                   help="read --embeddings itself instead of the saved index beside it (<file>.index/, "
                        "built by the first query and rebuilt whenever the database changes)")
    return p


# ----------------------------------------------------------------------------
# Queries
# ----------------------------------------------------------------------------


def _images_in_folder(folder: Path) -> list[str]:
    from deepranking.image_data import is_image_file

    found = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = [d for d in dirnames if not d.startswith(".")]
        found.extend(os.path.join(dirpath, f) for f in filenames if is_image_file(f) and not f.startswith("."))
    return sorted(found)


def expand_queries(items: list[str]) -> list[str]:
    """Image files, folders and glob patterns -> absolute image paths (order kept, each file once).

    Patterns are expanded here (not by the shell) so that quoted patterns work
    everywhere. A path that does not exist, or names no regular file, is an error; a
    pattern or folder that matches no image is named in a warning (a mistyped pattern
    would otherwise answer fewer queries without a word), and an error when nothing
    matched at all. Entries of folders and patterns named like images that are no
    regular file (a FIFO, a socket) are named in a warning and never opened. A file
    reached twice (a linked folder, ``**`` through a link loop) is queried once.
    """
    from deepranking.image_data import is_image_file, regular_images

    out: list[str] = []
    for item in items:
        before = len(out)
        p = Path(item).expanduser()
        if p.is_dir():
            out.extend(regular_images(_images_in_folder(p), item))
        elif os.path.lexists(p) or not GLOB_CHARS & set(item):
            problem = file_io.regular_file_problem(p)
            if problem is not None:
                raise UserError(f"query {problem}: {item}")
            out.append(str(p))
        else:
            found = []
            for match in sorted(glob.glob(os.path.expanduser(item), recursive=True)):
                m = Path(match)
                found.extend(_images_in_folder(m) if m.is_dir() else [match] if is_image_file(m.name) else [])
            out.extend(regular_images(found, item))
        if len(out) == before and len(items) > 1:
            cli.warn(f"no query image in {item}: {'folder' if p.is_dir() else 'pattern'} left out")
    uniq: dict[str, str] = {}  # the file itself -> the first name it was reached by
    for q in out:
        uniq.setdefault(os.path.realpath(q), os.path.abspath(q))
    if not uniq:
        raise UserError(f"no query images matched {' '.join(items)}")
    return list(uniq.values())


# ----------------------------------------------------------------------------
# Search and output
# ----------------------------------------------------------------------------


def build_searcher(database: np.ndarray, backend: str, device, args, database_id: str | None = None,
                   index_path: Path | None = None):
    """Index the database once (part of loading): a retrieval.ExactIndex or a FAISS IVF index.

    ``database`` may be a read-only memory map (the saved index); FAISS reuses ``index_path``
    (--index, else the saved-index folder's file) when it was built from ``database_id``
    (saved_index.database_id of the embedding file) and fits.
    """
    if backend == "faiss":
        from deepranking.ann_search import load_or_build_index

        return load_or_build_index(args.index or index_path, database, database_id, nlist=args.nlist, seed=args.seed)
    import warnings

    with warnings.catch_warnings():  # torch warns about read-only arrays; the index never writes to it
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return retrieval.ExactIndex(database, device)


def file_searcher(db, saved, backend: str, device, args):
    """A one-file database's searcher (build_searcher); FAISS reuses the index saved for this very file."""
    if args.pq:
        raise UserError("--pq is for database folders (gen_embeddings.py --shard-rows); a one-file database's "
                        "FAISS index is IVF-Flat")
    index_path = db_id = None
    if backend == "faiss":
        from deepranking import saved_index
        from deepranking.ann_search import default_nlist

        if saved is not None:  # the database's key, already taken by open_database
            index_path = saved.faiss_path(args.nlist or default_nlist(len(db)), args.seed)
            db_id = saved_index.key_hash(saved.key)
        elif args.index is not None:  # only a kept index needs the id (it may hash the whole file)
            db_id = saved_index.database_id(args.embeddings)
    return build_searcher(db.emb, backend, device, args, database_id=db_id, index_path=index_path)


def shard_searcher(db, backend: str, device, args) -> database.Searcher:
    """A database folder's searcher: exact by blocks within --memory-budget, or FAISS, one index per shard
    kept in the folder (built for the shards that have none: the first query, or after an update)."""
    if args.index is not None:
        raise UserError("--index is for one-file databases; a database folder keeps its FAISS indexes inside it")
    budget = database.memory_budget(args.memory_budget)
    if backend == "faiss":
        return database.ShardIVF(db, budget, nlist=args.nlist, nprobe=args.nprobe, seed=args.seed, pq=args.pq)
    if args.pq:
        raise UserError("--pq goes with FAISS search (--ann faiss)")
    return database.StreamingIndex(db, budget, device)


def search(searcher, queries: np.ndarray, k: int, args,
           self_rows: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k (dist [Q, k], idx [Q, k]) of ``queries`` [Q, D] with a build_searcher result.

    ``self_rows`` int64 [Q]: database row that is the query itself (-1 if none), left out when given.
    """
    exact_like = isinstance(searcher, (retrieval.ExactIndex, database.Searcher))  # search(..., exclude_rows=)
    n = len(searcher) if exact_like else int(searcher.ntotal)
    excludes = self_rows is not None and bool((self_rows >= 0).any())
    if n - excludes < 1:
        raise UserError(f"the database holds {n} image(s), and --exclude-self leaves the query "
                        f"itself out: no other image to answer with")
    k = min(k, n - excludes)  # both backends answer with as many images, the query itself never among them
    if exact_like:
        return searcher.search(queries, k, exclude_rows=self_rows)
    from deepranking.ann_search import ivf_search

    dist, idx = ivf_search(searcher, queries, min(k + excludes, n), nprobe=args.nprobe)
    if excludes:
        dist, idx = retrieval.drop_neighbours(dist, idx, self_rows, k)
    return dist[:, :k], idx[:, :k]


def display_path(path: str) -> str:
    """Relative to the current folder when inside it, else absolute."""
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def format_results(query_paths: list[str], dist: np.ndarray, idx: np.ndarray, db_paths: list[str],
                   db_labels) -> str:
    """A plain-text table per query: rank, distance, label, path."""
    lines = []
    label_w = max([5] + [len(str(db_labels[j])) for row in idx for j in row if j >= 0])
    for q, path in enumerate(query_paths):
        lines.append(f"query {q + 1}: {display_path(path)}")
        lines.append(f"  {'rank':>4}  {'distance':>9}  {'label':<{label_w}}  path")
        for r, (d, j) in enumerate(zip(dist[q], idx[q]), start=1):
            if j < 0:  # FAISS found fewer than k candidates in the probed clusters
                continue
            lines.append(f"  {r:>4}  {d:>9.6f}  {str(db_labels[j]):<{label_w}}  {display_path(db_paths[j])}")
        lines.append("")
    return "\n".join(lines)


def write_grid(path: Path, query_paths: list[str], dist: np.ndarray, idx: np.ndarray, db_paths: list[str],
               db_labels) -> None:
    """One row per query: the query, then its neighbours captioned with distance and label."""
    from deepranking.image_data import label_from_path
    from deepranking.plots import GREEN, RED, image_grid

    known = {str(x) for x in db_labels}
    rows, titles = [], []
    for q, qpath in enumerate(query_paths):
        qlabel = label_from_path(qpath)
        qlabel = qlabel if qlabel in known else None  # colour borders only when the folder is a class
        row = [(qpath, "query", None)]
        for d, j in zip(dist[q], idx[q]):
            if j < 0:
                continue
            label = str(db_labels[j])
            colour = None if qlabel is None else (GREEN if label == qlabel else RED)
            row.append((db_paths[j], f"{d:.4f}\n{label}", colour))
        rows.append(row)
        titles.append(display_path(qpath))
    image_grid(path, rows, titles)


def database_rows(db_paths: list[str], query_paths: list[str]) -> np.ndarray:
    """int64 [Q]: each query's row in the database (-1: not in it), also through a linked folder."""
    row_of = {p: i for i, p in enumerate(db_paths)}
    rows = [row_of.get(p, -1) for p in query_paths]
    if min(rows) < 0:  # the same file through a linked folder? resolve folders, not each of N files
        real_dir = {d: os.path.realpath(d) for d in {os.path.dirname(p) for p in db_paths}}
        real = {os.path.join(real_dir[os.path.dirname(p)], os.path.basename(p)): i for i, p in enumerate(db_paths)}
        rows = [r if r >= 0 else real.get(os.path.realpath(q), -1) for r, q in zip(rows, query_paths)]
    return np.array(rows, dtype=np.int64)


def open_search_database(path, no_saved_index: bool):
    """(the database, its saved index or None): a folder's shards are memory-mapped as they are; a file
    goes through its saved index beside it (saved_index.open_database) unless --no-saved-index."""
    from deepranking.embedding_io import read_embeddings
    from deepranking.saved_index import open_database

    if database.is_folder(path):
        return database.open(path), None
    if no_saved_index:
        return read_embeddings(path, progress=False), None
    saved = open_database(path)
    return saved.db, saved


def main(args) -> None:
    from deepranking.ann_search import choose_backend
    from deep_rank_net import model_from_checkpoint
    from deepranking.checkpoint import load_checkpoint, model_fingerprint
    from deepranking.embedding import embed_paths
    from deepranking.embedding_io import check_same_model

    # Cheap checks first: nothing is loaded or embedded if an input is wrong.
    if args.grid is not None:
        from deepranking.plots import data_path

        file_io.check_output_path(args.grid, args.force, "grid picture")
        file_io.check_output_path(data_path(args.grid), args.force, "grid's table")  # written beside the PNG
    query_paths = expand_queries(args.queries)
    if not database.is_folder(args.embeddings):  # a database folder is checked when opened
        file_io.check_input_file(args.embeddings, "embedding file")
    device = runtime.pick_device(args.device)
    ckpt = load_checkpoint(args.model)
    model, spec = model_from_checkpoint(ckpt, device)
    fingerprint = model_fingerprint(ckpt, spec.to_dict(), args.model)
    del ckpt

    start = time.perf_counter()
    db, saved = open_search_database(args.embeddings, args.no_saved_index)
    dim = model.config["embedding_dim"]
    if db.dim != dim:
        raise UserError(f"the model makes {dim}-dimensional embeddings but {args.embeddings} holds {db.dim}-dimensional "
                        f"ones: use the checkpoint that wrote the file")
    check_same_model("--model", fingerprint, f"database {args.embeddings}", db.model,
                     hint="use the checkpoint that wrote the database, or rebuild it with gen_embeddings.py",
                     notes=(db.record_note,))
    backend = choose_backend(args.ann, len(db))
    if isinstance(db, database.ShardedDatabase):
        searcher = shard_searcher(db, backend, device, args)
    else:
        searcher = file_searcher(db, saved, backend, device, args)
    load_s = time.perf_counter() - start

    start = time.perf_counter()
    # The checkpoint's preprocessing, as in gen_embeddings.py: the same image gives the same vector.
    queries = embed_paths(query_paths, model, spec, batch_size=args.batch_size, device=device,
                          progress=False)  # [Q, D]
    embed_s = time.perf_counter() - start
    self_rows = database_rows(db.paths, query_paths) if args.exclude_self else None
    start = time.perf_counter()
    dist, idx = search(searcher, queries, args.top, args, self_rows=self_rows)
    search_s = time.perf_counter() - start

    print(format_results(query_paths, dist, idx, db.paths, db.labels), end="")
    how = f" (saved index {saved.status})" if saved is not None else ""
    print(f"{len(query_paths)} queries against {len(db)} x {db.dim} ({backend} search): load {load_s:.2f} s{how}, "
          f"embed {embed_s:.2f} s, search {search_s * 1000:.1f} ms", file=sys.stderr)
    if args.grid is not None:
        write_grid(args.grid, query_paths, dist, idx, db.paths, db.labels)
        print(f"wrote {args.grid}", file=sys.stderr)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
