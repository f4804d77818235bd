"""The evaluation report: one self-contained HTML page, ``report.html``, beside eval.py's other outputs.

The page works opened from disk, with no server and no network: inline CSS, a few lines of
inline JavaScript (the per-class table sorts on a click on its header), the precision@k curve
as inline SVG drawn from the numbers, thumbnails as JPEG ``data:`` URIs. It shows:

* every figure of metrics.json, each with a one-line definition;
* the precision@k curve;
* the per-class table;
* the most confused class pairs: over every query's top k, the (query class, neighbour
  class) pairs of the wrong-class neighbours, counted;
* the worst and the best queries (by precision@k, then average precision) with their nearest
  database images, green-bordered when of the query's class and red otherwise;
* where the run came from: the model fingerprint, checkpoint, step and epoch, the embedding
  files and their rows, the class-names file, the command line and the date.

The page's size does not grow with the number of queries: it shows ``SHOWN_QUERIES`` worst and
as many best queries with ``SHOWN_NEIGHBOURS`` neighbours each, ``THUMB`` px thumbnails (each
image decoded once, by :func:`preprocessing.load_rgb`; an unreadable or missing one shows as a
grey placeholder), and says how many of how many queries it shows.

:func:`write_report` gathers what the page needs (one more top-k search of the queries, in
blocks, for the confused pairs; the thumbnails) and writes it atomically; :func:`build_html`
turns that into the page and does nothing else.
"""

from __future__ import annotations

import base64
import html
import io
import math
import os
import shlex
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Mapping, Sequence

import numpy as np

from deepranking import cli, file_io, scoring
from deepranking.image_data import display_name, display_path
from deepranking.plots import GREEN, PALETTE, RED

SHOWN_QUERIES = 12  # worst queries shown, and as many best ones
SHOWN_NEIGHBOURS = 8  # nearest database images shown per query
THUMB = 48  # thumbnail side, px (JPEG, about 1-3 kB each)
THUMB_QUALITY = 85
TOP_PAIRS = 15  # confused class pairs listed

# One line per figure of metrics.json: (label, definition); "{k}" is the run's k. A figure missing
# here is still shown, with its key as its label.
DEFINITIONS = {
    "protocol": ("protocol", "split: the test file queries the train database; self: the test file queries "
                             "itself, each query's own row excluded (leave-one-out)"),
    "k": ("k", "neighbours per query (the top k)"),
    "test_precision_at_k": ("precision@{k}", "the fraction of a query's {k} nearest database images that share "
                                             "its class, averaged over all queries"),
    "test_precision_at_k_se": ("± (standard error)", "how far another draw of as many queries would move "
                                                     "precision@{k}, about"),
    "hit_at_k": ("hit@{k}", "the fraction of queries with at least one image of their class among their {k} "
                            "nearest (the classic 'accuracy')"),
    "recall_at_1": ("Recall@1", "the fraction of queries whose nearest database image shares their class "
                                "(queries with R ≥ 1)"),
    "r_precision": ("R-precision", "precision over a query's R nearest, R = the other database images of its "
                                   "class; averaged over queries with R ≥ 1"),
    "map_at_r": ("MAP@R", "mean average precision over the R nearest (Musgrave et al. 2020): same-class images "
                          "count more the earlier they come; queries with R ≥ 1"),
    "train_precision_at_k": ("train precision@{k}", "precision@{k} of train images querying the train database, "
                                                    "each itself excluded; far above the test figure: overfitting"),
    "triplet_accuracy": ("triplet accuracy", "the fraction of the triplets whose positive is closer to the query "
                                             "than the negative"),
    "num_test_queries": ("queries", "query images scored"),
    "num_database": ("database", "database images searched"),
    "num_lone_queries": ("lone queries", "queries with no other image of their class in the database: precision 0 "
                                         "by construction, left out of Recall@1, R-precision and MAP@R"),
    "lone_classes": ("lone classes", "the classes of those queries"),
    "num_train_queries": ("train queries", "train images (a seeded subset) that queried the train database"),
    "train_embeddings": ("train embeddings", "the database file"),
    "test_embeddings": ("test embeddings", "the query file"),
    "triplets": ("triplets", "the triplet CSV scored"),
    "class_names": ("class names", "the words.txt that names the classes"),
    "precision_at_k_curve": ("precision@k curve", "precision@1 … precision@{k}, averaged over the queries"),
    "test_precision_at_k_max": ("max precision@{k}", "the highest precision@{k} these classes allow: the mean of "
                                                     "min({k}, R) / {k}, below 1 where classes are smaller than {k}"),
    "train_precision_at_k_max": ("max train precision@{k}", "the same ceiling for the train queries"),
    "classes_below_k": ("classes below k", "the classes with fewer than {k} other database images"),
    "parent_precision_at_k": ("parent precision@{k}", "the fraction of a query's {k} nearest under its class's "
                                                      "parent in the class hierarchy (any sibling class counts)"),
    "ndcg_at_k": ("NDCG@{k}", "graded relevance of the {k} nearest: same class 2, same parent 1, other 0, "
                              "discounted by log2(rank + 1), over the best order the database allows"),
    "hierarchy": ("class hierarchy", "the class,parent file behind the parent-level figures"),
}
HEADLINE = ("test_precision_at_k", "hit_at_k", "recall_at_1", "r_precision", "map_at_r", "train_precision_at_k",
            "parent_precision_at_k", "ndcg_at_k")


