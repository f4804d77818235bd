"""Top-k precision of an embedding database, plus retrieval pictures.

    python eval.py --train-embeddings train_embedding.txt --test-embeddings test_embedding.txt

Test precision@k: each val (test-file) image queries the train database; the
fraction of its k nearest train images (Euclidean) sharing its class, averaged.
Train precision@k: train images query the train database, excluding themselves.
Also hit@k (at least one match in k: what the classic code called "accuracy"),
recall@1, MAP@R and, with --triplets, the fraction of triplets ranked correctly.
Writes metrics.json, per_class_precision.csv, precision_at_k.png and
retrieval_<i>.png (query, 10 closest and 10 farthest) into --output-dir.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from deepranking import cli, runtime
from deepranking import embedding_io
from deepranking import image_data
from deepranking import plots
from deepranking import retrieval
from deepranking.cli import UserError

PICTURE_NEIGHBOURS = 10  # closest / farthest shown per demo query


def get_args_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--train-embeddings", type=Path, default=Path("train_embedding.txt"),
                   help="database embedding file (train split)")
    p.add_argument("--test-embeddings", type=Path, default=Path("test_embedding.txt"),
                   help="query embedding file (val split)")
    p.add_argument("--k", type=cli.positive_int, default=30, help="neighbours per query (top-k)")
    p.add_argument("--output-dir", type=Path, default=Path("eval_results"), help="where results go")
    p.add_argument("--queries", nargs="*", default=None,
                   help="test images to draw: row indices into the test file or image paths")
    p.add_argument("--num-demo-queries", type=cli.non_negative_int, default=5,
                   help="random test queries to draw when --queries is not given")
    p.add_argument("--triplets", type=Path, default=None, help="triplet CSV to score (fraction ranked correctly)")
    p.add_argument("--max-train-queries", type=cli.positive_int, default=10_000,
                   help="train precision uses a seeded subset of at most this many train queries")
    p.add_argument("--chunk-size", type=cli.positive_int, default=None,
                   help="queries per kNN matrix product (default: as many as keep the [chunk, N] "
                        "distance block within 256 MB)")
    p.add_argument("--seed", type=int, default=0, help="seed for the train subset and demo queries")
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--force", action="store_true", help="overwrite an existing metrics.json")
    return p


def class_counts(labels: np.ndarray) -> dict:
    names, counts = np.unique(labels.astype(str), return_counts=True)
    return dict(zip(names, counts))


def evaluate(train: embedding_io.Embeddings, test: embedding_io.Embeddings, k: int, max_train_queries: int,
             seed: int, index: retrieval.ExactIndex, chunk_size: int | None = None
             ) -> tuple[dict, object, np.ndarray]:
    """All metrics; returns (metrics dict, per-class table, test neighbour indices [Q, k]).

    index: an ExactIndex over ``train.emb``, the database of every search here.
    """
    n_db = len(train)
    counts = class_counts(train.labels)
    # MAP@R needs R neighbours, R = the query's class size in the database (capped for memory).
    r_test = np.array([counts.get(str(lab), 0) for lab in test.labels])
    depth = int(min(n_db, max(k, r_test.max(initial=0), 1)))
    if k > n_db:
        raise UserError(f"--k {k} is larger than the database ({n_db} images)")
    _, idx = index.search(test.emb, depth, chunk_size=chunk_size)
    nb_labels = train.labels.astype(str)[idx]  # [Q, depth]
    q_labels = test.labels.astype(str)
    ks = list(range(1, k + 1))
    metrics = {
        "k": k,
        "test_precision_at_k": retrieval.precision_at_k(q_labels, nb_labels, k),
        "hit_at_k": retrieval.hit_at_k(q_labels, nb_labels, k),
        "recall_at_1": retrieval.recall_at_1(q_labels, nb_labels),
        "map_at_r": retrieval.map_at_r(q_labels, nb_labels, np.minimum(r_test, depth)),
        "precision_at_k_curve": {"k": ks, "test": retrieval.precision_at_k_curve(q_labels, nb_labels, ks)},
        "num_test_queries": len(test),
        "num_database": n_db,
    }
    table = retrieval.per_class_precision(q_labels, nb_labels, k)

    # Train precision: train images against the train database, the query itself excluded.
    if n_db - 1 >= k:
        rng = np.random.default_rng(seed)
        sub = np.sort(rng.choice(n_db, size=min(n_db, max_train_queries), replace=False))
        # The query itself never counts: its own row is excluded inside the search.
        _, tidx = index.search(train.emb[sub], k, exclude_rows=sub, chunk_size=chunk_size)
        t_labels = train.labels.astype(str)
        metrics["train_precision_at_k"] = retrieval.precision_at_k(t_labels[sub], t_labels[tidx], k)
        metrics["precision_at_k_curve"]["train"] = retrieval.precision_at_k_curve(t_labels[sub], t_labels[tidx], ks)
        metrics["num_train_queries"] = int(len(sub))
    else:
        metrics["train_precision_at_k"] = None
        metrics["num_train_queries"] = 0
    return metrics, table, idx[:, :k]


def triplet_accuracy(csv: Path, train: embedding_io.Embeddings, test: embedding_io.Embeddings) -> float:
    """Fraction of the CSV's triplets with D(q,p) < D(q,n), using the stored embeddings."""
    lookup = {p: e for p, e in zip(train.paths, train.emb)}
    lookup.update({p: e for p, e in zip(test.paths, test.emb)})
    cols = image_data.read_triplet_csv(csv)
    vecs = []
    for col in cols:
        missing = [p for p in col if p not in lookup]
        if missing:
            raise UserError(f"{len(set(missing))} image(s) of {csv} are in neither embedding file, "
                            f"e.g. {missing[0]}")
        vecs.append(np.stack([lookup[p] for p in col]))
    return retrieval.triplet_accuracy(*vecs)


