"""argparse value types: each parses one command-line string or raises ``ArgumentTypeError``
(argparse prints it as a usage error, exit 2), so a bad flag fails before any work starts.

``p.add_argument("--epochs", type=argtypes.positive_int)``: ``seed``, ``positive_int``,
``non_negative_int``, ``positive_float``, ``non_negative_float``, ``bounded_int(low)``, ``fraction``,
``unit_interval`` and ``probability``. :func:`is_count` is the same check for a value already parsed:
a step or epoch read back from a checkpoint or a log record.
"""

from __future__ import annotations

import numpy as np

from deepranking.cli import arg_error

FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_SEED = 2**32 - 1  # numpy, torch and FAISS all take it (torch.manual_seed stops at 2**64 - 1)


def _bounded(convert, low: float, strict: bool, noun: str):
    """An argparse type: ``convert(value)``, finite and > low (``strict``) or >= low."""

    def parse(value: str):
        try:
            x = convert(value)
        except ValueError:
            raise arg_error(f"expected {noun}, got {value!r}")
        if not (np.isfinite(x) and (x > low if strict else x >= low)):
            raise arg_error(f"expected {noun}, got {value}")
        if convert is float and x > FLOAT32_MAX:  # the optimiser and losses compute in float32
            raise arg_error(f"expected {noun} below {FLOAT32_MAX:.3g}, got {value}")
        return x

    return parse


def is_count(value) -> bool:
    """A non-negative int (not a bool): a step or epoch as a checkpoint or log record holds it."""
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def seed(value: str) -> int:
    """argparse type: a seed, an integer in [0, 2**32 - 1]."""
    try:
        x = int(value)
    except ValueError:
        raise arg_error(f"expected a seed (an integer in [0, {MAX_SEED}]), got {value!r}")
    if not 0 <= x <= MAX_SEED:
        raise arg_error(f"expected a seed (an integer in [0, {MAX_SEED}]), got {value}")
    return x


positive_int = _bounded(int, 0, True, "a positive integer")  # >= 1
non_negative_int = _bounded(int, 0, False, "a non-negative integer")  # >= 0
positive_float = _bounded(float, 0.0, True, "a positive number")  # finite, > 0
non_negative_float = _bounded(float, 0.0, False, "a non-negative number")  # finite, >= 0


def bounded_int(low: int):
    """argparse type: an integer >= ``low`` (e.g. --image-size >= 32)."""
    return _bounded(int, low, False, f"an integer >= {low}")


def unit_interval(value: str) -> float:
    """argparse type: a float in [0, 1) (momentum)."""
    return fraction(value)


def fraction(value: str) -> float:
    """argparse type: a float in [0, 1)."""
    return _unit_float(value, "a fraction", include_one=False)


def probability(value: str) -> float:
    """argparse type: a float in [0, 1]."""
    return _unit_float(value, "a probability", include_one=True)


def _unit_float(value: str, what: str, include_one: bool) -> float:
    interval = f"[0, 1{']' if include_one else ')'}"
    try:
        x = float(value)
    except ValueError:
        raise arg_error(f"expected {what} in {interval}, got {value!r}")
    if not (0.0 <= x <= 1.0) or (x == 1.0 and not include_one):  # nan fails both comparisons
        raise arg_error(f"expected {what} in {interval}, got {value}")
    return x
