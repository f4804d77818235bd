"""Top-k precision of an embedding database, plus retrieval pictures.

    python eval.py --train-embeddings train_embedding.txt --test-embeddings test_embedding.txt

Test precision@k: each val (test-file) image queries the train database; the
fraction of its k nearest train images (Euclidean) sharing its class, averaged.
Train precision@k: train images query the train database, excluding themselves.
Also hit@k (at least one match in k: what the classic code called "accuracy"),
recall@1, MAP@R and, with --triplets, the fraction of triplets ranked correctly.
Writes metrics.json, per_class_precision.csv, precision_at_k.png,
retrieval_<i>.png (query, 10 closest and 10 farthest) and report.html (all of it
on one self-contained page, with the worst and best queries and the most confused
class pairs) into --output-dir. Where classes
have fewer than k other images, precision@k's ceiling (the mean of min(k, R) / k) is
printed and recorded beside it.

A file not named on the command line is taken only where it belongs with the named one:
the test_embedding.txt beside --train-embeddings (or train_embedding.txt beside
--test-embeddings), of the same model and dataset. Without one, a dataset with no val
split (a plain folder of class folders) is evaluated leave-one-out (--protocol self) with
a line saying so; anything else is refused, naming the flag to pass.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

from deepranking import argtypes, cli, database, file_io, runtime
from deepranking import embedding_io
from deepranking import image_data
from deepranking import plots
from deepranking import retrieval
from deepranking import scoring
from deepranking.cli import UserError
from deepranking.report import write_report

TRAIN_NAME, TEST_NAME = "train_embedding.txt", "test_embedding.txt"  # gen_embeddings.py's default outputs
PICTURE_NEIGHBOURS = 10  # closest / farthest shown per demo query
SHOWN_CLASSES = 5  # classes in each of the best and worst lists printed
COLLAPSE_DISTANCE = 1e-6  # mean pairwise distance below which the embeddings have collapsed


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-embeddings", type=Path, default=None,
                   help=f"database embedding file (train split; default: {TRAIN_NAME}, beside --test-embeddings "
                        "when that is given)")
    p.add_argument("--test-embeddings", type=Path, default=None,
                   help=f"query embedding file (val split; default: the {TEST_NAME} beside --train-embeddings, "
                        "used only if it comes from the same model and dataset; without one, a dataset with no val "
                        "split is evaluated leave-one-out, --protocol self, and anything else is refused)")
    p.add_argument("--k", type=argtypes.positive_int, default=30,
                   help="neighbours per query, the k of precision@k and hit@k (default: %(default)s)")
    p.add_argument("--output-dir", type=Path, default=Path("eval_results"),
                   help="where results go (default: %(default)s)")
    p.add_argument("--queries", nargs="*", default=None,
                   help="test images to draw: row indices into the test file or image paths")
    p.add_argument("--num-demo-queries", type=argtypes.non_negative_int, default=5,
                   help="random test queries to draw when --queries is not given (default: %(default)s)")
    p.add_argument("--triplets", type=Path, default=None, help="triplet CSV to score (fraction ranked correctly)")
    p.add_argument("--max-train-queries", type=argtypes.positive_int, default=10_000,
                   help="train precision uses a seeded subset of at most this many train queries "
                        "(default: %(default)s)")
    p.add_argument("--chunk-size", type=argtypes.positive_int, default=None,
                   help="queries per kNN matrix product (default: as many as keep the [chunk, rows] "
                        "distance block within a sixteenth of --memory-budget)")
    database.add_budget_flag(p)
    p.add_argument("--seed", type=argtypes.seed, default=0,
                   help="seed for the train subset and demo queries (default: %(default)s)")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda (default: %(default)s)")
    p.add_argument("--protocol", choices=scoring.PROTOCOLS, default="split",
                   help="split (default): the test file queries the train database, plus train precision; "
                        "self: one file queries itself, each query's own row excluded (leave-one-out: the "
                        "unseen-class protocol of CUB-200/Cars196/SOP, Musgrave et al. 2020): --test-embeddings, "
                        "else a named --train-embeddings")
    p.add_argument("--hierarchy", type=Path, default=None,
                   help="class,parent CSV (one row per class id) for graded relevance: parent-level precision@k "
                        "and NDCG@k (same class 2 > same parent 1 > other 0) beside the class-level figures "
                        "(default: a hierarchy.csv found above the images, as make_sample_data.py --tints writes)")
    p.add_argument("--words", type=Path, default=None,
                   help="words.txt (id TAB name, synonyms) giving class names for the console, the per-class "
                        "table and the pictures (default: a words.txt found above the images, if any)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--force", action="store_true",
                   help="overwrite an existing metrics.json and an earlier evaluation's pictures")
    p.add_argument("--allow-same-files", action="store_true",
                   help="evaluate even when the train and test files hold the same images, or share some "
                        "(a warning, not an error: each shared query then finds itself)")
    return p


def default_inputs(args) -> None:
    """Fill in the embedding files (and protocol) not named on the command line; never pair files silently.

    A default file is used only where it belongs with the named (or default) other one: the
    database is the train_embedding.txt beside a named --test-embeddings, the queries the
    test_embedding.txt beside --train-embeddings, and only when :func:`unpaired` finds nothing
    against them. Without such a test file, a database whose dataset has no val split (a plain
    folder of class folders), or any database under --protocol self, is evaluated leave-one-out,
    with a line saying so; anything else is refused, naming the flag to pass. --protocol self
    with only --train-embeddings queries that file against itself.
    """
    if args.test_embeddings is not None:
        if args.protocol == "split" and args.train_embeddings is None:
            args.train_embeddings = args.test_embeddings.parent / TRAIN_NAME
            why = unpaired(args.test_embeddings, args.train_embeddings)
            if why is not None:
                raise UserError(f"{args.train_embeddings} (the default --train-embeddings, beside "
                                f"{args.test_embeddings}) {why}: pass --train-embeddings FILE, the train split's "
                                f"embeddings from the same model, or --protocol self to evaluate "
                                f"{args.test_embeddings} by itself")
        return
    if args.protocol == "self" and args.train_embeddings is not None:  # the one file named is the one queried
        args.test_embeddings = args.train_embeddings
        return
    train = args.train_embeddings if args.train_embeddings is not None else Path(TRAIN_NAME)
    test = train.parent / TEST_NAME
    if args.train_embeddings is None and not train.exists():
        if args.protocol == "self" and test.is_file():  # one file, queried against itself: no pair to check
            args.test_embeddings = test
            return
        raise UserError(f"no {TRAIN_NAME} here (the default --train-embeddings): pass --train-embeddings FILE "
                        f"(gen_embeddings.py writes {TRAIN_NAME} and {TEST_NAME})")
    file_io.check_input_file(train, "embedding file", allow_empty=False)
    why = unpaired(train, test)
    if why is None:
        args.train_embeddings, args.test_embeddings = train, test
        return
    if args.protocol == "self" or image_data.has_val_split(_images_root(train)) is False:
        print(f"no test split for {train} ({test} {why}): evaluating {train} leave-one-out, each image querying "
              f"the others (--protocol self)", file=sys.stderr)
        args.protocol, args.train_embeddings, args.test_embeddings = "self", train, train
        return
    raise UserError(f"{test} (the default --test-embeddings, beside {train}) {why}: pass --test-embeddings FILE, "
                    f"the val split's embeddings from the same model, or --protocol self to evaluate {train} "
                    f"leave-one-out")


def _images_root(path: Path) -> str | None:
    """The class folder an embedding file's record says it lists (None: no record)."""
    record, _ = embedding_io.read_record(path)
    return ((record or {}).get("images") or {}).get("root")


