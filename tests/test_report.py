"""report.html: what it shows (by hand), that it needs nothing but itself, its size, and a real browser."""

from __future__ import annotations

import html.parser
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from deepranking import embedding_io, report, retrieval, scoring
import eval as eval_script

from test_eval import write_files


def run_eval(tmp_path, *extra) -> Path:
    train, test = write_files(tmp_path)
    out = tmp_path / "out"
    args = eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(train), "--test-embeddings", str(test), "--k", "2", "--output-dir", str(out),
         "--no-progress", *map(str, extra)])
    eval_script.main(args)
    return out


class Links(html.parser.HTMLParser):
    """Every src/href of a page, and the tags it opens (html.parser raises nothing: it records)."""

    def __init__(self):
        super().__init__()
        self.urls, self.tags = [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.urls += [v for k, v in attrs if k in ("src", "href") and v is not None]


def parse(page: str) -> Links:
    links = Links()
    links.feed(page)
    links.close()
    return links


def test_confused_pairs_by_hand():
    # Queries a, a, b, c; each with its top 3. Wrong neighbours: (a,b) x3, (a,c) x1, (b,a) x2, (c,a) x1, (c,b) x1.
    q = ["a", "a", "b", "c"]
    nb = [["a", "b", "b"],
          ["b", "c", "a"],
          ["a", "a", "b"],
          ["a", "b", "c"]]
    assert report.confused_pairs(q, nb) == [("a", "b", 3), ("b", "a", 2), ("a", "c", 1), ("c", "a", 1),
                                            ("c", "b", 1)]
    assert report.confused_pairs(q, nb, top=2) == [("a", "b", 3), ("b", "a", 2)]
    assert report.confused_pairs(["a"], [["a", "a"]]) == []


def test_shown_queries_worst_and_best_without_lone_ones():
    precision = np.array([0.5, 0.0, 1.0, 0.0, 0.5, 1.0])
    ap = np.array([0.7, 0.2, 1.0, np.nan, 0.4, 0.9])  # row 3 is lone
    worst, best = report.pick_shown(precision, ap, 2)
    assert worst == [1, 4] and best == [2, 5]
    worst, best = report.pick_shown(precision, ap, 10)  # fewer than 2 x 10: each row once
    assert worst == [1, 4, 0, 5, 2] and best == []
    worst, best = report.pick_shown(np.zeros(3), np.full(3, np.nan), 1)  # all lone: shown anyway
    assert worst == [0] and best == [1]


def test_the_report_of_a_hand_made_evaluation(tmp_path):
    out = run_eval(tmp_path)
    page = (out / "report.html").read_text(encoding="utf-8")
    links = parse(page)
    assert links.tags[0] == "html" and "table" in links.tags and "svg" in links.tags and "script" in links.tags
    assert not [u for u in links.urls if not u.startswith("data:")]  # nothing to fetch: no file, no network
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<link" not in page and "@import" not in page and "url(" not in page
    metrics = json.loads((out / "metrics.json").read_text())
    for key, value in metrics.items():
        assert f"<code>{key}</code>" in page
        if isinstance(value, float):
            assert f"{value:.4f}" in page
        elif isinstance(value, str):
            assert value in page
    for p in metrics["precision_at_k_curve"]["test"]:
        assert f"{p:.4f}" in page
    # Query a (x=0.1): neighbours a, a. Query b (x=5): a, a -> (b, a) twice, 100% of b's 1 query x k=2 slots.
    assert "<tr><td>b</td><td>a</td><td class=\"n\">2</td><td class=\"n\">100.0%</td></tr>" in page
    assert "showing 2 of 2 queries" in page
    # 2 queries x (itself + 2 neighbours), every one an image that exists.
    assert page.count('<img class="thumb" src="data:image/jpeg;base64,') == 6
    assert "missing" not in re.sub(r"\.missing\{[^}]*\}", "", page)
    assert str(tmp_path / "test.txt") in page and "model fingerprint" in page


def test_unreadable_and_missing_images_show_a_placeholder(tmp_path):
    imgs = tmp_path / "imgs"
    train, test = write_files(tmp_path)
    (imgs / "0.png").unlink()  # database row 0: a neighbour of query a
    (imgs / "6.png").write_bytes(b"not an image")  # query a itself
    out = tmp_path / "out"
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(train), "--test-embeddings", str(test), "--k", "2", "--output-dir", str(out),
         "--no-progress", "--num-demo-queries", "0"]))
    page = (out / "report.html").read_text(encoding="utf-8")
    # k = 2: query a (unreadable) with rows 0 (gone) and 1; query b with rows 2 and 1.
    assert page.count('class="thumb missing"') == 2
    assert page.count('<img class="thumb"') == 4


