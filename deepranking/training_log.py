"""What training reports: running statistics kept on the device, and ``metrics.jsonl``.

The per-step statistics (see ``deepranking.losses``) are (sum, count) tensors on the
training device; :class:`RunningStats` adds them up there and reads them back (one
CPU<->GPU sync) only when a log line or an epoch summary is written.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch

from deepranking.argtypes import is_count
from deepranking.cli import UserError, warn
from deepranking.file_io import atomic_write_text

METRICS_NAME = "metrics.jsonl"


class RunningStats:
    """Per-key sums and counts of the step statistics since the last reset.

    Each key is averaged over the steps (or triplets) that reported it: a batch-hard
    step with no usable anchor adds a count of 0 to the distances.
    """

    def __init__(self):
        self.sums: dict[str, torch.Tensor | float] = {}
        self.counts: dict[str, torch.Tensor | float] = {}

    def reset(self) -> None:
        self.sums, self.counts = {}, {}

    def add(self, stats: dict) -> None:
        """stats: name -> (sum, count), tensors or numbers; no sync."""
        for k, (s, c) in stats.items():
            self.sums[k] = self.sums.get(k, 0.0) + s
            self.counts[k] = self.counts.get(k, 0.0) + c

    def totals(self) -> dict[str, tuple[float, float]]:
        """name -> (sum, count) as Python floats (the one sync)."""
        keys = sorted(self.sums)
        if not keys:
            return {}
        values = torch.stack([torch.as_tensor(v, dtype=torch.float64).detach().cpu().reshape(())
                              for k in keys for v in (self.sums[k], self.counts[k])]).tolist()
        return {k: (values[2 * i], values[2 * i + 1]) for i, k in enumerate(keys)}

    def means(self) -> dict[str, float]:
        return {k: s / c if c else math.nan for k, (s, c) in self.totals().items()}

    def state(self) -> dict:
        """Plain values for a checkpoint (an exact resume restores the half-finished window)."""
        return {k: [s, c] for k, (s, c) in self.totals().items()}

    def load_state(self, state: dict) -> None:
        self.sums = {k: float(v[0]) for k, v in state.items()}
        self.counts = {k: float(v[1]) for k, v in state.items()}


class MetricsLog:
    """Appends one JSON record per line to ``metrics.jsonl`` (rank 0 only)."""

    def __init__(self, path: Path, enabled: bool):
        self.path, self.enabled = Path(path), enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        try:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write {self.path}: {exc.strerror or exc}")

    def records(self) -> list[dict]:
        """Every complete record; a line cut short by a kill or a full disk is skipped with a warning."""
        if not self.path.exists():
            return []
        out = []
        try:
            lines = self.path.read_text(encoding="utf-8", errors="replace").splitlines()
        except OSError as exc:
            raise UserError(f"cannot read {self.path}: {exc.strerror or exc}")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if not isinstance(record, dict):
                warn(f"{self.path}: line {number} is not a complete record (cut short by a kill?); skipped")
                continue
            step = record.get("step", 0)
            if not is_count(step):  # a resume orders records by it
                warn(f"{self.path}: line {number} has no valid step ({step!r}); skipped")
                continue
            out.append(record)
        return out

    def truncate_after(self, step: int) -> None:
        """A resume from step ``step``: drop the records a killed run wrote after its checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = [r for r in self.records() if r.get("step", 0) <= step]
        atomic_write_text(self.path, "".join(json.dumps(r) + "\n" for r in kept))