def unpaired(named: Path, default: Path) -> str | None:
    """Why ``default`` (a file nobody named) is not the pair of ``named``: it is missing, or its record
    names another model, or images of another dataset (the split folders are not siblings); None
    when nothing says so (files without records pair as before, with eval's warning)."""
    if not default.is_file():
        return "does not exist"
    records = [embedding_io.read_record(p)[0] or {} for p in (named, default)]
    models = [r.get("model") for r in records]
    if all(models) and models[0]["id"] != models[1]["id"]:
        return (f"comes from {embedding_io.describe_model(models[1])}, not {named}'s "
                f"{embedding_io.describe_model(models[0])}")
    roots = [(r.get("images") or {}).get("root") for r in records]
    if all(roots) and Path(roots[0]).parent != Path(roots[1]).parent:
        return f"lists images of another dataset ({roots[1]}, not beside {named}'s {roots[0]})"
    return None


def check_compatible(train: database.Database, test: database.Database, train_name: str,
                     test_name: str, allow_same: bool) -> None:
    """Refuse files of different models (both named) and, unless ``allow_same``, the same images twice."""
    embedding_io.check_same_model(train_name, train.model, test_name, test.model,
                                  notes=(train.record_note, test.record_note))
    train_paths, test_paths = set(train.paths), set(test.paths)
    if train_paths == test_paths:
        same = "the same file" if Path(train_name).resolve() == Path(test_name).resolve() else "the same images"
        message = (f"{train_name} and {test_name} hold {same} ({len(train)} rows): every query finds itself "
                   f"(recall@1 = 1)")
        if not allow_same:
            raise UserError(f"{message}; pass the val split as --test-embeddings, or --allow-same-files")
        cli.warn(message)
        return
    shared = train_paths & test_paths
    if shared:  # a query that is also in the database finds itself at distance 0: inflated scores
        message = (f"{len(shared)} of the {len(test)} test images are also in {train_name} "
                   f"(e.g. {min(shared)}): each of them finds itself")
        if not allow_same:
            raise UserError(f"{message}; use disjoint splits, or --allow-same-files")
        cli.warn(message)


