"""Graded relevance with a class hierarchy: NDCG@k and parent-level precision on hand-made neighbours,
the hierarchy.csv reader, and the file make_sample_data.py --tints writes."""

import math

import numpy as np
import pytest

import make_sample_data
from deepranking import image_data, retrieval
from deepranking.cli import UserError

PARENT = {"coat_red": "coat", "coat_blue": "coat", "shirt_red": "shirt", "shirt_blue": "shirt"}


def gains_of(query, neighbours):
    q = np.array([query])
    nb = np.array([neighbours])
    return retrieval.graded_gains(q, nb, np.array([PARENT[query]]), np.vectorize(PARENT.get)(nb))


def test_gains_grade_same_class_over_same_parent_over_other():
    g = gains_of("coat_red", ["coat_red", "coat_blue", "shirt_red", "coat_red"])
    assert g.tolist() == [[2.0, 1.0, 0.0, 2.0]]


def test_ndcg_on_a_hand_worked_example():
    # neighbours: same class, sibling, other; the database holds 2 others of the class and 1 sibling item
    g = gains_of("coat_red", ["coat_red", "coat_blue", "shirt_red"])
    got = retrieval.ndcg_at_k_per_query(g, [2], [1], k=3)
    dcg = 2 / math.log2(2) + 1 / math.log2(3) + 0 / math.log2(4)
    ideal = 2 / math.log2(2) + 2 / math.log2(3) + 1 / math.log2(4)
    assert got[0] == pytest.approx(dcg / ideal)
    assert got[0] == pytest.approx(0.69937, abs=1e-5)


def test_ndcg_is_one_for_the_ideal_order_and_nan_with_nothing_relevant():
    g = gains_of("coat_red", ["coat_red", "coat_red", "coat_blue", "shirt_red"])
    assert retrieval.ndcg_at_k_per_query(g, [2], [1], k=4)[0] == pytest.approx(1.0)
    # swapping the sibling ahead of a same-class item costs something
    worse = gains_of("coat_red", ["coat_red", "coat_blue", "coat_red", "shirt_red"])
    assert retrieval.ndcg_at_k_per_query(worse, [2], [1], k=4)[0] < 1.0
    none = gains_of("coat_red", ["shirt_red", "shirt_blue"])
    assert np.isnan(retrieval.ndcg_at_k_per_query(none, [0], [0], k=2)[0])
    with pytest.raises(ValueError):
        retrieval.ndcg_at_k_per_query(none, [0], [0], k=3)  # deeper than the neighbours given


def test_parent_level_precision_counts_siblings():
    nb = np.array([["coat_red", "coat_blue", "shirt_red", "coat_blue"]])
    parents = np.vectorize(PARENT.get)(nb)
    assert retrieval.precision_at_k_per_query(np.array(["coat_red"]), nb, 4)[0] == 0.25
    assert retrieval.precision_at_k_per_query(np.array(["coat"]), parents, 4)[0] == 0.75


def test_hierarchy_reader(tmp_path):
    good = tmp_path / "h.csv"
    good.write_text('class,parent\nfm00,Coat\n"fm01","T-shirt/top"\n\nfm02,"Bag, small"\n')
    assert image_data.read_class_hierarchy(good) == {"fm00": "Coat", "fm01": "T-shirt/top", "fm02": "Bag, small"}
    cases = [("wnid,parent\nfm00,Coat\n", "header 'class,parent'"),
             ("class,parent\nfm00,Coat\nfm00,Bag\n", "line 3: class 'fm00' is listed twice"),
             ("class,parent\nfm00\n", "line 2: expected 'class,parent'"),
             ("class,parent\nfm00,\n", "line 2: expected 'class,parent'"),
             ("class,parent\n", "lists no class")]
    for text, message in cases:
        bad = tmp_path / "bad.csv"
        bad.write_text(text)
        with pytest.raises(UserError, match=message.replace("(", r"\(")):
            image_data.read_class_hierarchy(bad)
    with pytest.raises(UserError, match="not found"):
        image_data.read_class_hierarchy(tmp_path / "missing.csv")


