"""Input files nobody named on the command line: used only where they belong with the named ones.

eval.py pairs a database with the test_embedding.txt beside it only when both come from the same
model and dataset; without one, a dataset with no val split is evaluated leave-one-out (one line
says so) and anything else is refused with one line naming the flag to pass. gen_embeddings.py
names the default checkpoint it uses, or the flag to pass. The other programs have no default
input files. The embedding files here are real gen_embeddings.py outputs (raw-pixel rows: no
checkpoint needed; two pixel sizes are two models).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

import eval as eval_script
import gen_embeddings
import get_distance
import query
import update_database
from deepranking import cli

EVAL_FLAGS = ["--k", "2", "--no-progress", "--num-demo-queries", "0"]


def gen(data: Path, size: int, *extra) -> None:
    """gen_embeddings.py --features pixels in the current folder (default output names unless given)."""
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(
        ["--features", "pixels", "--image-size", str(size), "--data-dir", str(data), "--device", "cpu",
         "--no-progress", *map(str, extra)]))


def evaluate(capsys, *argv) -> tuple[int, str, str]:
    """eval.py through cli.run: (exit status, its stdout, its stderr)."""
    capsys.readouterr()  # what came before is not eval's
    with pytest.raises(SystemExit) as exc:
        cli.run(eval_script.main, eval_script.get_args_parser(), [*map(str, argv), *EVAL_FLAGS])
    captured = capsys.readouterr()
    return exc.value.code, captured.out, captured.err


def evaluated(capsys, *argv) -> tuple[dict, str]:
    """eval.py run to success: (its metrics.json, its stderr)."""
    capsys.readouterr()
    eval_script.main(eval_script.get_args_parser().parse_args([*map(str, argv), *EVAL_FLAGS]))
    err = capsys.readouterr().err
    folder = Path(argv[list(argv).index("--output-dir") + 1]) if "--output-dir" in argv else Path("eval_results")
    return json.loads((folder / "metrics.json").read_text()), err


def test_a_plain_class_folder_is_evaluated_leave_one_out_beside_a_stale_test_file(tmp_path, monkeypatch, capsys,
                                                                                  tiny_imagenet, class_folder):
    monkeypatch.chdir(tmp_path)
    gen(tiny_imagenet, 32)  # an earlier pair in this folder: train_embedding.txt + test_embedding.txt
    gen(class_folder, 16, "--force")  # one's own data: a train split only, from another model
    err = capsys.readouterr().err
    assert ("not writing test_embedding.txt; the older test_embedding.txt there is left as it is, and eval.py "
            "will not pair it with this train_embedding.txt") in err
    metrics, err = evaluated(capsys)
    line = err.splitlines()[0]
    assert line.startswith("no test split for train_embedding.txt (test_embedding.txt comes from model ")
    assert ", not train_embedding.txt's model " in line
    assert line.endswith("): evaluating train_embedding.txt leave-one-out, each image querying the others "
                         "(--protocol self)")
    assert metrics["protocol"] == "self" and metrics["test_embeddings"] == "train_embedding.txt"
    assert metrics["num_test_queries"] == 18  # the class folder's images, not the stale file's val images
    # Without any test file at all, the same.
    Path("test_embedding.txt").unlink()
    metrics, err = evaluated(capsys, "--output-dir", "again")
    assert "no test split for train_embedding.txt (test_embedding.txt does not exist)" in err
    assert metrics["protocol"] == "self"


def test_a_stale_test_file_of_a_dataset_with_a_val_split_is_refused(tmp_path, monkeypatch, capsys, tiny_imagenet):
    monkeypatch.chdir(tmp_path)
    gen(tiny_imagenet, 32)
    gen(tiny_imagenet, 16, "--splits", "train", "--force")  # the database re-embedded, the queries not
    code, out, err = evaluate(capsys)
    assert code == 2 and len(err.splitlines()) == 1
    assert err.startswith("error: test_embedding.txt (the default --test-embeddings, beside train_embedding.txt) "
                          "comes from model ")
    assert err.rstrip().endswith("pass --test-embeddings FILE, the val split's embeddings from the same model, or "
                                 "--protocol self to evaluate train_embedding.txt leave-one-out")
    # --protocol self is that: the database, leave-one-out, said in one line
    metrics, err = evaluated(capsys, "--protocol", "self")
    assert "evaluating train_embedding.txt leave-one-out" in err and metrics["num_test_queries"] == 24


def test_a_named_database_elsewhere_never_takes_the_test_file_of_the_current_folder(tmp_path, monkeypatch, capsys,
                                                                                     tiny_imagenet):
    monkeypatch.chdir(tmp_path)
    gen(tiny_imagenet, 32)  # a matching pair right here ...
    Path("run").mkdir()
    gen(tiny_imagenet, 32, "--splits", "train", "--train-output", "run/train_embedding.txt")  # ... and a database
    code, out, err = evaluate(capsys, "--train-embeddings", "run/train_embedding.txt")
    assert code == 2 and err.strip() == (
        "error: run/test_embedding.txt (the default --test-embeddings, beside run/train_embedding.txt) does not "
        "exist: pass --test-embeddings FILE, the val split's embeddings from the same model, or --protocol self to "
        "evaluate run/train_embedding.txt leave-one-out")
    # the pair written together in run/ is found: the documented chain needs only --train-embeddings
    gen(tiny_imagenet, 32, "--train-output", "run/train_embedding.txt", "--test-output", "run/test_embedding.txt",
        "--force")
    metrics, err = evaluated(capsys, "--train-embeddings", "run/train_embedding.txt", "--output-dir", "run/eval")
    assert metrics["protocol"] == "split" and metrics["test_embeddings"] == "run/test_embedding.txt"
    assert metrics["num_test_queries"] == 9 and metrics["num_database"] == 24
    # leave-one-out on the named database itself, whatever lies beside it
    metrics, err = evaluated(capsys, "--protocol", "self", "--train-embeddings", "run/train_embedding.txt",
                             "--output-dir", "run/self")
    assert metrics["test_embeddings"] == "run/train_embedding.txt" and metrics["num_test_queries"] == 24


def test_a_named_test_file_takes_only_the_database_beside_it(tmp_path, monkeypatch, capsys, tiny_imagenet):
    monkeypatch.chdir(tmp_path)
    gen(tiny_imagenet, 32)
    Path("run").mkdir()
    gen(tiny_imagenet, 16, "--splits", "val", "--test-output", "run/test_embedding.txt")
    code, out, err = evaluate(capsys, "--test-embeddings", "run/test_embedding.txt")
    assert code == 2 and err.strip() == (
        "error: run/train_embedding.txt (the default --train-embeddings, beside run/test_embedding.txt) does not "
        "exist: pass --train-embeddings FILE, the train split's embeddings from the same model, or --protocol self "
        "to evaluate run/test_embedding.txt by itself")
    gen(tiny_imagenet, 32, "--splits", "train", "--train-output", "run/train_embedding.txt")  # another model
    code, out, err = evaluate(capsys, "--test-embeddings", "run/test_embedding.txt")
    assert code == 2 and "(the default --train-embeddings, beside run/test_embedding.txt) comes from model " in err
    assert ", not run/test_embedding.txt's model " in err and "pass --train-embeddings FILE" in err


def test_a_test_file_of_another_dataset_is_not_paired_even_from_the_same_model(tmp_path, monkeypatch, capsys,
                                                                                tiny_imagenet):
    from conftest import write_tiny_imagenet

    other = write_tiny_imagenet(tmp_path / "other")
    monkeypatch.chdir(tmp_path)
    gen(other, 32, "--splits", "val")  # test_embedding.txt of another dataset
    gen(tiny_imagenet, 32, "--splits", "train")  # the same pixel model
    code, out, err = evaluate(capsys)
    assert code == 2 and f"test_embedding.txt (the default --test-embeddings, beside train_embedding.txt) lists " \
                         f"images of another dataset ({other.resolve() / 'val'}, not beside train_embedding.txt's " \
                         f"{tiny_imagenet.resolve() / 'train'})" in err


def test_no_database_here_names_the_flag(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code, out, err = evaluate(capsys)
    assert code == 2 and err.strip() == ("error: no train_embedding.txt here (the default --train-embeddings): pass "
                                         "--train-embeddings FILE (gen_embeddings.py writes train_embedding.txt and "
                                         "test_embedding.txt)")


def test_gen_embeddings_names_the_default_checkpoint_or_the_flag(tmp_path, monkeypatch, capsys, class_folder):
    from test_gen_embeddings import make_checkpoint

    monkeypatch.chdir(tmp_path)
    (tmp_path / "run").mkdir()
    make_checkpoint(tmp_path / "run" / "deepranknet.model")  # where the CPU recipe's --output-dir run puts it
    args = ["--data-dir", str(class_folder), "--device", "cpu", "--no-progress"]
    with pytest.raises(cli.UserError) as exc:
        gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(args))
    assert str(exc.value) == ("no deepranknet.model in the current folder (the default --model; found "
                              "run/deepranknet.model): pass --model PATH, the checkpoint train_net.py wrote in its "
                              "--output-dir")
    (tmp_path / "run" / "deepranknet.model").rename(tmp_path / "deepranknet.model")
    gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(args))
    err = capsys.readouterr().err
    assert "model: deepranknet.model (the default --model; step 0, saved " in err
    with pytest.raises(cli.UserError, match=r"^dataset folder not found: tiny-imagenet-200 \(the default --data-dir"):
        gen_embeddings.main(gen_embeddings.get_args_parser().parse_args(["--device", "cpu", "--force"]))


@pytest.mark.parametrize("program, flags", [(query, ["--model", "--embeddings"]), (get_distance, ["--model"]),
                                            (update_database, ["--model", "--database"])])
def test_the_other_programs_take_no_input_file_by_default(program, flags):
    """query.py, get_distance.py and update_database.py read only files named on the command line
    (update_database.py's image folder defaults to the one its database records: its own)."""
    required = {a.option_strings[0] for a in program.get_args_parser()._actions if a.required and a.option_strings}
    assert set(flags) <= required
