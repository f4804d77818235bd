"""README.md's commands, run as written on the bundled sample.

Every ```bash, ```sh and ```console block of README.md is taken in document order (in a console block,
the lines starting with ``$ ``), and each command in it runs in one temporary folder. The folder starts
with the files a reader brings, made from the bundled Fashion-MNIST sample (``make_sample_data.py``):

* ``photos/``: a plain folder of class folders (the train images of three sample classes);
* ``new_photo.jpg`` and ``other_photo.jpg``: two val images of those classes.

TinyImageNet itself is not provided: the README's own ``make_sample_data.py --output tiny-imagenet-200``
command writes the sample in its layout.

A command is ``python PROGRAM.py ARGS``: PROGRAM.py at the repository root, run in this process as
``python PROGRAM.py`` runs it (``runpy`` with ``__name__ == "__main__"``), ARGS split as a POSIX shell
splits them (quotes and ``#`` comments; no globbing, so a glob meant for the program is quoted in the
README, as it must be for the shell too). It must exit with status 0. The one substitution:

    every train_net.py command gets TINY_TRAINING appended:
    --arch small-cnn --weights none --image-size 32 --embedding-dim 16 --epochs 1 --num-workers 0

argparse keeps the last value of a repeated flag, so these override the README's own values: a small net
from scratch (no ImageNet download), one epoch. Everything else (every other flag, every default, every
file name one command leaves for the next) is the programs' own, so a renamed flag or a changed default
breaks this test. A comment ``# -> FILE, FILE`` after a command names outputs (words inside parentheses
aside) that must exist once it has run.

A block preceded by ``<!-- not run: REASON -->`` (a GPU, several GPUs, a download, package installs) is
checked instead of run: for ``python PROGRAM.py ARGS`` and ``torchrun [OPTIONS] PROGRAM.py ARGS``, the
program exists and its ``get_args_parser()`` accepts ARGS; for ``make TARGET``, the Makefile has the target.
Any other command in a block fails the test: README commands stay ones this test can check.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import re
import runpy
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO

README = REPO / "README.md"
TINY_TRAINING = ["--arch", "small-cnn", "--weights", "none", "--image-size", "32", "--embedding-dim", "16",
                 "--epochs", "1", "--num-workers", "0"]
PHOTO_CLASSES = ("fm5_sandal", "fm7_sneaker", "fm9_ankle_boot")
FENCE = re.compile(r"^```(bash|sh|console)[ \t]*\n(.*?)^```[ \t]*$", re.M | re.S)
NOT_RUN = re.compile(r"<!--\s*not run:\s*(.+?)\s*-->\s*\Z", re.S)
OUTPUT_NAME = re.compile(r"^[\w.<>/-]+(/|\.(csv|txt|model|npy|npz|png|json))$")


@dataclass
class Command:
    argv: list[str]
    outputs: list[str]  # files named after "# ->"
    line: int  # in README.md
    run: bool  # False: check only
    reason: str  # why not run

    def __str__(self) -> str:
        return f"README.md line {self.line}: {shlex.join(self.argv)}"


def readme_commands(text: str) -> list[Command]:
    """Every command of every shell block, in document order."""
    commands = []
    for block in FENCE.finditer(text):
        before = text[:block.start()].rstrip()
        marker = NOT_RUN.search(before[before.rfind("\n") + 1:] if "\n" in before else before)
        first_line = text.count("\n", 0, block.start(2)) + 1
        lines = block.group(2).split("\n")
        if block.group(1) == "console":  # prompts are commands, the rest is output
            lines = [line[2:] if line.startswith("$ ") else "" for line in lines]
        joined, start = "", None
        for number, line in enumerate(lines, first_line):
            if not joined.strip():
                start = number
            joined += line
            if joined.endswith("\\"):
                joined = joined[:-1] + " "
                continue
            if joined.strip():
                commands.append(parse_command(joined, start, marker))
            joined = ""
    return commands


def parse_command(line: str, number: int, marker) -> Command:
    code, _, comment = line.partition(" #")
    argv = shlex.split(code, comments=True)
    outputs = []
    if "->" in comment:
        named = re.sub(r"\([^)]*\)", " ", comment.split("->", 1)[1])
        outputs = [word for word in re.split(r"[\s,]+", named) if OUTPUT_NAME.match(word)]
    return Command(argv, outputs, number, marker is None, marker.group(1) if marker else "")


def program_args(command: Command) -> tuple[str, list[str]]:
    """(PROGRAM.py, ARGS) of a python or torchrun command; fails the test for anything else."""
    argv = command.argv
    if argv[0] == "torchrun" and not command.run:
        scripts = [i for i, word in enumerate(argv) if word.endswith(".py")]
        assert scripts, f"{command}: torchrun without a program"
        argv = ["python", *argv[scripts[0]:]]
    assert argv[0] == "python" and len(argv) > 1, (
        f"{command}: README blocks hold `python PROGRAM.py ...` commands"
        + (", `make TARGET` and `torchrun ... PROGRAM.py` in not-run blocks" if not command.run else ""))
    for word in argv:
        assert word not in {"&&", "||", "|", ";", ">", "<", "&"}, f"{command}: one command a line, no shell operators"
    program = argv[1]
    assert "/" not in program and (REPO / program).is_file(), f"{command}: no program {program} in the repository"
    return program, argv[2:]


def check_parses(command: Command) -> None:
    """A command that is not run: its program exists and accepts its arguments."""
    if command.argv[0] == "make":
        targets = re.findall(r"^([\w.-]+)\s*:", (REPO / "Makefile").read_text(encoding="utf-8"), re.M)
        assert len(command.argv) == 2 and command.argv[1] in targets, f"{command}: no such make target"
        return
    program, args = program_args(command)
    parser = importlib.import_module(program[:-3]).get_args_parser()
    reason = io.StringIO()
    try:
        with contextlib.redirect_stderr(reason):
            parser.parse_args(args)
    except SystemExit:
        pass
    assert not reason.getvalue(), f"{command}: {program} refuses these arguments\n{reason.getvalue()}"


def run_command(command: Command, capsys) -> None:
    """Run the command's program in this process, exactly as `python PROGRAM.py ARGS` would."""
    program, args = program_args(command)
    if program == "train_net.py":
        args = [*args, *TINY_TRAINING]
    saved = sys.argv
    sys.argv = [str(REPO / program), *args]
    try:
        runpy.run_path(str(REPO / program), run_name="__main__")
        status = 0
    except SystemExit as exc:
        status = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = saved
    out, err = capsys.readouterr()
    assert status == 0, f"{command}\nexit status {status}\n{out[-2000:]}\n{err[-3000:]}"
    missing = [name for name in command.outputs if not Path(name).exists()]
    assert not missing, f"{command}: the README says it writes {missing}, which are not there\n{out[-2000:]}"