def fake_evaluation(tmp_path, n_queries: int, n_db: int, n_classes: int, n_images: int):
    """Random embeddings whose rows point at ``n_images`` noisy 64 px JPEGs (the worst case for their size)."""
    rng = np.random.default_rng(0)
    folder = tmp_path / "imgs"
    folder.mkdir()
    files = []
    for i in range(n_images):
        p = folder / f"{i}.jpg"
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(p, quality=95)
        files.append(str(p))
    centres = rng.normal(size=(n_classes, 16)).astype(np.float32)
    db_lab, q_lab = rng.integers(0, n_classes, n_db), rng.integers(0, n_classes, n_queries)
    db = embedding_io.Embeddings([files[i % n_images] for i in range(n_db)], np.array([f"c{c}" for c in db_lab],
                                 dtype=object), centres[db_lab] + rng.normal(size=(n_db, 16)).astype(np.float32))
    qs = embedding_io.Embeddings([files[(7 * i) % n_images] for i in range(n_queries)],
                                 np.array([f"c{c}" for c in q_lab], dtype=object),
                                 centres[q_lab] + rng.normal(size=(n_queries, 16)).astype(np.float32))
    index = retrieval.ExactIndex(db.emb, "cpu")
    result = scoring.evaluate(db.emb, db.labels, qs.emb, qs.labels, 10, index, progress=False)
    return result, db, qs, index


def test_the_page_stays_small_for_many_queries(tmp_path):
    result, db, qs, index = fake_evaluation(tmp_path, 10_000, 2_000, 100, 300)
    page = report.write_report(tmp_path / "report.html", result, db, qs, index, command=["eval.py"],
                               progress=False)
    text = (tmp_path / "report.html").read_text(encoding="utf-8")
    assert "showing 24 of 10,000 queries" in text
    assert len(page.worst) == len(page.best) == report.SHOWN_QUERIES
    assert text.count("<img ") == 24 * (1 + report.SHOWN_NEIGHBOURS)
    assert len(page.pairs) == report.TOP_PAIRS
    assert (tmp_path / "report.html").stat().st_size < 2_000_000
    # The pair counts are those of a plain top-k search of every query.
    _, idx = index.search(qs.emb, 10)
    assert [p[:3] for p in page.pairs] == report.confused_pairs(qs.labels, db.labels[idx])


CHECKS = """<script>
addEventListener("load", () => {
  const imgs = [...document.images], b = document.body.dataset;
  b.images = imgs.length;
  b.imagesLoaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const table = document.getElementById("classes"), heads = [...table.tHead.rows[0].cells];
  const col = heads.findIndex(h => h.textContent.trim() === "precision_at_k");
  heads[col].click();
  b.firstAscending = table.tBodies[0].rows[0].cells[0].textContent;
  heads[col].click();
  b.firstDescending = table.tBodies[0].rows[0].cells[0].textContent;
});
</script></body>"""


def browser() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(browser() is None, reason="no chromium to render the page")
def test_a_real_browser_shows_every_image_and_sorts_the_table(tmp_path):
    result, db, qs, index = fake_evaluation(tmp_path, 300, 200, 12, 40)
    report.write_report(tmp_path / "report.html", result, db, qs, index, command=["eval.py"], progress=False)
    page = (tmp_path / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"  # the page plus a script that records what the browser did
    probe.write_text(page.replace("</body>", CHECKS), encoding="utf-8")
    try:
        done = subprocess.run([browser(), "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                               f"--user-data-dir={tmp_path / 'profile'}", "--virtual-time-budget=5000",
                               "--dump-dom", probe.as_uri()], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        pytest.fail("chromium did not render the page within 30 s")
    if done.returncode != 0 and not done.stdout.strip():
        pytest.skip(f"chromium does not start here: {done.stderr.strip()[-300:]}")
    body = re.search(r"<body([^>]*)>", done.stdout)
    assert body, done.stderr[-2000:]
    attrs = dict(re.findall(r'data-([\w-]+)="([^"]*)"', body.group(1)))
    shown = 24 * (1 + report.SHOWN_NEIGHBOURS)
    assert attrs["images"] == attrs["images-loaded"] == str(shown)
    p = dict(zip(result.table["class"], result.table["precision_at_k"]))
    assert p[attrs["first-ascending"]] == min(p.values()) < max(p.values()) == p[attrs["first-descending"]]
    assert attrs["first-ascending"] != result.table["class"].iloc[0]  # the table came best first: it moved


def test_leave_one_out_never_shows_a_query_as_its_own_neighbour(tmp_path):
    _, _, qs, _ = fake_evaluation(tmp_path, 60, 10, 3, 10)
    index = retrieval.ExactIndex(qs.emb, "cpu")
    names, db_codes, q_codes = scoring.label_codes(qs.labels, qs.labels)
    found = report.search_neighbours(index, qs.emb, q_codes, db_codes, 5, range(60), self_search=True,
                                     progress=False)
    assert all(r not in idx and len(idx) == 5 for r, (_, idx) in found.rows.items())
    _, idx = index.search(qs.emb, 5, exclude_rows=np.arange(60))
    assert report.top_pairs(found.pairs, names) == report.confused_pairs(qs.labels, qs.labels[idx])
    result = scoring.evaluate(qs.emb, qs.labels, qs.emb, qs.labels, 5, index, protocol="self", progress=False)
    page = report.write_report(tmp_path / "report.html", result, qs, qs, index, progress=False)
    assert len(page.worst) + len(page.best) == 24 and all(len(v.neighbours) == 5 for v in page.worst)
    assert "database" not in dict(page.provenance)  # one file, its own database


def test_a_stray_report_without_metrics_is_not_replaced_without_force(tmp_path, capsys):
    from test_eval import run

    train, test = write_files(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report.html").write_text("someone's page")
    code, captured = run(capsys, "--train-embeddings", train, "--test-embeddings", test, "--output-dir", out,
                         "--k", 2)
    assert code == 2 and "report.html" in captured.err and "--force" in captured.err
    assert (out / "report.html").read_text() == "someone's page"
