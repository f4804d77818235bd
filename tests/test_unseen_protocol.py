"""The unseen-class protocol (Musgrave et al. 2020), reference rows, class names and eval's warnings.

Metrics are checked against values worked out by hand on a 7-item example (comments show the
arithmetic), first on the pure functions, then end to end through eval.py --protocol self.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import eval as eval_script
import gen_embeddings
from deepranking import cli, embedding_io, image_data, retrieval, scoring
from deepranking.cli import UserError
from deepranking.embedding_io import read_embeddings
from deepranking.image_data import list_class_folder
from deepranking.preprocessing import load_image

# Seven items on a line (1-d embeddings); class a = {0, 1, 3}, b = {2, 4, 5}, c = {6} (alone).
X = [0.0, 1.0, 2.5, 4.2, 5.2, 7.1, 30.0]
LABELS = ["a", "a", "b", "a", "b", "b", "c"]
# Leave-one-out neighbours (own row excluded), nearest first, worked out from the distances:
#   q0 (0.0, a): 1 (1.0), 2 (2.5), 3 (4.2), 4 (5.2), 5 (7.1), 6   -> a b a b b c
#   q1 (1.0, a): 0 (1.0), 2 (1.5), 3 (3.2), 4 (4.2), 5 (6.1), 6   -> a b a b b c
#   q2 (2.5, b): 1 (1.5), 3 (1.7), 0 (2.5), 4 (2.7), 5 (4.6), 6   -> a a a b b c
#   q3 (4.2, a): 4 (1.0), 2 (1.7), 5 (2.9), 1 (3.2), 0 (4.2), 6   -> b b b a a c
#   q4 (5.2, b): 3 (1.0), 5 (1.9), 2 (2.7), 1 (4.2), 0 (5.2), 6   -> a b b a a c
#   q5 (7.1, b): 4 (1.9), 3 (2.9), 2 (4.6), 1 (6.1), 0 (7.1), 6   -> b a b a a c
#   q6 (30., c): 5 (22.9), 4 (24.8), 3 (25.8), 2 (27.5), 1 (29), 0 -> b b a b a a
NEIGHBOURS = np.array([list(row) for row in ["ababbc", "ababbc", "aaabbc", "bbbaac", "abbaac", "babaac",
                                             "bbabaa"]])
# R = the OTHER items of the query's class: a, b -> 2; c -> 0 (a "lone" query, left out of
# recall@1, R-precision and MAP@R, as in Musgrave et al. / pytorch-metric-learning).
R = [2, 2, 2, 2, 2, 2, 0]
# Recall@1 over the 6 scored queries: nearest is same-class for q0, q1, q5 -> 3/6.
RECALL_AT_1 = 3 / 6
# R-precision = same-class among the first R=2: q0 1/2, q1 1/2, q2 0/2, q3 0/2, q4 1/2 (b at 2),
# q5 1/2 (b at 1) -> (0.5 + 0.5 + 0 + 0 + 0.5 + 0.5) / 6 = 2/6.
R_PRECISION = 2 / 6
# MAP@R = mean of (1/R) sum_{j<=R} P@j [j relevant]: q0 (1/2)(P@1 = 1) = 1/2; q1 1/2; q2 0; q3 0;
# q4 (1/2)(P@2 = 1/2) = 1/4; q5 (1/2)(P@1 = 1) = 1/2 -> (0.5 + 0.5 + 0 + 0 + 0.25 + 0.5) / 6 = 7/24.
MAP_AT_R = 7 / 24
# Precision@2 counts every query (the classic protocol), q6 too: (1/2 + 1/2 + 0 + 0 + 1/2 + 1/2 + 0) / 7.
PRECISION_AT_2 = 2 / 7


def test_musgrave_metrics_by_hand():
    assert retrieval.recall_at_1(LABELS, NEIGHBOURS, R) == pytest.approx(RECALL_AT_1)
    assert retrieval.r_precision(LABELS, NEIGHBOURS, R) == pytest.approx(R_PRECISION)
    assert retrieval.map_at_r(LABELS, NEIGHBOURS, R) == pytest.approx(MAP_AT_R)
    assert retrieval.precision_at_k(LABELS, NEIGHBOURS, 2) == pytest.approx(PRECISION_AT_2)
    # Without R every query counts for recall@1: q6's nearest is b -> 3/7.
    assert retrieval.recall_at_1(LABELS, NEIGHBOURS) == pytest.approx(3 / 7)
    # MAP@R differs from R-precision when a hit comes late: q4 has R-precision 1/2 but AP@R 1/4.
    assert retrieval.map_at_r_per_query(LABELS, NEIGHBOURS, R)[4] == pytest.approx(0.25)
    assert np.isnan(retrieval.r_precision_per_query(LABELS, NEIGHBOURS, R)[6])
    with pytest.raises(ValueError, match="needs 7 neighbours"):
        retrieval.r_precision(LABELS, NEIGHBOURS, [7] * 7)
    assert np.isnan(retrieval.map_at_r(["c"], NEIGHBOURS[6:], [0]))  # nothing to score


def write_line(path, xs=X, labels=LABELS, images=None):
    emb = np.array([[x, 0.0] for x in xs], dtype=np.float32)
    embedding_io.write_embeddings(path, images or [f"/nowhere/{i}.png" for i in range(len(xs))], labels, emb,
                                  progress=False)
    return path


def run(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        cli.run(eval_script.main, eval_script.get_args_parser(), [str(a) for a in argv])
    return exc.value.code, capsys.readouterr()


def eval_main(*argv):
    eval_script.main(eval_script.get_args_parser().parse_args([str(a) for a in argv] + ["--no-progress",
                                                                                         "--num-demo-queries", "0"]))


def test_eval_self_protocol_by_hand(tmp_path, capsys):
    emb = write_line(tmp_path / "test.txt")
    out = tmp_path / "out"
    eval_main("--protocol", "self", "--test-embeddings", emb, "--train-embeddings", tmp_path / "absent.txt",
              "--k", 2, "--output-dir", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["protocol"] == "self" and m["train_embeddings"] is None
    assert m["recall_at_1"] == pytest.approx(RECALL_AT_1)
    assert m["r_precision"] == pytest.approx(R_PRECISION)
    assert m["map_at_r"] == pytest.approx(MAP_AT_R)
    assert m["test_precision_at_k"] == pytest.approx(PRECISION_AT_2)
    assert m["hit_at_k"] == pytest.approx(4 / 7)  # q0, q1, q4, q5 have a same-class item in 2
    assert m["num_lone_queries"] == 1 and m["lone_classes"] == ["c"]
    err = capsys.readouterr().err
    assert "1 query class(es) have a single image" in err and ": c" in err
    # --k counts the items besides the query: 6 here.
    code, captured = run(capsys, "--protocol", "self", "--test-embeddings", emb, "--k", 7, "--output-dir",
                         tmp_path / "o2")
    assert code == 2 and "--k 7 is larger than the database (6 images besides the query)" in captured.err


def test_self_protocol_fetches_enough_neighbours_for_the_largest_class(tmp_path):
    """R reaches 29 (> k = 1): MAP@R of a perfect embedding is 1 only if all 29 are fetched."""
    xs = [float(i) for i in range(30)] + [1000.0 + i for i in range(5)]
    labels = ["big"] * 30 + ["small"] * 5
    emb = write_line(tmp_path / "t.txt", xs, labels)
    out = tmp_path / "out"
    eval_main("--protocol", "self", "--test-embeddings", emb, "--k", 1, "--output-dir", out)
    m = json.loads((out / "metrics.json").read_text())
    assert m["map_at_r"] == pytest.approx(1.0) and m["r_precision"] == pytest.approx(1.0)


def test_small_neighbour_budget_gives_the_same_metrics(tmp_path, monkeypatch):
    emb = write_line(tmp_path / "test.txt")
    eval_main("--protocol", "self", "--test-embeddings", emb, "--k", 2, "--output-dir", tmp_path / "a")
    monkeypatch.setattr(scoring, "NEIGHBOUR_BUDGET", 1)  # one query per block
    eval_main("--protocol", "self", "--test-embeddings", emb, "--k", 2, "--output-dir", tmp_path / "b")
    a, b = (json.loads((tmp_path / d / "metrics.json").read_text()) for d in "ab")
    assert a == {**b, "test_embeddings": a["test_embeddings"]}


def test_query_class_missing_from_database_is_named(tmp_path, capsys):
    train = write_line(tmp_path / "train.txt", [0.0, 1.0, 5.0, 6.0], ["a", "a", "b", "b"])
    test = write_line(tmp_path / "test.txt", [0.5, 5.5, 9.0, 9.5], ["a", "b", "zebra", "yak"],
                      images=[f"/q/{i}.png" for i in range(4)])
    out = tmp_path / "out"
    eval_main("--train-embeddings", train, "--test-embeddings", test, "--k", 2, "--output-dir", out)
    err = capsys.readouterr().err
    assert "2 query class(es) have no image in the database" in err and "yak, zebra" in err
    assert "precision is 0 by construction" in err
    m = json.loads((out / "metrics.json").read_text())
    assert m["lone_classes"] == ["yak", "zebra"]
    assert m["test_precision_at_k"] == pytest.approx(0.5)  # a, b: 1 each; yak, zebra: 0
    assert m["recall_at_1"] == pytest.approx(1.0)  # only a and b are scored


def test_collapsed_embeddings_warn(tmp_path, capsys):
    train = write_line(tmp_path / "train.txt", [1.0] * 4, ["a", "a", "b", "b"])
    test = write_line(tmp_path / "test.txt", [1.0, 1.0 + 1e-8], ["a", "b"], images=["/q/0.png", "/q/1.png"])
    eval_main("--train-embeddings", train, "--test-embeddings", test, "--k", 2, "--output-dir", tmp_path / "o")
    err = capsys.readouterr().err
    assert "the embeddings have collapsed to a point: mean pairwise distance" in err
    assert str(train) in err and str(test) in err
    spread = write_line(tmp_path / "spread.txt", [0.0, 1.0, 5.0, 6.0], ["a", "a", "b", "b"])
    eval_main("--train-embeddings", spread, "--test-embeddings", test, "--k", 2, "--output-dir", tmp_path / "o2")
    collapsed = [line for line in capsys.readouterr().err.splitlines() if "collapsed to a point" in line]
    assert len(collapsed) == 1 and str(test) in collapsed[0]  # only the collapsed file


def test_a_database_of_one_class_warns_that_the_scores_mean_nothing(tmp_path, capsys):
    one = write_line(tmp_path / "one.txt", [0.0, 1.0, 5.0, 6.0], ["a"] * 4)
    eval_main("--protocol", "self", "--test-embeddings", one, "--k", 2, "--output-dir", tmp_path / "o")
    err = capsys.readouterr().err
    assert f"the database {one} holds one class only (a)" in err and "measure nothing" in err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["test_precision_at_k"] == 1.0
    two = write_line(tmp_path / "two.txt", [0.0, 1.0, 5.0, 6.0], ["a", "a", "b", "b"])
    eval_main("--protocol", "self", "--test-embeddings", two, "--k", 1, "--output-dir", tmp_path / "o2")
    assert "one class only" not in capsys.readouterr().err


def test_old_pictures_without_metrics_are_refused_unless_force(tmp_path, capsys):
    imgs = []
    for i in range(7):
        p = tmp_path / "imgs" / f"{i}.png"
        p.parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (30 * i, 0, 0)).save(p)
        imgs.append(str(p))
    emb = write_line(tmp_path / "test.txt", images=imgs)
    out = tmp_path / "out"
    out.mkdir()
    for name in ("retrieval_0.png", "retrieval_7.png"):
        Image.new("RGB", (4, 4)).save(out / name)
    (out / "retrieval_7.csv").write_text("its table\n")  # image_grid writes one beside each picture
    before = (out / "retrieval_0.png").read_bytes()
    args = ["--protocol", "self", "--test-embeddings", emb, "--k", 2, "--output-dir", out, "--no-progress",
            "--num-demo-queries", 1]
    code, captured = run(capsys, *args)
    assert code == 2 and "holds outputs of an earlier evaluation (retrieval_0.png and 1 more) but no " \
                         "metrics.json; pass --force" in captured.err
    assert (out / "retrieval_0.png").read_bytes() == before and not (out / "metrics.json").exists()
    eval_script.main(eval_script.get_args_parser().parse_args([str(a) for a in args] + ["--force"]))
    assert (out / "retrieval_0.png").read_bytes() != before
    assert not (out / "retrieval_7.png").exists()  # the earlier run's extra picture is gone
    assert not (out / "retrieval_7.csv").exists() and (out / "retrieval_0.csv").exists()  # and its table


def test_eval_leaves_files_of_other_names_alone_and_refuses_its_table_names(tmp_path, capsys):
    # only retrieval_<n>.png is this tool's; a table of its name without metrics.json is refused;
    # a folder where an output goes fails before any file of the set is replaced
    emb = write_line(tmp_path / "test.txt")
    out = tmp_path / "out"
    out.mkdir()
    (out / "retrieval_7.txt").write_text("notes\n")
    Image.new("RGB", (4, 4)).save(out / "retrieval_notes.png")  # not a name eval.py writes
    (out / "retrieval_12.jpg").write_text("photo\n")
    (out / "per_class_precision.csv").write_text("my table\n")
    args = ["--protocol", "self", "--test-embeddings", emb, "--k", 2, "--output-dir", out, "--no-progress",
            "--num-demo-queries", 1]
    code, captured = run(capsys, *args)
    assert code == 2 and "holds outputs of an earlier evaluation (per_class_precision.csv)" in captured.err
    assert (out / "per_class_precision.csv").read_text() == "my table\n"
    eval_script.main(eval_script.get_args_parser().parse_args([str(a) for a in args] + ["--force"]))
    assert (out / "retrieval_7.txt").read_text() == "notes\n" and (out / "retrieval_12.jpg").exists()
    assert (out / "retrieval_notes.png").exists()
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    (out / "retrieval_0.png").unlink()
    (out / "retrieval_0.png").mkdir()
    code, captured = run(capsys, *args, "--k", 1, "--force")
    assert code == 2 and "retrieval_0.png: Is a directory (nothing of this run was kept there)" in captured.err
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == {
        k: v for k, v in before.items() if k != "retrieval_0.png"}


def test_no_progress_flag_exists():
    args = eval_script.get_args_parser().parse_args(["--no-progress"])
    assert args.no_progress and args.protocol == "split"


# ----------------------------------------------------------------------------
# Class names from words.txt
# ----------------------------------------------------------------------------


def test_read_class_names(tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("n01443537\tgoldfish, Carassius auratus\n\nn99\tthing\nn02\t\n", encoding="utf-8")
    assert image_data.read_class_names(words) == {"n01443537": "goldfish", "n99": "thing"}
    assert image_data.read_class_names(words, wanted=["n99"]) == {"n99": "thing"}
    assert image_data.display_name("n02", {"n99": "thing"}) == "n02"  # no name: the id
    (tmp_path / "bad.txt").write_text("n01 goldfish\n")
    with pytest.raises(UserError, match="bad.txt line 1: expected 'id<TAB>name"):
        image_data.read_class_names(tmp_path / "bad.txt")
    deep = tmp_path / "train" / "n99" / "images"
    deep.mkdir(parents=True)
    assert image_data.find_dataset_file([str(deep / "x.JPEG")], image_data.WORDS_FILE) == words
    assert image_data.find_dataset_file(["/nonexistent/a/b.png"], image_data.WORDS_FILE) is None


def test_words_file_with_a_bom_and_a_stray_words_file(tmp_path, capsys):
    words = tmp_path / "words.txt"
    words.write_text("a\tanimal\nb\tbuilding\n", encoding="utf-8-sig")  # as Windows editors save it
    assert image_data.read_class_names(words) == {"a": "animal", "b": "building"}
    # An unrelated words.txt above the images stops nothing: names are optional, so a warning.
    (tmp_path / "data").mkdir()
    words.write_text("just some notes\n", encoding="utf-8")
    images = [str(tmp_path / "data" / f"{i}.png") for i in range(4)]
    emb = write_line(tmp_path / "data" / "e.txt", [0.0, 1.0, 5.0, 6.0], ["a", "a", "b", "b"], images=images)
    eval_main("--protocol", "self", "--test-embeddings", emb, "--k", 1, "--output-dir", tmp_path / "o")
    err = capsys.readouterr().err
    assert f"class names not used: {words} line 1: expected 'id<TAB>name" in err and "--words FILE" in err
    assert json.loads((tmp_path / "o" / "metrics.json").read_text())["class_names"] is None
    # Given with --words, the same file is an error: the user asked for it.
    code, out = run(capsys, "--protocol", "self", "--test-embeddings", emb, "--k", 1, "--words", words,
                    "--output-dir", tmp_path / "o2")
    assert code == 2 and "line 1: expected 'id<TAB>name" in out.err


def test_eval_shows_names_and_keeps_ids_in_files(tmp_path, capsys, tiny_imagenet):
    train_files = list_class_folder(tiny_imagenet / "train")
    val_files = list_class_folder(tiny_imagenet / "val")
    rng = np.random.default_rng(0)
    codes = {w: i for i, w in enumerate(sorted(set(train_files.label_names)))}

    def emb(listing):
        return np.array([[10.0 * codes[w], rng.normal()] for w in listing.label_names], dtype=np.float32)

    embedding_io.write_embeddings(tmp_path / "train.txt", train_files.paths, train_files.label_names, emb(train_files),
                                  progress=False)
    embedding_io.write_embeddings(tmp_path / "test.txt", val_files.paths, val_files.label_names, emb(val_files),
                                  progress=False)
    out = tmp_path / "out"
    eval_script.main(eval_script.get_args_parser().parse_args(
        ["--train-embeddings", str(tmp_path / "train.txt"), "--test-embeddings", str(tmp_path / "test.txt"),
         "--k", "3", "--output-dir", str(out), "--no-progress", "--num-demo-queries", "1"]))
    printed = capsys.readouterr().out
    assert "classes, best first: thing 0 1.00, thing 1 1.00, thing 2 1.00" in printed  # words.txt names, each once
    table = (out / "per_class_precision.csv").read_text().splitlines()
    assert table[0] == "class,name,n_queries,precision_at_k"
    assert table[1] == "n00000000,thing 0,3,1.000000"  # the wnid stays in the file
    m = json.loads((out / "metrics.json").read_text())
    assert m["class_names"] == str(tiny_imagenet / "words.txt")
    assert (out / "retrieval_0.png").exists()


# ----------------------------------------------------------------------------
# Reference rows: gen_embeddings.py --features pixels | backbone
# ----------------------------------------------------------------------------


def gen(*argv):
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args([*map(str, argv), "--device", "cpu",
                                                                     "--no-progress"]))


def test_pixel_features_are_the_raw_image_flattened_and_unit_norm(tmp_path, tiny_imagenet):
    out = tmp_path / "train.npz"
    gen("--features", "pixels", "--data-dir", tiny_imagenet, "--splits", "train", "--train-output", out)
    e = read_embeddings(out, progress=False)
    assert e.dim == 3 * 32 * 32  # the default 32 px; the fixture's images are 32 px: no resize
    raw = torch.stack([load_image(p) for p in e.paths]).permute(0, 3, 1, 2).flatten(1).double()  # [N, 3072] CHW
    expected = raw / raw.norm(dim=1, keepdim=True)
    np.testing.assert_allclose(e.emb, expected.numpy(), atol=1e-6)
    record = e.model
    assert record["features"]["features"] == "pixels"
    assert record["preprocessing"]["image_size"] == 32 and record["preprocessing"]["cache_size"] == 32
    assert record["preprocessing"]["mean"] == [0.0, 0.0, 0.0]
    gen("--features", "pixels", "--image-size", 8, "--cache-size", 16, "--data-dir", tiny_imagenet,
        "--splits", "train", "--train-output", tmp_path / "small.npz")
    small = read_embeddings(tmp_path / "small.npz", progress=False)
    assert small.dim == 3 * 8 * 8 and small.model["preprocessing"]["cache_size"] == 16
    assert small.model["id"] != record["id"]


def test_backbone_features_from_a_state_dict_file(tmp_path, tiny_imagenet):
    import torchvision

    torch.manual_seed(3)
    net = torchvision.models.resnet18(weights=None)
    torch.save(net.state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "train.npz"
    gen("--features", "backbone", "--arch", "resnet18", "--weights", tmp_path / "r18.pth", "--image-size", 32,
        "--data-dir", tiny_imagenet, "--splits", "train", "--train-output", out)
    e = read_embeddings(out, progress=False)
    assert e.dim == 512
    net.fc = torch.nn.Identity()
    net.eval()
    x = torch.stack([load_image(p) for p in e.paths]).permute(0, 3, 1, 2).float() / 255  # [N, 3, 32, 32]
    x = (x - torch.tensor((0.485, 0.456, 0.406)).view(1, 3, 1, 1)) / torch.tensor((0.229, 0.224, 0.225)).view(1, 3, 1, 1)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(net(x), dim=1).numpy()
    np.testing.assert_allclose(e.emb, ref, atol=1e-4)
    assert e.model["features"] == {"features": "backbone", "arch": "resnet18", "weights": str(tmp_path / "r18.pth"),
                                   "embedding_dim": 512}
    assert e.model["preprocessing"]["image_size"] == 32 and e.model["preprocessing"]["cache_size"] == 32
    with pytest.raises(UserError, match="holds resnet18 weights, but the model is resnet34"):
        gen("--features", "backbone", "--arch", "resnet34", "--weights", tmp_path / "r18.pth", "--data-dir",
            tiny_imagenet, "--splits", "train", "--train-output", tmp_path / "x.npz")


def test_small_cnn_backbone_features_refuse_imagenet_and_take_no_weights(tmp_path, tiny_imagenet):
    out = tmp_path / "train.npz"
    flags = ["--features", "backbone", "--arch", "small-cnn", "--image-size", 32, "--data-dir", tiny_imagenet,
             "--splits", "train", "--train-output", out]
    with pytest.raises(UserError, match="no ImageNet weights for small-cnn"):
        gen(*flags)  # --weights imagenet is the default
    assert not out.exists()
    gen(*flags, "--weights", "none")
    e = read_embeddings(out, progress=False)
    assert e.dim == 256 and e.model["features"]["arch"] == "small-cnn"
    np.testing.assert_allclose(np.linalg.norm(e.emb, axis=1), 1.0, atol=1e-5)


def test_feature_flags_that_do_not_fit_are_clear_errors(tmp_path, tiny_imagenet):
    out = tmp_path / "t.npz"
    with pytest.raises(UserError, match="--model goes with --features model"):
        gen("--features", "pixels", "--model", tmp_path / "m.model", "--data-dir", tiny_imagenet, "--train-output", out)
    with pytest.raises(UserError, match="--image-size go with --features pixels or backbone"):
        gen("--image-size", 32, "--data-dir", tiny_imagenet, "--train-output", out)
    with pytest.raises(UserError, match="--arch and --weights go with --features backbone"):
        gen("--features", "pixels", "--weights", "none", "--data-dir", tiny_imagenet, "--train-output", out)
    assert not out.exists()