def test_tinted_layout_writes_each_hue_under_its_garment(tmp_path):
    data, _ = make_sample_data.load_source("bundled")
    tinted = make_sample_data.tinted_subset(data, 3, 2, 1, seed=0)
    root = tmp_path / "tints"
    wnids = make_sample_data.write_tiny_imagenet_layout(
        root, tinted["train_images"], tinted["train_labels"], tinted["val_images"], tinted["val_labels"],
        tinted["class_names"], size=32, progress=False, parents=tinted["parent_names"])
    parents = image_data.read_class_hierarchy(root / image_data.HIERARCHY_FILE)
    names = image_data.read_class_names(root / "words.txt")
    assert list(parents) == wnids and len(set(parents.values())) == 10
    for wnid in wnids:  # "Coat hue 120" sits under "Coat"
        assert names[wnid].startswith(parents[wnid] + " hue ")
    found = image_data.find_dataset_file([str(root / "train" / wnids[0] / "images" / "x.JPEG")],
                                         image_data.HIERARCHY_FILE)
    assert found == root / image_data.HIERARCHY_FILE


def write_graded_database(root):
    """Two parents: A = {a1, a2}, B = {b1}; 1-d embeddings on a line; one a1 query at x = 2.4."""
    from PIL import Image

    from deepranking import embedding_io

    imgs = root / "data" / "imgs"
    imgs.mkdir(parents=True)
    paths = []
    for i in range(7):
        p = imgs / f"{i}.png"
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(p)
        paths.append(str(p))
    db = np.array([[0, 0], [1, 0], [3, 0], [4, 0], [10, 0], [11, 0]], dtype=np.float32)
    embedding_io.write_embeddings(root / "train.txt", paths[:6], ["a1", "a1", "a2", "a2", "b1", "b1"], db,
                                  progress=False)
    embedding_io.write_embeddings(root / "test.txt", paths[6:], ["a1"], np.array([[2.4, 0]], np.float32),
                                  progress=False)
    return root / "train.txt", root / "test.txt"


def run_eval(capsys, *argv):
    import eval as eval_script
    from deepranking import cli

    try:
        cli.run(eval_script.main, eval_script.get_args_parser(), [str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code
    return code, capsys.readouterr()


def test_eval_reports_graded_figures_from_the_hierarchy_above_the_images(tmp_path, capsys):
    import json

    train, test = write_graded_database(tmp_path)
    (tmp_path / "data" / "hierarchy.csv").write_text("class,parent\na1,A\na2,A\nb1,B\n")
    code, out = run_eval(capsys, "--train-embeddings", train, "--test-embeddings", test, "--k", 3,
                         "--output-dir", tmp_path / "out", "--no-progress")
    assert code == 0, out.err
    m = json.loads((tmp_path / "out" / "metrics.json").read_text())
    # nearest to 2.4: 3 (a2), 1 (a1), 4 (a2): class precision 1/3, all three under parent A
    assert m["test_precision_at_k"] == pytest.approx(1 / 3)
    assert m["parent_precision_at_k"] == pytest.approx(1.0)
    dcg = 1 + 2 / math.log2(3) + 1 / math.log2(4)  # gains 1, 2, 1
    ideal = 2 + 2 / math.log2(3) + 1 / math.log2(4)  # two other a1, then the a2 siblings
    assert m["ndcg_at_k"] == pytest.approx(dcg / ideal)
    assert m["hierarchy"] == str(tmp_path / "data" / "hierarchy.csv")
    assert "class hierarchy: " in out.out and "NDCG@3: 0.7342" in out.out
    assert "NDCG@3" in (tmp_path / "out" / "report.html").read_text()


def test_a_hierarchy_that_misses_a_class(tmp_path, capsys):
    train, test = write_graded_database(tmp_path)
    partial = tmp_path / "data" / "hierarchy.csv"
    partial.write_text("class,parent\na1,A\na2,A\n")
    # named on the command line: refused in one line, nothing written
    code, out = run_eval(capsys, "--train-embeddings", train, "--test-embeddings", test, "--k", 3,
                         "--hierarchy", partial, "--output-dir", tmp_path / "named")
    assert code == 2 and "gives no parent for 1 class(es) of the embeddings, e.g. 'b1'" in out.err
    assert "Traceback" not in out.err and not (tmp_path / "named").exists()
    # found above the images: optional, so a warning and the class-level figures alone
    code, out = run_eval(capsys, "--train-embeddings", train, "--test-embeddings", test, "--k", 3,
                         "--output-dir", tmp_path / "found", "--no-progress")
    assert code == 0 and "class hierarchy not used" in out.err and "--hierarchy FILE" in out.err
    import json

    assert "ndcg_at_k" not in json.loads((tmp_path / "found" / "metrics.json").read_text())
