"""Gradient accumulation in which every row (or token) of an optimizer step weighs the same.

An optimizer step takes ``gradient_accumulation_steps`` micro-batches on each of P processes (the
last step of an epoch may take fewer, and a process's micro-batches may hold different numbers of
tokens). Its loss is the mean over ALL the units (rows, or tokens for a per-token loss such as
SFT's) of the step::

    L = sum over processes p, micro-batches m of  loss_sum(p, m)  /  N,   N = sum of units(p, m)

Dividing each micro-batch's mean by the accumulation count instead (the usual recipe) weighs the
rows of a short micro-batch more. So the engine looks the step's micro-batches up first
(:func:`accumulation_windows`), counts their units, sums the counts over processes
(:func:`step_scale`, one all-reduce) and back-propagates ``mean(m) * units(m) * scale``.
``scale`` undoes the two averages applied later: accelerate's division by the accumulation count
(DeepSpeed's engine does the same division) and DDP/FSDP's mean over processes.

This module knows batches and an accelerator, nothing of methods or the engine's loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator, Sequence

import torch


def accumulation_windows(loader: Iterable[dict], size: int) -> Iterator[list[dict]]:
    """The micro-batches of ``loader`` in consecutive groups of ``size``, one group per optimizer
    step; the last group of an epoch may be shorter. Every process gets the same number of
    micro-batches from accelerate's prepared loader (``even_batches``), so groups line up."""
    window: list[dict] = []
    for batch in loader:
        window.append(batch)
        if len(window) == size:
            yield window
            window = []
    if window:
        yield window


def step_scale(units: Sequence[int], accelerator) -> float:
    """The factor for ``mean loss of a micro-batch * its units`` so that the step's gradient is
    the mean over all units of the step, on every process.

    ``units``: this process's units per micro-batch of the step. Returns
    ``G * P / N`` with G the accelerator's accumulation count (divided out again by
    ``accelerator.backward``), P processes (averaged again by DDP) and N the units of all
    processes (1 when there are none, so an empty step has zero gradient). With several
    processes this is a collective: every process must call it.
    """
    total = torch.tensor([float(sum(units))], dtype=torch.float64, device=accelerator.device)
    if accelerator.num_processes > 1:
        total = accelerator.reduce(total, reduction="sum")
    steps = accelerator.gradient_accumulation_steps
    return steps * accelerator.num_processes / max(float(total.item()), 1.0)


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