def triplet_accuracy(csv: Path, train: database.Database, test: database.Database) -> float:
    """Fraction of the CSV's triplets with D(q,p) < D(q,n), using the stored embeddings (a path in
    both databases: the test file's row)."""
    lookup = {p: (train, i) for i, p in enumerate(train.paths)}
    lookup.update({p: (test, i) for i, p in enumerate(test.paths)})
    cols = image_data.read_triplet_csv(csv)
    vecs = []
    for col in cols:
        missing = [p for p in col if p not in lookup]
        if missing:
            raise UserError(f"{len(set(missing))} image(s) of {csv} are in neither embedding file, "
                            f"e.g. {missing[0]}")
        vec = np.empty((len(col), train.dim), dtype=np.float32)
        for db in (train, test):  # the rows of each database read at once, not the database
            at = [j for j, p in enumerate(col) if lookup[p][0] is db]
            if at:
                vec[at] = db[np.array([lookup[col[j]][1] for j in at], dtype=np.int64)]
        vecs.append(vec)
    return retrieval.triplet_accuracy(*vecs)


def pick_queries(args, test: database.Database) -> list[int]:
    if args.queries:
        index = {p: i for i, p in enumerate(test.paths)}
        chosen = []
        for q in args.queries:
            if q.isascii() and q.isdigit():  # str.isdigit alone takes '²' for a digit
                if int(q) >= len(test):
                    raise UserError(f"--queries index {q} is out of range (the test file has {len(test)} rows)")
                chosen.append(int(q))
            else:
                # files hold normalised absolute paths, links kept: try that spelling, then the resolved one
                spellings = (os.path.normpath(os.path.abspath(q)), str(Path(q).resolve()))
                found = next((index[p] for p in spellings if p in index), None)
                if found is None:
                    raise UserError(f"--queries image is not in {args.test_embeddings}: {q}")
                chosen.append(found)
        return chosen
    n = min(args.num_demo_queries, len(test))
    return sorted(np.random.default_rng(args.seed).choice(len(test), size=n, replace=False).tolist())


def draw_query(path: Path, qi: int, train, test, index: database.StreamingIndex, names: dict | None = None,
               exclude_self: bool = False) -> None:
    """Query, its 10 closest and 10 farthest database images with distances.

    names: class id -> human name (captions); exclude_self: the database is the query file
    (--protocol self), so the query's own row is never shown as a neighbour.
    """
    names = names or {}
    n = min(PICTURE_NEIGHBOURS, len(train) - (1 if exclude_self else 0))
    q = test[qi:qi + 1]
    rows = np.array([qi]) if exclude_self else None
    near_d, near_i = index.search(q, n, exclude_rows=rows)
    far_d, far_i = index.search(q, n, exclude_rows=rows, largest=True)
    qlab = str(test.labels[qi])

    def cells(dists, idxs):
        return [(train.paths[j], f"d={d:.3f}\n{image_data.display_name(train.labels[j], names)}",
                 plots.GREEN if str(train.labels[j]) == qlab else plots.RED) for d, j in zip(dists, idxs)]

    plots.image_grid(path, [[(test.paths[qi], f"query\n{image_data.display_name(qlab, names)}", None)],
                            cells(near_d[0], near_i[0]), cells(far_d[0], far_i[0])],
                     row_titles=["query", f"{n} closest (green: same class)", f"{n} farthest"],
                     title=f"{Path(test.paths[qi]).name}")


