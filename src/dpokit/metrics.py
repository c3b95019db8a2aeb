"""Per-step metrics: pooled over micro-batches and processes by counts, written as JSON lines."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit import jsonl

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class Pooled:
    """A metric over some of a micro-batch's rows (or tokens): their ``total`` and ``count``.

    Pooled over micro-batches and processes as sums and counts, so the logged value is the mean
    over every such row of the step, however the rows fell into micro-batches (a plain mean per
    micro-batch would weigh a micro-batch with one desirable example like one with ten).
    """

    total: torch.Tensor | float  # 0-d: the sum of the values
    count: torch.Tensor | float  # 0-d: how many values (0: none in this micro-batch)

    @classmethod
    def where(cls, values: torch.Tensor, mask: torch.Tensor) -> Pooled:
        """The ``(B,)`` ``values`` where the ``(B,)`` bool ``mask`` is set (detached)."""
        return cls(values.detach()[mask].double().sum(), mask.sum())

    def item(self) -> float:
        """This micro-batch's mean (NaN without values): what a plain metric would be."""
        count = float(self.count)
        return float(self.total) / count if count else math.nan


@dataclass(frozen=True)
class Difference:
    """A metric logged as ``mean(first) - mean(second)`` of two pooled metrics of the step (KTO's
    reward margin: desirable mean minus undesirable mean); left out when either has no rows."""

    first: str
    second: str


class MetricAverager:
    """Pools detached scalars over the micro-batches of one optimizer step (and over processes).

    :meth:`add` takes a micro-batch's metrics: a plain scalar is that micro-batch's mean over its
    ``count`` rows (weighted by them); a :class:`Pooled` brings its own sum and count; a
    :class:`Difference` is worked out from two pooled means at the end. A plain NaN means "this
    micro-batch cannot measure it" and is left out. A metric measured on no row of the step is
    left out of the record (never written as NaN).
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, float] = defaultdict(float)
        self.differences: dict[str, Difference] = {}

    def add(self, metrics: dict, count: float = 1) -> None:
        """Add one micro-batch's metrics; ``count``: the rows a plain scalar is a mean over.
        ``count=0`` (a filler micro-batch, :mod:`dpokit.accumulation`) adds the names only, so
        that a process whose step had no rows still joins :meth:`mean`'s all-reduce in step."""
        for name, value in metrics.items():
            if isinstance(value, Difference):
                self.differences[name] = value
                continue
            self.counts[name] += 0  # every process must know every name (collective below)
            if not count:
                continue
            if isinstance(value, Pooled):
                total, weight = float(value.total), float(value.count)
            else:
                total, weight = float(value) * count, float(count)
            if weight and not math.isnan(total):
                self.sums[name] += total
                self.counts[name] += weight

    def mean(self, accelerator=None) -> dict[str, float]:
        """Pooled means over micro-batches and processes (every process must call it); resets."""
        names = sorted(self.counts)
        stats = torch.tensor(
            [[self.sums[n], self.counts[n]] for n in names], dtype=torch.float64
        ).reshape(len(names), 2)
        if accelerator is not None and accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        record = {
            name: total / count
            for name, (total, count) in zip(names, stats.tolist(), strict=True)
            if count > 0  # measured nowhere in this step: left out
        }
        for name, difference in sorted(self.differences.items()):
            if difference.first in record and difference.second in record:
                record[name] = record[difference.first] - record[difference.second]
        self.sums.clear()
        self.counts.clear()
        self.differences.clear()
        return record


class MetricsWriter:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict) -> None:
        """Append ``record`` as one JSON line (main process only)."""
        if not self.enabled:
            return
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(jsonl.dumps_line(record))

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for _, line in jsonl.iter_lines(self.path.read_bytes(), strict=False)
            if (record := _parse(line)) is not None and record.get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept), encoding="utf-8")


def _parse(line: str) -> dict | None:
    """One record, or None for a blank line or the half line a killed process left behind."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


def read_metrics(run_dir: str | Path) -> list[dict]:
    """The records of ``run_dir/metrics.jsonl``, in order (:mod:`dpokit.jsonl`; the half line a
    killed run left at the end is skipped). Raises ``OSError`` when the file cannot be read and
    :class:`~dpokit.jsonl.JsonlError` naming a broken line."""
    return jsonl.read(Path(run_dir) / METRICS_FILE, partial_tail=True)