def bring_user_files(sample: Path, work: Path) -> None:
    """photos/ (class folders) and two photos to search with, from the bundled sample."""
    for name in PHOTO_CLASSES:
        shutil.copytree(sample / "train" / name / "images", work / "photos" / name)
    val = {}
    for line in (sample / "val" / "val_annotations.txt").read_text().splitlines():
        image, label = line.split("\t")[:2]
        val.setdefault(label, sample / "val" / "images" / image)
    shutil.copy(val[PHOTO_CLASSES[0]], work / "new_photo.jpg")
    shutil.copy(val[PHOTO_CLASSES[1]], work / "other_photo.jpg")


def test_every_readme_command_runs_on_the_sample(tmp_path, monkeypatch, capsys):
    commands = readme_commands(README.read_text(encoding="utf-8"))
    assert sum(c.run for c in commands) >= 15 and sum(not c.run for c in commands) >= 5, commands
    sample, work = tmp_path / "sample", tmp_path / "work"
    work.mkdir()
    run_command(Command(["python", "make_sample_data.py", "--output", str(sample), "--train-per-class", "20",
                         "--val-per-class", "2", "--no-progress"], [], 0, True, ""), capsys)
    bring_user_files(sample, work)
    monkeypatch.chdir(work)
    for command in commands:
        if command.run:
            run_command(command, capsys)
        else:
            check_parses(command)


def github_anchor(heading: str) -> str:
    """The id GitHub gives a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


@pytest.mark.parametrize("name", ["README.md", "RESULTS.md"])
def test_links_and_pictures_resolve(name):
    source = REPO / name
    targets = re.findall(r"\]\(([^)\s]+)\)", source.read_text(encoding="utf-8"))
    assert targets
    for target in targets:
        if target.startswith(("http://", "https://")):
            continue
        path, _, anchor = target.partition("#")
        document = REPO / path if path else source
        assert document.exists(), f"{name} links to {target}: no such file"
        if anchor:
            headings = re.findall(r"^#+ (.+)$", document.read_text(encoding="utf-8"), re.M)
            assert anchor in {github_anchor(h) for h in headings}, f"{name} links to {target}: no such heading"