@dataclass
class QueryView:
    """One shown query: its thumbnail, caption and neighbours ((thumbnail or None, tooltip, same class))."""

    uri: str | None
    title: str
    caption: str
    neighbours: list[tuple[str | None, str, bool]]


@dataclass
class Page:
    """Everything the page shows, computed (see :func:`write_report`); :func:`build_html` only lays it out."""

    metrics: dict
    table: object  # pandas DataFrame: one row per query class
    pairs: list[tuple[str, str, int, float]]  # (query class, neighbour class, count, share of the class's slots)
    worst: list[QueryView]
    best: list[QueryView]
    num_queries: int
    provenance: list[tuple[str, str]]
    notes: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------- what the page shows

def wrong_pairs(q_codes: np.ndarray, nb_codes: np.ndarray) -> Counter:
    """Counter {(query class code, neighbour class code): count} of the wrong-class entries of
    ``nb_codes`` [Q, k] (each query's neighbours' class codes) against ``q_codes`` [Q]."""
    q = np.broadcast_to(np.asarray(q_codes)[:, None], nb_codes.shape)
    wrong = q != nb_codes
    if not wrong.any():
        return Counter()
    pairs, counts = np.unique(np.stack([q[wrong], nb_codes[wrong]], axis=1), axis=0, return_counts=True)
    return Counter({(int(a), int(b)): int(c) for (a, b), c in zip(pairs, counts)})


def top_pairs(counts: Mapping[tuple[int, int], int], class_names: Sequence[str],
              top: int = TOP_PAIRS) -> list[tuple[str, str, int]]:
    """The ``top`` largest counts of :func:`wrong_pairs` as (query class, neighbour class, count),
    most first, equal counts by class names."""
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], str(class_names[kv[0][0]]), str(class_names[kv[0][1]])))
    return [(str(class_names[a]), str(class_names[b]), c) for (a, b), c in ranked[:top]]


def confused_pairs(query_labels, neighbour_labels, top: int = TOP_PAIRS) -> list[tuple[str, str, int]]:
    """The most confused class pairs: query_labels [Q], neighbour_labels [Q, k] (the classes of
    each query's k nearest) -> [(query class, neighbour class, times a neighbour of the first
    class's queries had the second class)], most first, at most ``top``."""
    neighbour_labels = np.asarray(neighbour_labels)
    names, nb, q = scoring.label_codes(neighbour_labels.ravel(), query_labels)
    return top_pairs(wrong_pairs(q, nb.reshape(neighbour_labels.shape)), names, top)


def pick_shown(precision: np.ndarray, average_precision: np.ndarray, n: int = SHOWN_QUERIES
               ) -> tuple[list[int], list[int]]:
    """(worst, best): at most ``n`` query rows each, no row in both, worst first and best first.

    Ranked by precision@k, then average precision (MAP@R's per-query value), then row. Lone
    queries (average precision NaN: no other image of their class, precision 0 by construction)
    are shown only when every query is lone: they would fill the worst list and teach nothing.
    """
    precision = np.asarray(precision, dtype=np.float64)
    ap = np.asarray(average_precision, dtype=np.float64)
    rows = np.arange(len(precision))
    scored = rows[~np.isnan(ap)]
    pool = scored if len(scored) else rows
    key_p, key_ap = precision[pool], np.nan_to_num(ap[pool], nan=0.0)
    worst = pool[np.lexsort((pool, key_ap, key_p))][:n].tolist()
    taken = set(worst)
    best = [r for r in pool[np.lexsort((pool, -key_ap, -key_p))].tolist() if r not in taken][:n]
    return worst, best


