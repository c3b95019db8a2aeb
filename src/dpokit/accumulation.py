"""Gradient accumulation in which every row (or token) of an optimizer step weighs the same,
and every row of an epoch is trained exactly once, whatever the number of processes.

An optimizer step takes ``gradient_accumulation_steps`` micro-batches on each of P processes (the
last step of an epoch may take fewer, and a process's micro-batches may hold different numbers of
tokens). Its loss is the mean over ALL the units (rows, or tokens for a per-token loss such as
SFT's) of the step::

    L = sum over processes p, micro-batches m of  loss_sum(p, m)  /  N,   N = sum of units(p, m)

Dividing each micro-batch's mean by the accumulation count instead (the usual recipe) weighs the
rows of a short micro-batch more. So the engine looks the step's micro-batches up first
(:func:`accumulation_windows`), counts their units, sums the counts over processes
(:func:`step_totals`, one all-reduce) and back-propagates ``mean(m) * units(m) * scale``.
``scale`` undoes the two averages applied later: accelerate's division by the accumulation count
(DeepSpeed's engine does the same division) and DDP/FSDP's mean over processes.

Uneven epochs. The data loaders deal each batch to one process and repeat no row
(:func:`dpokit.distributed.uneven_batches`): with M batches in an epoch, process p gets batches
p, p + P, ... -- one fewer than process 0 when P does not divide M, none at all when M < P. Yet
every process must join every collective of a step (the all-reduces here and in the metrics, the
gradient all-reduce of DDP/FSDP, KTO's z0, a sharded forward). :func:`epoch_micro_batches` gives
every process the same ceil(M / P) *slots*: its own batches, then *fillers* -- a one-row batch run
through the same forward and backward with weight 0 (no units, no rows, no metrics), so the step
is the one-process step over exactly the epoch's rows.

This module knows batches and an accelerator, nothing of methods or the engine's loop.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass

import torch
from accelerate.utils import send_to_device


@dataclass(frozen=True)
class MicroBatch:
    """One slot of a process's epoch: a collated ``batch`` and whether it is ``real`` data
    (False: a filler that only joins the step's collectives; its rows count nowhere)."""

    batch: dict
    real: bool = True


def epoch_slots(batches: int, num_processes: int) -> int:
    """Micro-batch slots per process in an epoch of ``batches`` batches: ceil(batches / P)."""
    return math.ceil(batches / num_processes)


def epoch_feed(
    loader, batches: int, dataset, collate: Callable, accelerator
) -> Callable[[int], Iterator[MicroBatch]]:
    """``done -> the rest of this process's epoch`` (:func:`epoch_micro_batches`) of a loader
    prepared with ``even_batches=False`` from ``batches`` batches (the whole epoch's, before
    sharding) of ``dataset``; fillers are row 0 of ``dataset`` collated by ``collate``."""
    slots = epoch_slots(batches, accelerator.num_processes)
    filler = functools.partial(filler_batch, dataset, collate, accelerator.device)
    return functools.partial(
        epoch_micro_batches, loader, slots, filler=filler, accelerator=accelerator
    )


def filler_batch(dataset, collate: Callable, device) -> dict:
    """A filler's batch: row 0 of ``dataset`` collated by ``collate`` on ``device`` (any real
    row serves: its loss is multiplied by 0; one row keeps the extra forward cheap)."""
    return send_to_device(collate([dataset[0]]), device)


def epoch_micro_batches(
    loader, slots: int, done: int = 0, *, filler: Callable[[], dict], accelerator
) -> Iterator[MicroBatch]:
    """The rest of an epoch on this process, after ``done`` slots: its own batches of
    ``loader`` (accelerate-prepared with ``even_batches=False``), then fillers up to ``slots``.

    ``filler()`` builds a filler's batch (called only when one is needed). ``done`` counts the
    slots of a resumed epoch, fillers included (they come after every real batch).
    """
    own = len(loader)  # this process's batches in the epoch
    skip = min(done, own)
    if skip:
        loader = accelerator.skip_first_batches(loader, skip)
    if skip < own:
        for batch in loader:
            yield MicroBatch(batch)
    for _ in range(slots - max(done, own)):
        yield MicroBatch(filler(), real=False)


def accumulation_windows(loader: Iterable, size: int) -> Iterator[list]:
    """The micro-batches of ``loader`` in consecutive groups of ``size``, one group per optimizer
    step; the last group of an epoch may be shorter. Every process has the same number of slots
    (:func:`epoch_micro_batches`), so the groups of all processes line up."""
    window: list = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def process_sum(values: Sequence[float], accelerator) -> list[float]:
    """Each of ``values`` summed over all processes (float64, one all-reduce). With several
    processes this is a collective: every process must call it."""
    totals = torch.tensor(
        [float(v) for v in values], dtype=torch.float64, device=accelerator.device
    )
    if accelerator.num_processes > 1:
        totals = accelerator.reduce(totals, reduction="sum")
    return totals.tolist()


def step_totals(units: Sequence[int], rows: Sequence[int], accelerator) -> tuple[float, int]:
    """(scale, rows of the step over all processes), with ``scale`` the factor for ``mean loss
    of a micro-batch * its units`` so that the step's gradient is the mean over all units of the
    step, on every process.

    ``units``, ``rows``: this process's units and rows per micro-batch of the step (0 for a
    filler). ``scale`` is ``G * P / N`` with G the accelerator's accumulation count (divided out
    again by ``accelerator.backward``), P processes (averaged again by DDP) and N the units of
    all processes (1 when there are none, so an empty step has zero gradient). With several
    processes this is a collective (one all-reduce): every process must call it.
    """
    total_units, total_rows = process_sum([sum(units), sum(rows)], accelerator)
    steps = accelerator.gradient_accumulation_steps
    return steps * accelerator.num_processes / max(total_units, 1.0), int(total_rows)


@contextlib.contextmanager
def micro_batch_sync(accelerator, model: torch.nn.Module, last: bool):
    """Forward and backward of one micro-batch of a step: gradients are synchronised across
    processes only on the ``last`` one (``no_sync`` otherwise), and accelerate's gradient state
    says whether this backward ends the step (DeepSpeed steps on it).

    accelerate's own ``accumulate()`` decides that from the data loader's end, which reading a
    step's micro-batches ahead moves; it has no public setter, hence ``_set_sync_gradients``.
    The state is back to "synchronised" on exit, so ``optimizer.step``/``zero_grad`` act.
    """
    state = accelerator.gradient_state
    state._set_sync_gradients(last)
    try:
        with contextlib.nullcontext() if last else accelerator.no_sync(model):
            yield
    finally:
        state._set_sync_gradients(True)
