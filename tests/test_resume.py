"""The training checkpoint contract (deepranking/resume.py) through train_net.py on tiny data:
resume compares every argument but MAY_DIFFER, a flag added to the parser is compared with no list to
update, and an output folder holding only an interrupted start is taken over by the same command."""

import json

import pytest

import train_net
from deepranking import checkpoint, cli, resume
from test_train_net import TINY, _one_thread, csvs, train  # noqa: F401  (fixtures: one torch thread, the CSVs)


def with_new_flag(parser_factory):
    """train_net's parser with one more trajectory-changing flag, as a later version might add."""
    def parser():
        p = parser_factory()
        p.add_argument("--new-knob", type=float, default=1.0, help="a flag no list mentions")
        return p
    return parser


def run_cli(capsys, argv) -> tuple[int, str]:
    with pytest.raises(SystemExit) as exc:
        cli.run(train_net.main, train_net.get_args_parser(), [str(a) for a in argv])
    return exc.value.code, capsys.readouterr().err


def test_a_flag_added_to_the_parser_is_compared_on_resume(csvs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(train_net, "get_args_parser", with_new_flag(train_net.get_args_parser))
    base = ["--triplets", csvs[0], "--epochs", 2, *TINY]
    train(*base, "--max-steps", 2, "--output-dir", tmp_path / "run")
    ckpt = tmp_path / "run" / "temp_0.model"
    assert checkpoint.load_checkpoint(ckpt)["args"]["new_knob"] == 1.0
    # the same resume with only the new flag changed is refused, naming it
    code, err = run_cli(capsys, [*base, "--new-knob", "2.5", "--resume", ckpt, "--output-dir", tmp_path / "run"])
    assert code == 2 and "resume with: --new-knob 1.0" in err, err
    assert checkpoint.load_checkpoint(ckpt)["step"] == 2  # nothing was trained or written
    # a checkpoint written before the flag existed trained as its default does
    old = checkpoint.load_checkpoint(ckpt)
    del old["args"]["new_knob"]
    checkpoint.write_checkpoint(tmp_path / "old" / "temp_0.model", old)
    code, err = run_cli(capsys, [*base, "--new-knob", "3", "--resume", tmp_path / "old" / "temp_0.model",
                                 "--output-dir", tmp_path / "old"])
    assert code == 2 and "resume with: --new-knob 1.0" in err, err
    train(*base, "--resume", tmp_path / "old" / "temp_0.model", "--output-dir", tmp_path / "old")
    assert checkpoint.load_checkpoint(tmp_path / "old" / "deepranknet.model")["step"] > 2


def test_arguments_that_may_differ_resume(csvs, tmp_path):
    base = ["--triplets", csvs[0], "--epochs", 2, *TINY]
    train(*base, "--max-steps", 2, "--output-dir", tmp_path)
    # cadence, workers and where the run stops change nothing that is trained
    train(*base, "--log-every", 3, "--save-every", 7, "--max-steps", 3, "--resume", tmp_path / "temp_0.model",
          "--output-dir", tmp_path)
    assert checkpoint.load_checkpoint(tmp_path / "temp_0.model")["step"] == 3


def test_may_differ_names_only_real_arguments():
    dests = set(resume.parser_defaults(train_net.get_args_parser()))
    assert set(resume.MAY_DIFFER) <= dests, set(resume.MAY_DIFFER) - dests
    # and what training must not change is compared: the optimiser, the loss, the data split, the seed
    assert not {"lr", "optim", "margin", "mining", "seed", "val_fraction", "amp", "batch_size"} & set(resume.MAY_DIFFER)


def test_differing_args_on_hand_made_records():
    p = train_net.get_args_parser()
    args = p.parse_args(["--lr", "0.01", "--epochs", "3"])
    assert resume.differing_args({"lr": 0.01, "epochs": 5}, args, p) == []  # epochs may differ (constant lr)
    assert resume.differing_args({"lr": 0.02}, args, p) == [("lr", 0.02)]
    assert resume.differing_args({"lr": 0.01, "gone_flag": 1}, args, p) == []  # a removed flag is not compared
    cosine = p.parse_args(["--lr", "0.01", "--epochs", "3", "--lr-schedule", "cosine"])
    assert resume.differing_args({"lr": 0.01, "epochs": 5, "lr_schedule": "cosine"}, cosine, p) == [("epochs", 5)]
    # missing from the record = the parser's default
    assert resume.differing_args({}, p.parse_args(["--margin", "0.5"]), p) == [("margin", 1.0)]


def test_an_interrupted_start_is_taken_over_by_the_same_command(csvs, tmp_path, capsys):
    out = tmp_path / "run"
    def command(max_steps):
        return ["--triplets", csvs[0], "--epochs", 1, "--max-steps", max_steps, *TINY, "--output-dir", out]

    train(*command(1))
    for ckpt in out.glob("*.model"):  # what a run killed before its first checkpoint leaves
        ckpt.unlink()
    (out / "metrics.jsonl").write_text("")
    capsys.readouterr()
    # another command is refused, the folder left as it was
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    code, err = run_cli(capsys, [*command(1), "--lr", "0.5"])
    assert code == 2 and "already exists from an earlier run" in err, err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # the same command (a different stop point is the same run) takes the folder over and says so
    train(*command(2))
    assert f"taking over {out}" in capsys.readouterr().err
    assert checkpoint.load_checkpoint(out / "temp_0.model")["step"] == 2
    assert json.loads((out / "config.json").read_text())["max_steps"] == 2
    # a folder with a checkpoint is never taken over
    code, err = run_cli(capsys, command(1))
    assert code == 2 and "--force" in err