@dataclass
class Neighbours:
    """What :func:`search_neighbours` found: wrong-class pair counts over every query, and the
    nearest rows (dist, database row) of the queries asked for."""

    pairs: Counter
    rows: dict[int, tuple[np.ndarray, np.ndarray]]


def search_neighbours(index, queries, q_codes: np.ndarray, db_codes: np.ndarray, k: int,
                      keep: Sequence[int], self_search: bool, keep_depth: int = SHOWN_NEIGHBOURS,
                      chunk_size: int | None = None, progress: bool = True) -> Neighbours:
    """Each query's k nearest in ``index`` (its own row excluded with ``self_search``), searched
    ``scoring.NEIGHBOUR_BUDGET // k`` queries at a time: the wrong-class pairs counted, and the
    first ``keep_depth`` neighbours of the rows in ``keep`` kept."""
    n = len(queries)
    block = max(1, scoring.NEIGHBOUR_BUDGET // k)
    keep = np.asarray(sorted(set(keep)), dtype=np.int64)
    found = Neighbours(Counter(), {})
    with cli.progress(total=n, desc="report: confused pairs", unit="query", enabled=progress, leave=False) as bar:
        for s in range(0, n, block):
            e = min(n, s + block)
            exclude = np.arange(s, e) if self_search else None
            dist, idx = index.search(queries[s:e], k, exclude_rows=exclude, chunk_size=chunk_size)
            found.pairs.update(wrong_pairs(q_codes[s:e], db_codes[idx]))
            for r in keep[(keep >= s) & (keep < e)].tolist():
                found.rows[r] = (dist[r - s, :keep_depth], idx[r - s, :keep_depth])
            bar.update(e - s)
    return found


def thumbnail_uri(path: str, size: int = THUMB) -> str | None:
    """A ``data:image/jpeg;base64,...`` thumbnail (longest side ``size``) of the image at ``path``,
    decoded by preprocessing.load_rgb; None when it cannot be read (missing, not an image)."""
    from PIL import Image

    from deepranking.preprocessing import UnreadableImageError, load_rgb

    try:
        im = load_rgb(path)
    except UnreadableImageError:
        return None
    im.thumbnail((size, size), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=THUMB_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class Thumbnails:
    """:func:`thumbnail_uri` with each path decoded once (a query may be another's neighbour)."""

    def __init__(self, size: int = THUMB):
        self.size = size
        self._made: dict[str, str | None] = {}

    def __call__(self, path: str) -> str | None:
        if path not in self._made:
            self._made[path] = thumbnail_uri(path, self.size)
        return self._made[path]


def query_view(qi: int, found: tuple[np.ndarray, np.ndarray], train, test, per_query: dict, k: int,
               names: dict, thumbs: Thumbnails) -> QueryView:
    """The shown query ``qi`` of ``test``: its thumbnail, caption and its neighbours in ``train``."""
    qlab = str(test.labels[qi])
    ap = per_query["map_at_r"][qi]
    caption = (f"{display_name(qlab, names)} · P@{k} {per_query['precision'][qi]:.2f}"
               + ("" if math.isnan(ap) else f" · AP@R {ap:.2f}"))
    dist, idx = found
    cells = []
    for d, j in zip(dist.tolist(), idx.tolist()):
        lab = str(train.labels[j])
        tooltip = f"{display_name(lab, names)} · d={d:.3f}\n{display_path(train.paths[j])}"
        cells.append((thumbs(train.paths[j]), tooltip, lab == qlab))
    return QueryView(thumbs(test.paths[qi]), f"query: {display_name(qlab, names)}\n{display_path(test.paths[qi])}",
                     caption, cells)


def pair_rows(pairs: list[tuple[str, str, int]], table, k: int) -> list[tuple[str, str, int, float]]:
    """Each confused pair with its share of the query class's neighbour slots (its queries x k)."""
    queries = dict(zip(table["class"].astype(str), table["n_queries"].astype(int)))
    return [(a, b, c, c / max(1, queries.get(a, 0) * k)) for a, b, c in pairs]


def provenance(metrics: dict, train, test, command: Sequence[str], when: str) -> list[tuple[str, str]]:
    """(what, value) rows: the model that made the embeddings, the files read, the command, the date."""
    model = test.model or {}
    rows = [("model fingerprint", model.get("id") or f"unknown ({test.record_note or 'no provenance record'})")]
    for key in ("checkpoint", "step", "epoch"):
        if model.get(key) is not None:
            rows.append((key, display_path(str(model[key]))))
    pre = model.get("preprocessing") or {}
    if pre:
        rows.append(("preprocessing", ", ".join(f"{k} {v}" for k, v in pre.items())))
    rows.append(("queries", f"{metrics.get('test_embeddings')} ({len(test):,} rows)"))
    if train is not test:
        rows.append(("database", f"{metrics.get('train_embeddings')} ({len(train):,} rows)"))
    for key in ("triplets", "class_names"):
        rows.append((DEFINITIONS[key][0], str(metrics.get(key)) if metrics.get(key) else "none"))
    rows.append(("command", shlex.join(["python", *(display_path(a) for a in command)])))
    rows.append(("date", when))
    return rows


def write_report(path: str | os.PathLike, result: scoring.Evaluation, train, test, index, names: dict | None = None,
                 command: Sequence[str] = (), chunk_size: int | None = None, progress: bool = True, *,
                 when: str | None = None) -> Page:
    """Write the report of an evaluation to ``path`` (atomically) and return what it shows.

    result: scoring.evaluate's answer, with what eval.py adds to its metrics (the files read,
    triplet accuracy) and its table (a "name" column); train/test: the database and query
    embeddings (database.Database or embedding_io.Embeddings: rows by slices; the same object for
    protocol "self"), whose rows ``index`` searches (``chunk_size`` queries per matrix product); names: class id ->
    human name; command: the program's argv; when: the date shown (default: now).
    """
    names = names or {}
    k = int(result.metrics["k"])
    self_search = result.metrics["protocol"] == "self"
    class_names, db_codes, q_codes = scoring.label_codes(train.labels, test.labels)
    worst, best = pick_shown(result.per_query["precision"], result.per_query["map_at_r"])
    found = search_neighbours(index, test, q_codes, db_codes, k, worst + best, self_search,
                              chunk_size=chunk_size, progress=progress)
    pairs = [(display_name(a, names), display_name(b, names), c, share) for a, b, c, share
             in pair_rows(top_pairs(found.pairs, class_names), result.table, k)]
    thumbs = Thumbnails()
    views = [[query_view(qi, found.rows[qi], train, test, result.per_query, k, names, thumbs) for qi in rows]
             for rows in (worst, best)]
    notes = []
    lone = int(np.isnan(result.per_query["map_at_r"]).sum())
    if 0 < lone < len(test):
        notes.append(f"{lone:,} lone queries (no other image of their class in the database) are not among them")
    page = Page(result.metrics, result.table, pairs, views[0], views[1], len(test),
                provenance(result.metrics, train, test, command,
                           when or datetime.now().astimezone().isoformat(timespec="seconds")), notes)
    file_io.atomic_write_text(path, build_html(page))
    return page


# --------------------------------------------------------------------------- the page

def _e(value) -> str:
    """HTML-escaped text (lone surrogates of undecodable file names as escapes)."""
    return html.escape(str(value).encode("utf-8", "backslashreplace").decode("utf-8"))


def _num(value) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
        return str(value)
    if isinstance(value, (int, np.integer)):
        return f"{int(value):,}"
    return "n/a" if math.isnan(value) else f"{value:.4f}"


def _label(key: str, k: int) -> tuple[str, str]:
    label, definition = DEFINITIONS.get(key, (key, ""))
    return label.format(k=k), definition.format(k=k)


def metric_cards(metrics: dict) -> str:
    """The headline figures as large numbers (precision@k with its standard error)."""
    k = metrics.get("k")
    cards = []
    for key in HEADLINE:
        if key not in metrics:
            continue
        label, definition = _label(key, k)
        value = _num(metrics[key])
        if key == "test_precision_at_k" and metrics.get("test_precision_at_k_se") is not None:
            value += f"<small> ± {_num(metrics['test_precision_at_k_se'])}</small>"
        cards.append(f'<div class="card" title="{_e(definition)}"><div class="v">{value}</div>'
                     f'<div class="l">{_e(label)}</div></div>')
    return f'<div class="cards">{"".join(cards)}</div>'


def metric_table(metrics: dict) -> str:
    """Every figure of metrics.json: its key, label, value and definition (the curve: see its chart)."""
    k = metrics.get("k")
    rows = []
    for key, value in metrics.items():
        label, definition = _label(key, k)
        if isinstance(value, dict):
            shown = "see the chart and its values below"
        elif isinstance(value, list):
            shown = ", ".join(map(str, value)) or "none"
        else:
            shown = _num(value)
        exact = f' title="{value!r}"' if isinstance(value, float) else ""  # every digit, on hover
        number = isinstance(value, (int, float)) and not isinstance(value, bool)
        rows.append(f"<tr><td><code>{_e(key)}</code></td><td>{_e(label)}</td>"
                    f'<td{" class=n" if number else ""}{exact}>{_e(shown)}</td><td>{_e(definition)}</td></tr>')
    return ('<table class="figures"><thead><tr><th>key</th><th>figure</th><th>value</th><th>definition</th></tr>'
            f"</thead><tbody>{''.join(rows)}</tbody></table>")


def curve_svg(ks: Sequence[int], curves: Mapping[str, Sequence[float]], width: int = 760, height: int = 280) -> str:
    """An inline SVG line chart of precision (0 … 1) against k, one line per curve, a legend below."""
    left, right, top, bottom = 48, 16, 12, 40
    w, h = width - left - right, height - top - bottom
    k_lo, k_hi = (min(ks), max(ks)) if len(ks) else (1, 1)

    def x(k):
        return left + (w / 2 if k_hi == k_lo else w * (k - k_lo) / (k_hi - k_lo))

    def y(p):
        return top + h * (1 - p)

    parts = [f'<svg viewBox="0 0 {width} {height + 24 * len(curves)}" '
             f'width="{width}" role="img" aria-label="precision at k">']
    for p in (0, 0.25, 0.5, 0.75, 1):
        parts.append(f'<line x1="{left}" x2="{left + w}" y1="{y(p):.1f}" y2="{y(p):.1f}" class="grid"/>'
                     f'<text x="{left - 6}" y="{y(p) + 4:.1f}" text-anchor="end">{p:g}</text>')
    for k in _ticks(k_lo, k_hi):
        parts.append(f'<text x="{x(k):.1f}" y="{top + h + 16}" text-anchor="middle">{k}</text>')
    parts.append(f'<text x="{left + w / 2}" y="{top + h + 32}" text-anchor="middle">k</text>')
    for n, (name, ys) in enumerate(curves.items()):
        colour = PALETTE[n % len(PALETTE)]
        pts = [(x(k), y(p), k, p) for k, p in zip(ks, ys) if p is not None and math.isfinite(p)]
        line = " ".join(f"{a:.1f},{b:.1f}" for a, b, _, _ in pts)
        parts.append(f'<polyline points="{line}" fill="none" stroke="{colour}" stroke-width="2"/>')
        if len(pts) <= 60:
            parts += [f'<circle cx="{a:.1f}" cy="{b:.1f}" r="2.5" fill="{colour}"><title>{_e(name)}: '
                      f'precision@{k} = {p:.4f}</title></circle>' for a, b, k, p in pts]
        ly = height + 24 * n + 4
        parts.append(f'<rect x="{left}" y="{ly}" width="14" height="4" fill="{colour}"/>'
                     f'<text x="{left + 20}" y="{ly + 6}">{_e(name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _ticks(lo: int, hi: int, most: int = 10) -> list[int]:
    """At most about ``most`` round tick values from lo to hi."""
    step = max(1, math.ceil((hi - lo) / most))
    for nice in (1, 2, 5, 10, 20, 25, 50, 100, 200, 250, 500, 1000):
        if nice >= step:
            step = nice
            break
    ticks = [t for t in range(step * math.ceil(lo / step), hi + 1, step) if t >= lo]
    return sorted({lo, *ticks} if not ticks or ticks[0] - lo >= step / 2 else set(ticks))


def curve_section(metrics: dict) -> str:
    """The precision@k chart and, folded, its values."""
    curve = metrics.get("precision_at_k_curve") or {}
    ks = curve.get("k", [])
    series = {("queries vs the rest of the file" if metrics.get("protocol") == "self" else "test (val queries)"):
              curve.get("test", [])}
    if "train" in curve:
        series["train (self excluded)"] = curve["train"]
    head = "".join(f"<th>{_e(name)}</th>" for name in series)
    rows = "".join(f"<tr><td>{k}</td>" + "".join(f'<td class="n">{_num(ys[i])}</td>' for ys in series.values())
                   + "</tr>" for i, k in enumerate(ks))
    return (f'<figure>{curve_svg(ks, series)}</figure><details><summary>values</summary>'
            f'<table><thead><tr><th>k</th>{head}</tr></thead><tbody>{rows}</tbody></table></details>')


def class_table(table) -> str:
    """The per-class table, sortable: numbers carry their exact value in data-v; precision gets a bar."""
    heads, body = [], []
    numeric = [table[c].dtype.kind in "fiu" for c in table.columns]
    for c, is_num in zip(table.columns, numeric):
        heads.append(f'<th data-type="{"num" if is_num else "text"}" title="click to sort">{_e(c)}</th>')
    for row in table.itertuples(index=False):
        cells = []
        for v, is_num in zip(row, numeric):
            if not is_num:
                cells.append(f"<td>{_e(v)}</td>")
            elif isinstance(v, (float, np.floating)) and 0 <= v <= 1:
                cells.append(f'<td class="n bar" data-v="{float(v)!r}" style="--p:{v:.4f}">{v:.4f}</td>')
            else:
                cells.append(f'<td class="n" data-v="{float(v)!r}">{_num(v)}</td>')
        body.append(f"<tr>{''.join(cells)}</tr>")
    return (f'<div class="scroll"><table class="sortable" id="classes"><thead><tr>{"".join(heads)}</tr></thead>'
            f'<tbody>{"".join(body)}</tbody></table></div>')


def pairs_table(pairs: list[tuple[str, str, int, float]], k: int) -> str:
    if not pairs:
        return "<p>No query has a neighbour of another class in its top k.</p>"
    rows = "".join(f'<tr><td>{_e(a)}</td><td>{_e(b)}</td><td class="n">{c:,}</td><td class="n">{share:.1%}</td></tr>'
                   for a, b, c, share in pairs)
    return (f"<table><thead><tr><th>query class</th><th>neighbour class</th><th>neighbours</th>"
            f"<th>of the class's top-{k} slots</th></tr></thead><tbody>{rows}</tbody></table>")


def _thumb(uri: str | None, title: str, border: str) -> str:
    if uri is None:
        return f'<span class="thumb missing" style="border-color:{border}" title="{_e(title)}">missing</span>'
    return f'<img class="thumb" src="{uri}" style="border-color:{border}" title="{_e(title)}" alt="">'


def query_rows(views: list[QueryView]) -> str:
    """One line per query: its thumbnail, then its neighbours (green border: its class; red: another)."""
    out = []
    for v in views:
        cells = "".join(_thumb(uri, title, GREEN if same else RED) for uri, title, same in v.neighbours)
        out.append(f'<div class="q"><div class="cap">{_e(v.caption)}</div>'
                   f'<div class="strip">{_thumb(v.uri, v.title, "#333")}<span class="sep"></span>{cells}</div></div>')
    return "".join(out)


def build_html(page: Page) -> str:
    """The report page of ``page`` (a complete HTML document, no external resources)."""
    m = page.metrics
    k = m.get("k")
    shown = len(page.worst) + len(page.best)
    depth = max((len(v.neighbours) for v in page.worst + page.best), default=0)
    notes = "".join(f"; {_e(n)}" for n in page.notes)
    title = f"Evaluation report: precision@{k} {_num(m.get('test_precision_at_k'))}"
    prov = "".join(f"<tr><th>{_e(a)}</th><td><code>{_e(b)}</code></td></tr>" for a, b in page.provenance)
    return f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><meta name="viewport" content="width=device-width, initial-scale=1">
<title>{_e(title)}</title><style>{CSS}</style></head>
<body>
<h1>Evaluation report</h1>
<p class="sub">{_e(m.get('test_embeddings') or 'queries')} · {_num(page.num_queries)} queries · protocol
 {_e(m.get('protocol'))} · k = {_e(k)}</p>
{metric_cards(m)}
<h2>Precision@k</h2>{curve_section(m)}
<h2>Worst and best queries</h2>
<p class="note">showing {shown:,} of {page.num_queries:,} queries: the {len(page.worst)} with the lowest and the
 {len(page.best)} with the highest precision@{k} (then average precision), each with its {depth} nearest database
 images (border <span style="color:{GREEN}">green</span>: the query's class, <span style="color:{RED}">red</span>:
 another; hover for class, distance and file){notes}.</p>
<div class="queries"><section><h3>Worst</h3>{query_rows(page.worst)}</section>
<section><h3>Best</h3>{query_rows(page.best)}</section></div>
<h2>Most confused class pairs</h2>
<p class="note">Over every query's {k} nearest: how often a neighbour of a query of the first class had the second
 class.</p>
{pairs_table(page.pairs, k)}
<h2>Per class</h2><p class="note">Click a column header to sort.</p>{class_table(page.table)}
<h2>All figures</h2>{metric_table(m)}
<h2>Provenance</h2><table class="prov">{prov}</table>
<script>{SCRIPT}</script>
</body></html>
"""


CSS = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;max-width:1200px;margin:16px auto;
padding:0 16px;color:#222}
h1{margin:0 0 2px}h2{margin:28px 0 8px;border-bottom:1px solid #ddd;padding-bottom:2px}h3{margin:6px 0}
.sub,.note{color:#555}.cards{display:flex;flex-wrap:wrap;gap:10px;margin:12px 0}
.card{border:1px solid #ddd;border-radius:6px;padding:8px 14px;min-width:120px}
.card .v{font-size:24px;font-weight:600}.card .v small{font-size:13px;color:#666}.card .l{color:#555}
table{border-collapse:collapse;margin:6px 0}th,td{padding:3px 10px;border-bottom:1px solid #eee;text-align:left;
vertical-align:top}td.n{text-align:right;font-variant-numeric:tabular-nums}
table.sortable th{cursor:pointer;user-select:none;background:#f4f4f4}
th[aria-sort=ascending]::after{content:" \\25B2"}th[aria-sort=descending]::after{content:" \\25BC"}
td.bar{min-width:140px;background:linear-gradient(90deg,#cfe3f3 calc(var(--p)*100%),transparent 0)}
.scroll{max-height:560px;overflow:auto;display:inline-block;border:1px solid #eee}
.scroll table{margin:0}.scroll thead th{position:sticky;top:0}
.figures td:nth-child(-n+2){white-space:nowrap}.prov th{white-space:nowrap;font-weight:600}.prov code{word-break:break-all}
.queries{display:flex;flex-wrap:wrap;gap:24px}.queries section{flex:1 1 520px}
.q{margin:4px 0 10px}.cap{font-size:12px;color:#444}.strip{display:flex;gap:4px;align-items:center}
.thumb{width:48px;height:48px;object-fit:contain;border:3px solid;border-radius:2px;background:#fff;
box-sizing:content-box;image-rendering:auto}
.missing{display:inline-flex;align-items:center;justify-content:center;background:#ccc;font-size:10px;color:#333}
.sep{width:8px}figure{margin:0}svg text{font-size:11px;fill:#333}svg .grid{stroke:#e3e3e3}
"""

# Sorts a table.sortable by the clicked column (numbers by data-v, text by its content); a
# second click on the same header reverses the order.
SCRIPT = """
for (const table of document.querySelectorAll("table.sortable")) {
  const heads = [...table.tHead.rows[0].cells];
  heads.forEach((th, col) => th.addEventListener("click", () => {
    const up = th.getAttribute("aria-sort") !== "ascending", sign = up ? 1 : -1;
    heads.forEach(h => h.removeAttribute("aria-sort"));
    th.setAttribute("aria-sort", up ? "ascending" : "descending");
    const num = th.dataset.type === "num";
    const key = r => num ? parseFloat(r.cells[col].dataset.v) : r.cells[col].textContent;
    const rows = [...table.tBodies[0].rows].sort((a, b) => {
      const x = key(a), y = key(b);
      return sign * (num ? x - y : x.localeCompare(y));
    });
    table.tBodies[0].append(...rows);
  }));
}
"""
