"""What one run returns (:class:`TrainResult`) and where its loop is (:class:`LoopState`)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.metrics import MetricAverager


@dataclass
class TrainResult:
    """What a run (or a recipe's chain of runs) returns.

    Attributes:
        output_dir: the run directory; final_dir: the saved model (``output_dir/final``).
        global_step: optimizer steps taken (all stages of a recipe, skipped ones included).
        history: the train/eval records of ``metrics.jsonl`` this call produced.
        skipped_batches: non-finite batches skipped (``nonfinite=skip``).
    """

    output_dir: Path
    final_dir: Path
    global_step: int
    history: list[dict] = field(default_factory=list)
    skipped_batches: int = 0


@dataclass
class LoopState:
    """Where the loop is: optimizer steps taken, epoch, micro-batch slots of the epoch consumed
    (fillers included, :mod:`dpokit.accumulation`), and what has been gathered since the last
    logged step (metrics, tokens, start time; ``rows``: the last step's rows, all processes)."""

    step: int
    epoch: int
    batches_done: int
    averager: MetricAverager = field(default_factory=MetricAverager)
    tokens: int = 0
    rows: int = 0
    tick: float = field(default_factory=time.perf_counter)
    history: list[dict] = field(default_factory=list)

    def train_record(self, accelerator, grad_norm, lr: float, skipped_batches: int) -> dict:
        """The ``metrics.jsonl`` record of the step just taken: the metrics pooled over its
        micro-batches and processes, its rows, grad norm, learning rate, skipped batches and
        tokens per second (all processes) since the last record."""
        seconds = max(time.perf_counter() - self.tick, 1e-9)
        return {
            "step": self.step,
            "split": "train",
            **self.averager.mean(accelerator),
            "rows": self.rows,  # of the step, all processes: each row once per epoch
            "grad_norm": float("nan") if grad_norm is None else float(grad_norm),
            "skipped_batches": skipped_batches,
            "lr": lr,
            "tokens_per_second": self.tokens * accelerator.num_processes / seconds,
        }
