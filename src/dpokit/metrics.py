"""Per-step metrics: averaged over micro-batches and processes, written as JSON lines."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

import torch

from dpokit import jsonl

METRICS_FILE = "metrics.jsonl"


class MetricAverager:
    """Sums detached scalars over the micro-batches of one optimizer step.

    A NaN value means "this micro-batch cannot measure it" (KTO's mean reward of desirable
    examples in a batch without one) and is left out of that metric's mean; a metric no
    micro-batch measured is NaN.
    """

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        """Add one micro-batch's scalars (NaN values are left out of the means)."""
        for name, value in metrics.items():
            value = float(value)
            self.counts[name] += 0  # every process must know every name (collective below)
            if not math.isnan(value):
                self.sums[name] += value
                self.counts[name] += 1

    def mean(self, accelerator=None) -> dict[str, float]:
        """Mean over micro-batches and processes (every process must call it)."""
        names = sorted(self.counts)
        stats = torch.tensor(
            [[self.sums[n], float(self.counts[n])] for n in names], dtype=torch.float64
        ).reshape(len(names), 2)
        if accelerator is not None and accelerator.num_processes > 1:
            stats = accelerator.reduce(stats.to(accelerator.device), reduction="sum").cpu()
        values = stats[:, 0] / stats[:, 1]  # 0/0 = NaN: measured nowhere
        self.sums.clear()
        self.counts.clear()
        return dict(zip(names, values.tolist(), strict=True))


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
