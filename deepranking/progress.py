"""How far a long loop has come and how long it will take, on a terminal or in a log file.

:class:`Progress` (what ``cli.progress`` returns) is a tqdm bar on stderr when stderr is a
terminal; otherwise (output redirected to a log file, a batch job) the bar is off and a plain
line is printed every :data:`STEADY_INTERVAL_S` seconds instead, so that a log shows movement::

    epoch 1/5: step 120/700 (17%), 0.84 s/step, 8 min left in epoch, loss 0.4100

A :class:`Forecast` handed to a Progress times a few of its updates once, after the warm-up
ones (:data:`FORECAST_UPDATES`), and reports the measured rate: train_net.py turns it into its
epoch and run estimate (:func:`training_forecast`), the embedding loop into the time it will
take (:func:`loop_forecast`). Everything is measured with ``time.perf_counter`` between updates:
no device synchronisation, so a GPU's work shows up in the updates that wait for it.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Callable, Iterable

# Seconds between progress lines when stderr is not a terminal (a log file). A module constant
# rather than a flag: the tests set it tiny.
STEADY_INTERVAL_S = 60.0
# A forecast times updates FIRST+1 .. LAST: the first ones pay for start-up (allocations,
# DataLoader workers, cuDNN autotuning) and would inflate the estimate.
FORECAST_UPDATES = (2, 8)
# A CPU training run forecast to last longer than this names the recommended CPU recipe.
LONG_CPU_RUN_S = 2 * 3600.0
CPU_RECIPE_HINT = ("the recommended CPU recipe in README.md (small-cnn at 32 px, trained from scratch) "
                   "gives a useful model in minutes on a CPU")


def say(line: str) -> None:
    """Print a line on stderr without breaking a tqdm bar drawn there."""
    from tqdm import tqdm

    tqdm.write(line, file=sys.stderr)


def duration(seconds: float) -> str:
    """'42 s', '26 min', '4.4 h'."""
    if not math.isfinite(seconds):
        return "unknown time"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 90 * 60:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _number(x: float) -> str:
    """Two significant digits below 10, whole numbers above: 0.84, 0.012, 3.1, 42."""
    return f"{x:.0f}" if x >= 10 else f"{x:.2g}"


def rate(seconds_per_unit: float, unit: str, scale: int | None = None, slow: bool | None = None) -> str:
    """'0.84 s/step' for slow units (``slow``; default: 0.1 s or more each), '820 img/s' for fast
    ones; with ``scale`` (tqdm's unit_divisor) '1.2MB/s'."""
    if seconds_per_unit <= 0 or not math.isfinite(seconds_per_unit):
        return f"? {unit}/s"
    if scale is not None:
        from tqdm import tqdm

        return f"{tqdm.format_sizeof(1 / seconds_per_unit, divisor=scale)}{unit}/s"
    if seconds_per_unit >= 0.1 if slow is None else slow:
        return f"{_number(seconds_per_unit)} s/{unit}"
    return f"{_number(1 / seconds_per_unit)} {unit}/s"


class Forecast:
    """Times updates FIRST+1 .. LAST of one or more Progress bars (FORECAST_UPDATES) and calls
    ``report(seconds_per_unit, measured)`` once, ``measured`` naming them ('steps 3-8').

    Only the time inside bars counts (each update's time since the previous update of its bar,
    or since the bar opened), so a forecast carried over several training epochs leaves out what
    happens between them (validation, checkpoints).
    """

    def __init__(self, report: Callable[[float, str], None], what: str = "steps",
                 updates: tuple[int, int] | None = None):
        self.report, self.what = report, what
        self.first, self.last = updates or FORECAST_UPDATES
        self.updates, self.seconds, self.units = 0, 0.0, 0
        self.done = False

    def add(self, units: int, seconds: float) -> None:
        """One update of ``units`` that took ``seconds``."""
        if self.done:
            return
        self.updates += 1
        if self.updates > self.first:
            self.seconds += seconds
            self.units += units
        if self.updates == self.last and self.units > 0:
            self.done = True
            self.report(self.seconds / self.units, f"{self.what} {self.first + 1}-{self.last}")


def loop_forecast(desc: str, total: int, unit: str, what: str = "batches") -> Forecast:
    """A Forecast that says how long a loop over ``total`` units takes in all:
    'embedding: 820 img/s (measured over batches 3-8): ≈ 2 min for 100000 img'."""
    def report(seconds_per_unit: float, measured: str) -> None:
        say(f"{desc}: {rate(seconds_per_unit, unit)} (measured over {measured}): "
            f"≈ {duration(seconds_per_unit * total)} for {total} {unit}")
    return Forecast(report, what)


def training_forecast(seconds_per_step: float, measured: str, steps_per_epoch: int, run_steps: int, scope: str,
                      seconds_left: float, on_cpu: bool) -> list[str]:
    """The estimate train_net.py prints once its step time is measured, and, for a CPU run with
    more than LONG_CPU_RUN_S left, a warning naming the CPU recipe.

    ``run_steps``: the steps the whole run will take (``scope`` says why: '5 epochs',
    '--max-steps 100'); ``seconds_left``: this process's remaining training time, as the
    caller bounds it (--time-limit).
    """
    lines = [f"step time {_number(seconds_per_step)} s (measured over {measured}): "
             f"epoch ≈ {duration(seconds_per_step * steps_per_epoch)}, "
             f"run ≈ {duration(seconds_per_step * run_steps)} ({scope})"]
    if on_cpu and seconds_left > LONG_CPU_RUN_S:
        lines.append(f"warning: this run will take about {duration(seconds_left)} more on the CPU; "
                     f"{CPU_RECIPE_HINT}")
    return lines


class Progress:
    """A tqdm bar on a terminal, or a line every STEADY_INTERVAL_S in a log; optionally a Forecast.

    Used as tqdm is: iterate over it, or ``update(n)``; ``set_postfix``, ``close``, ``with``.
    ``enabled=False`` shows nothing, but a ``forecast`` is still timed and reported.
    ``left_label`` ends the time-left part of a line ('left in epoch').
    """

    def __init__(self, iterable: Iterable | None = None, total: int | None = None, initial: int = 0,
                 desc: str = "", unit: str = "it", enabled: bool = True, forecast: Forecast | None = None,
                 left_label: str = "left", **tqdm_kwargs):
        from tqdm import tqdm

        terminal = sys.stderr.isatty()
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self._bar = tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit,
                         disable=not (enabled and terminal), dynamic_ncols=True, file=sys.stderr, **tqdm_kwargs)
        self._iterable = iterable
        self.total, self.n, self._initial, self.desc, self.unit = total, initial, initial, desc, unit
        self._scale = tqdm_kwargs.get("unit_divisor", 1000) if tqdm_kwargs.get("unit_scale") else None
        self._lines = enabled and not terminal
        self._forecast, self._left_label = forecast, left_label
        self._postfix: dict = {}
        self._interval = STEADY_INTERVAL_S
        self._slow: bool | None = None  # s/unit or units/s: chosen at the first line, then kept
        now = time.perf_counter()
        self._started, self._last_update = now, now
        self._line_at, self._line_n = now, initial  # the last steady line (or the start)

    def __iter__(self):
        for item in self._bar:  # tqdm counts its own
            yield item
            self._advance(1)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self._bar.update(n)
        self._advance(n)

    def set_postfix(self, refresh: bool = True, **values) -> None:
        self._postfix.update(values)
        self._bar.set_postfix(refresh=refresh, **values)

    def close(self) -> None:
        self._bar.close()

    def _advance(self, n: int) -> None:
        now = time.perf_counter()
        self.n += n
        if self._forecast is not None:
            self._forecast.add(n, now - self._last_update)
        self._last_update = now
        if self._lines and now - self._line_at >= self._interval:
            say(self.line(now))
            self._line_at, self._line_n = now, self.n

    def _count(self, n: float) -> str:
        if self._scale is not None:
            from tqdm import tqdm

            return tqdm.format_sizeof(n, divisor=self._scale)
        return str(int(n))

    def line(self, now: float | None = None) -> str:
        """The steady line: 'epoch 1/5: step 120/700 (17%), 0.84 s/step, 8 min left in epoch, loss 0.41'.

        The rate is that since the previous line (since the start when nothing moved since)."""
        now = time.perf_counter() if now is None else now
        done, seconds = self.n - self._line_n, now - self._line_at
        if done <= 0:  # nothing finished since the last line: the rate since the start
            done, seconds = self.n - self._initial, now - self._started
        head = f"{self.desc}: " if self.desc else ""
        where = f"{self.unit} {self._count(self.n)}"
        if self.total:
            where += f"/{self._count(self.total)} ({self.n / self.total:.0%})"
        parts = [head + where]
        if done > 0:
            per_unit = seconds / done
            self._slow = per_unit >= 0.1 if self._slow is None else self._slow
            parts.append(rate(per_unit, self.unit, self._scale, self._slow))
            if self.total:
                parts.append(f"{duration(per_unit * max(self.total - self.n, 0))} {self._left_label}")
        else:
            parts.append(f"none done in {duration(now - self._started)}")
        parts += [f"{k} {v}" for k, v in self._postfix.items()]
        return ", ".join(parts)
