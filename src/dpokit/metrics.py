"""Per-step metrics: averaged over micro-batches and processes, written as JSON lines."""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path

import torch

METRICS_FILE = "metrics.jsonl"


class MetricAverager:
    """Sums detached scalars over the micro-batches of one optimizer step."""

    def __init__(self) -> None:
        self.sums: dict[str, float] = defaultdict(float)
        self.count = 0

    def add(self, metrics: dict[str, torch.Tensor | float]) -> None:
        for name, value in metrics.items():
            self.sums[name] += float(value)
        self.count += 1

    def mean(self, accelerator=None) -> dict[str, float]:
        """Mean over micro-batches, then over processes (every process must call it)."""
        names = sorted(self.sums)
        values = torch.tensor(
            [self.sums[n] / max(self.count, 1) for n in names], dtype=torch.float64
        )
        if accelerator is not None and accelerator.num_processes > 1:
            values = accelerator.reduce(values.to(accelerator.device), reduction="mean").cpu()
        self.sums.clear()
        self.count = 0
        return dict(zip(names, values.tolist(), strict=True))


class MetricsWriter:
    """Appends one JSON object per logged step to ``RUN_DIR/metrics.jsonl``."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / METRICS_FILE
        self.enabled = enabled

    def write(self, record: dict) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """On resume, drop records a killed run wrote after its last checkpoint."""
        if not self.enabled or not self.path.exists():
            return
        kept = [
            line
            for line in self.path.read_text().splitlines()
            if line.strip() and json.loads(line).get("step", 0) <= step
        ]
        self.path.write_text("".join(line + "\n" for line in kept))


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / METRICS_FILE
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