def pick_queries(args, test: embedding_io.Embeddings) -> list[int]:
    if args.queries:
        index = {p: i for i, p in enumerate(test.paths)}
        chosen = []
        for q in args.queries:
            if q.isdigit():
                if int(q) >= len(test):
                    raise UserError(f"--queries index {q} is out of range (the test file has {len(test)} rows)")
                chosen.append(int(q))
            else:
                path = str(Path(q).resolve())
                if path not in index:
                    raise UserError(f"--queries image is not in {args.test_embeddings}: {q}")
                chosen.append(index[path])
        return chosen
    n = min(args.num_demo_queries, len(test))
    return sorted(np.random.default_rng(args.seed).choice(len(test), size=n, replace=False).tolist())


def draw_query(path: Path, qi: int, train, test, index: retrieval.ExactIndex) -> None:
    """Query, its 10 closest and 10 farthest database images with distances."""
    n = min(PICTURE_NEIGHBOURS, len(train))
    q = test.emb[qi:qi + 1]
    near_d, near_i = index.search(q, n)
    far_d, far_i = index.search(q, n, largest=True)
    qlab = str(test.labels[qi])

    def cells(dists, idxs):
        return [(train.paths[j], f"d={d:.3f}\n{train.labels[j]}",
                 plots.GREEN if str(train.labels[j]) == qlab else plots.RED) for d, j in zip(dists, idxs)]

    plots.image_grid(path, [[(test.paths[qi], f"query\n{qlab}", None)], cells(near_d[0], near_i[0]),
                            cells(far_d[0], far_i[0])],
                     row_titles=["query", f"{n} closest (green: same class)", f"{n} farthest"],
                     title=f"{Path(test.paths[qi]).name}")


def main(args) -> None:
    out = args.output_dir
    metrics_path = out / "metrics.json"
    cli.check_output_path(metrics_path, args.force, "metrics file")
    device = runtime.pick_device(args.device)
    train = embedding_io.read_embeddings(args.train_embeddings)
    test = embedding_io.read_embeddings(args.test_embeddings)
    if len(train) == 0 or len(test) == 0:
        raise UserError("an embedding file has no rows")
    if train.dim != test.dim:
        raise UserError(f"dimension mismatch: {args.train_embeddings} has {train.dim}, "
                        f"{args.test_embeddings} has {test.dim}")
    if args.k > len(train):
        raise UserError(f"--k {args.k} is larger than the database ({len(train)} images)")
    if args.triplets is not None:
        cli.check_input_file(args.triplets, "triplet CSV")
    queries = pick_queries(args, test)

    index = retrieval.ExactIndex(train.emb, device)  # loaded once for every search below
    metrics, table, _ = evaluate(train, test, args.k, args.max_train_queries, args.seed, index, args.chunk_size)
    metrics["triplet_accuracy"] = triplet_accuracy(args.triplets, train, test) if args.triplets else None
    metrics.update({"train_embeddings": str(args.train_embeddings), "test_embeddings": str(args.test_embeddings),
                    "triplets": str(args.triplets) if args.triplets else None})

    out.mkdir(parents=True, exist_ok=True)
    with cli.atomic_path(out / "per_class_precision.csv") as tmp:
        table.to_csv(tmp, index=False, float_format="%.6f")
    curve = metrics["precision_at_k_curve"]
    curves = {"test (val queries)": curve["test"]}
    if "train" in curve:
        curves["train (self excluded)"] = curve["train"]
    plots.precision_at_k(out / "precision_at_k.png", curve["k"], curves)  # + precision_at_k.csv
    for n, qi in enumerate(queries):
        draw_query(out / f"retrieval_{n}.png", qi, train, test, index)
    cli.atomic_write_text(metrics_path, json.dumps(metrics, indent=2) + "\n")

    k = args.k
    print(f"test precision@{k}:  {metrics['test_precision_at_k']:.4f}  ({len(test)} val queries, {len(train)} db)")
    if metrics["train_precision_at_k"] is not None:
        print(f"train precision@{k}: {metrics['train_precision_at_k']:.4f}  "
              f"({metrics['num_train_queries']} train queries, self excluded)")
    print(f"hit@{k} (classic 'accuracy'): {metrics['hit_at_k']:.4f}")
    print(f"recall@1: {metrics['recall_at_1']:.4f}   MAP@R: {metrics['map_at_r']:.4f}")
    if metrics["triplet_accuracy"] is not None:
        print(f"triplet accuracy ({args.triplets}): {metrics['triplet_accuracy']:.4f}")
    best = ", ".join(f"{r['class']} {r['precision_at_k']:.2f}" for _, r in table.head(5).iterrows())
    worst = ", ".join(f"{r['class']} {r['precision_at_k']:.2f}" for _, r in table.tail(5).iloc[::-1].iterrows())
    print(f"best classes:  {best}\nworst classes: {worst}")
    print(f"wrote {metrics_path}, {out / 'per_class_precision.csv'}, precision_at_k.png and "
          f"{len(queries)} retrieval picture(s) in {out}")


if __name__ == "__main__":
    cli.run(main, get_args_parser())