TABLES = ("per_class_precision.csv", "precision_at_k.png", "precision_at_k.csv", "report.html")  # beside metrics.json


def retrieval_pictures(out: Path) -> dict[int, Path]:
    """{n: retrieval_<n>.png} in ``out``: the pictures this tool writes (each with its .csv table)."""
    found = {}
    for p in out.glob("retrieval_*.png"):
        number = p.stem.split("_", 1)[1]
        if number.isascii() and number.isdigit():
            found[int(number)] = p
    return found


def check_old_outputs(out: Path, force: bool) -> None:
    """Refuse an output folder holding files of this tool's names but no metrics.json (an interrupted
    or hand-cleaned run, or someone else's files), unless --force: they would be replaced or mixed."""
    old = [p for _, p in sorted(retrieval_pictures(out).items())]
    old += [out / name for name in TABLES if (out / name).exists()]
    if old and not force and not (out / "metrics.json").exists():
        more = f" and {len(old) - 1} more" if len(old) > 1 else ""
        raise UserError(f"{out} holds outputs of an earlier evaluation ({old[0].name}{more}) but no metrics.json; "
                        f"pass --force to replace them, or choose another --output-dir")


def class_names(args, train: database.Database, test: database.Database) -> tuple[dict, Path | None]:
    """(class id -> human name, the words.txt read): --words, else a words.txt above the images, else none."""
    wanted = set(map(str, train.labels)) | set(map(str, test.labels))
    names, path = dataset_file(args.words, image_data.WORDS_FILE, "--words", "class names", train, test,
                               lambda p: image_data.read_class_names(p, wanted))
    return names or {}, path


def class_hierarchy(args, train: embedding_io.Embeddings, test: embedding_io.Embeddings) -> tuple[dict | None,
                                                                                                   Path | None]:
    """(class -> parent, the file read): --hierarchy, else a hierarchy.csv above the images, else none."""
    labels = set(map(str, train.labels)) | set(map(str, test.labels))

    def read(path: Path) -> dict:
        parents = image_data.read_class_hierarchy(path)
        missing = sorted(labels - set(parents))
        if missing:
            raise UserError(f"{path} gives no parent for {len(missing)} class(es) of the embeddings, "
                            f"e.g. {missing[0]!r}")
        return parents

    parents, path = dataset_file(args.hierarchy, image_data.HIERARCHY_FILE, "--hierarchy", "class hierarchy",
                                 train, test, read)
    if parents is not None and args.hierarchy is None:
        print(f"class hierarchy: {path} (found above the images): parent-level precision@{args.k} and "
              f"NDCG@{args.k} too")
    return parents, path


def dataset_file(named: Path | None, file_name: str, flag: str, what: str, train, test, read):
    """(read(file), file) of a dataset-wide file: the one ``named`` on the command line (its errors stop
    eval.py), else one called ``file_name`` above the images (its errors are a warning: it is optional
    and may be there by chance), else (None, None)."""
    if named is not None:
        return read(named), named
    path = image_data.find_dataset_file(test.paths, file_name) or image_data.find_dataset_file(train.paths, file_name)
    if path is None:
        return None, None
    try:
        return read(path), path
    except UserError as exc:
        cli.warn(f"{what} not used: {exc} (found above the images; give {flag} FILE to name another)")
        return None, None


def _shown_classes(classes: list[str], names: dict, limit: int = 10) -> str:
    shown = ", ".join(image_data.display_name(c, names) for c in classes[:limit])
    return shown + (f" and {len(classes) - limit} more" if len(classes) > limit else "")


