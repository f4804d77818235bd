"""deepranking.progress: steady lines in a log file, forecasts, and the words they use.

The clock is time.perf_counter; tests that need time to pass replace it with a fake one, so
nothing here sleeps.
"""

from __future__ import annotations

import pytest

from deepranking import cli, progress


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(progress.time, "perf_counter", fake)
    return fake


def test_durations_and_rates_read_as_a_person_would_say_them():
    assert [progress.duration(s) for s in (42, 89.4, 26 * 60, 4.4 * 3600)] == ["42 s", "89 s", "26 min", "4.4 h"]
    assert progress.duration(float("inf")) == "unknown time"
    assert progress.rate(0.84, "step") == "0.84 s/step"
    assert progress.rate(1 / 820, "img") == "820 img/s"
    assert progress.rate(0.05, "step", slow=True) == "0.05 s/step"  # a bar keeps the style it started with
    assert progress.rate(1 / 2048, "B", scale=1024) == "2.00kB/s"


def test_a_forecast_times_the_updates_after_the_warm_up_once():
    reports = []
    f = progress.Forecast(lambda s, measured: reports.append((s, measured)), what="steps")
    for seconds in (9.0, 5.0, 1.0, 1.0, 1.0, 1.0, 2.0, 2.0, 7.0):  # the first two are start-up
        f.add(1, seconds)
    assert reports == [(8.0 / 6, "steps 3-8")]
    g = progress.Forecast(lambda s, measured: reports.append((s, measured)), what="batches")
    for seconds in (3.0,) * 8:  # 10 images per batch
        g.add(10, seconds)
    assert reports[-1] == (0.3, "batches 3-8")


def test_the_training_estimate_and_the_cpu_warning(monkeypatch):
    lines = progress.training_forecast(0.84, "steps 3-8", 1860, 5 * 1860, "5 epochs", 0.84 * 5 * 1860, on_cpu=True)
    assert lines[0] == "step time 0.84 s (measured over steps 3-8): epoch ≈ 26 min, run ≈ 2.2 h (5 epochs)"
    assert lines[1].startswith("warning: this run will take about 2.2 h more on the CPU; the recommended CPU recipe "
                               "in README.md")
    assert len(progress.training_forecast(0.84, "steps 3-8", 1860, 9300, "5 epochs", 7812, on_cpu=False)) == 1
    assert len(progress.training_forecast(0.1, "steps 3-8", 100, 500, "5 epochs", 50, on_cpu=True)) == 1
    monkeypatch.setattr(progress, "LONG_CPU_RUN_S", 10.0)
    assert len(progress.training_forecast(0.1, "steps 3-8", 100, 500, "5 epochs", 50, on_cpu=True)) == 2


def test_a_log_file_gets_a_line_every_interval(clock, capsys, monkeypatch):
    monkeypatch.setattr(progress, "STEADY_INTERVAL_S", 60.0)
    bar = cli.progress(range(700), desc="epoch 1/5", unit="step", left_label="left in epoch")  # stderr: not a tty
    steps = iter(bar)
    for _ in range(50):  # 50 steps of 1 s: no line before 60 s
        next(steps)
        clock.now += 1.0
    assert capsys.readouterr().err == ""
    for i in range(70):
        next(steps)
        clock.now += 0.84 if i >= 10 else 1.0
        if i == 30:
            bar.set_postfix(loss="0.41", refresh=False)
    err = capsys.readouterr().err.splitlines()
    # the first line after 60 s (step 60, 1 s each); the next 60 s after it (step 132, 0.84 s each)
    assert err[0] == "epoch 1/5: step 60/700 (9%), 1 s/step, 11 min left in epoch"
    assert len(err) == 1
    for _ in range(30):
        next(steps)
        clock.now += 0.84
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and err[0].startswith("epoch 1/5: step 132/700 (19%), 0.84 s/step, 8 min left in epoch, "
                                               "loss 0.41"), err
    bar.close()


def test_a_terminal_gets_the_bar_and_no_lines(clock, capsys, monkeypatch):
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    monkeypatch.setattr(progress, "STEADY_INTERVAL_S", 0.0)
    with cli.progress(total=10, desc="embedding", unit="img") as bar:
        for _ in range(10):
            clock.now += 1
            bar.update(1)
    assert "embedding: img" not in capsys.readouterr().err


def test_disabled_shows_nothing_but_still_forecasts(clock, capsys, monkeypatch):
    monkeypatch.setattr(progress, "STEADY_INTERVAL_S", 0.0)
    with cli.progress(total=100, desc="embedding", unit="img", enabled=False,
                      forecast=progress.loop_forecast("embedding", 100, "img")) as bar:
        for _ in range(10):
            clock.now += 0.5
            bar.update(10)
    assert capsys.readouterr().err.splitlines() == [
        "embedding: 20 img/s (measured over batches 3-8): ≈ 5 s for 100 img"]