def warn_degenerate(args, train, test, lone: list[str], names: dict, budget: database.Budget) -> None:
    """Warnings for results that mean less than they seem: lone query classes, collapsed embeddings (a
    sample of at most 2,000 rows, fewer where their float64 copy would not fit the query share of ``budget``)."""
    if lone:
        if args.protocol == "self":
            why = f"have a single image in {args.test_embeddings}: no other image of their class to find"
        else:
            why = f"have no image in the database {args.train_embeddings}"
        cli.warn(f"{len(lone)} query class(es) {why}, so their precision is 0 by construction (they are left "
                 f"out of recall@1, R-precision and MAP@R): {_shown_classes(lone, names)}")
    db_classes = np.unique(train.labels.astype(str))
    if len(db_classes) == 1:
        cli.warn(f"the database {args.test_embeddings if train is test else args.train_embeddings} holds one class "
                 f"only ({_shown_classes(list(db_classes), names)}): every neighbour has that label, so precision "
                 f"and recall measure nothing about the ranking")
    files = [(args.test_embeddings, test)] if train is test else [(args.train_embeddings, train),
                                                                  (args.test_embeddings, test)]
    for path, emb in files:
        sample = min(2000, max(2, budget.query_rows(emb.dim) // 2))
        spread = retrieval.mean_pairwise_distance(emb, max_rows=sample, seed=args.seed)  # a seeded sample
        if len(emb) > 1 and spread < COLLAPSE_DISTANCE:
            cli.warn(f"the embeddings have collapsed to a point: mean pairwise distance {spread:.2e} between the "
                     f"rows of {path} (a diverged or untrained model?); every ranking below is arbitrary")


def _fmt(value) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def report(args, train, test, queries: list[int], device) -> dict:
    """Score, write metrics.json, per_class_precision.csv and the pictures, print the summary."""
    out = args.output_dir
    metrics_path = out / "metrics.json"
    self_search = args.protocol == "self"
    progress = not args.no_progress
    names, words = class_names(args, train, test)
    parents, hierarchy = class_hierarchy(args, train, test)
    budget = database.memory_budget(args.memory_budget)
    index = database.StreamingIndex(train, budget, device)  # for every search below; blocks within the budget
    result = scoring.evaluate(train, train.labels, test, test.labels, args.k, index, protocol=args.protocol,
                              max_train_queries=args.max_train_queries, seed=args.seed, chunk_size=args.chunk_size,
                              progress=progress, parents=parents, **budget.scoring_blocks(train.dim))
    metrics, table, lone = result.metrics, result.table, result.lone
    warn_degenerate(args, train, test, lone, names, budget)
    metrics["triplet_accuracy"] = triplet_accuracy(args.triplets, train, test) if args.triplets else None
    metrics.update({"train_embeddings": None if self_search else str(args.train_embeddings),
                    "test_embeddings": str(args.test_embeddings),
                    "triplets": str(args.triplets) if args.triplets else None,
                    "class_names": str(words) if words else None})
    if hierarchy is not None:
        metrics["hierarchy"] = str(hierarchy)
    table.insert(1, "name", [image_data.display_name(c, names) for c in table["class"]])

    with file_io.staged_outputs(out, last=metrics_path.name) as stage:  # the set is written all or none
        with file_io.atomic_path(stage / "per_class_precision.csv") as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
        curve = metrics["precision_at_k_curve"]
        curves = {"queries vs the rest of the file (self excluded)" if self_search else "test (val queries)":
                  curve["test"]}
        if "train" in curve:
            curves["train (self excluded)"] = curve["train"]
        plots.precision_at_k(stage / "precision_at_k.png", curve["k"], curves)  # + precision_at_k.csv
        for n, qi in enumerate(queries):
            draw_query(stage / f"retrieval_{n}.png", qi, train, test, index, names, exclude_self=self_search)
        write_report(stage / "report.html", result, train, test, index, names, sys.argv, args.chunk_size, progress)
        file_io.atomic_write_text(stage / metrics_path.name, json.dumps(metrics, indent=2) + "\n")
    for n, p in retrieval_pictures(out).items():
        if n >= len(queries):  # an earlier run's extra pictures and their tables (--force): not this run's
            p.unlink()
            plots.data_path(p).unlink(missing_ok=True)

    print_summary(args, metrics, table, train, test)
    print(f"wrote {metrics_path}, {out / 'per_class_precision.csv'}, precision_at_k.png, report.html and "
          f"{len(queries)} retrieval picture(s) in {out}")
    return metrics


def print_summary(args, metrics: dict, table, train, test) -> None:
    """The figures on stdout. Where classes have fewer than k other images, precision@k cannot reach 1:
    its ceiling (mean min(k, R) / k) is printed beside it and R-precision, which has none, comes first."""
    k, self_search = args.k, args.protocol == "self"
    capped = metrics["test_precision_at_k_max"] < 1
    ranks = (f"recall@1: {_fmt(metrics['recall_at_1'])}   R-precision: {_fmt(metrics['r_precision'])}   "
             f"MAP@R: {_fmt(metrics['map_at_r'])}")
    if capped:
        print(ranks)
    se = _fmt(metrics["test_precision_at_k_se"])  # standard error over the queries
    ceiling = ""
    if capped:
        small = len(metrics["classes_below_k"])
        classes = f"{small} classes have" if small > 1 else "1 class has"
        ceiling = (f" (max achievable {metrics['test_precision_at_k_max']:.2f}: {classes} fewer than {k} "
                   f"{'other images' if self_search else 'images in the database'})")
    if self_search:
        print(f"precision@{k} (leave-one-out): {metrics['test_precision_at_k']:.4f} ± {se}{ceiling}  ({len(test)} "
              f"queries, each against the other {len(test) - 1} of {args.test_embeddings})")
    else:
        print(f"test precision@{k}:  {metrics['test_precision_at_k']:.4f} ± {se}{ceiling}  ({len(test)} val queries, "
              f"{len(train)} db)")
    if metrics["train_precision_at_k"] is not None:
        train_max = metrics["train_precision_at_k_max"]
        print(f"train precision@{k}: {metrics['train_precision_at_k']:.4f}"
              f"{f' (max achievable {train_max:.2f})' if train_max < 1 else ''}  "
              f"({metrics['num_train_queries']} train queries, self excluded)")
    print(f"hit@{k} (classic 'accuracy'): {metrics['hit_at_k']:.4f}")
    if not capped:
        print(ranks)
    if "ndcg_at_k" in metrics:
        print(f"parent-level precision@{k}: {metrics['parent_precision_at_k']:.4f}   "
              f"NDCG@{k}: {_fmt(metrics['ndcg_at_k'])}  (class hierarchy {metrics['hierarchy']})")
    if metrics["triplet_accuracy"] is not None:
        print(f"triplet accuracy ({args.triplets}): {metrics['triplet_accuracy']:.4f}")
    best, worst = scoring.best_and_worst(table, SHOWN_CLASSES)

    def listed(rows) -> str:
        return ", ".join(f"{r['name']} {r['precision_at_k']:.2f}" for _, r in rows.iterrows())
    if len(worst):
        print(f"best classes:  {listed(best)}\nworst classes: {listed(worst)}")
    else:  # too few classes for two lists that do not share one
        print(f"classes, best first: {listed(best)}")


def main(args) -> None:
    out = args.output_dir
    metrics_path = out / "metrics.json"
    file_io.check_output_path(metrics_path, args.force, "metrics file")  # also proves it writable, at once
    check_old_outputs(out, args.force)
    default_inputs(args)
    device = runtime.pick_device(args.device)
    test = database.open(args.test_embeddings, progress=not args.no_progress)  # a file or a folder of shards
    # --protocol self: the test file is its own database (leave-one-out); --train-embeddings is not read.
    train = test if args.protocol == "self" else database.open(args.train_embeddings, progress=not args.no_progress)
    if len(train) == 0 or len(test) == 0:
        raise UserError("an embedding file has no rows")
    if args.protocol != "self":  # self: one file, its own database by design
        check_compatible(train, test, str(args.train_embeddings), str(args.test_embeddings), args.allow_same_files)
    if train.dim != test.dim:
        raise UserError(f"dimension mismatch: {args.train_embeddings} has {train.dim}, "
                        f"{args.test_embeddings} has {test.dim}")
    scoring.check_k(args.k, len(train), args.protocol == "self")
    if args.triplets is not None:
        file_io.check_input_file(args.triplets, "triplet CSV")
    queries = pick_queries(args, test)

    report(args, train, test, queries, device)


if __name__ == "__main__":
    cli.run(main, get_args_parser())
