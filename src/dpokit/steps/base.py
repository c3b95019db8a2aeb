"""What a per-batch step is: the :class:`Procedure` the engine runs for one kind of data.

The engine calls ``procedure.batch_loss(context, batch)`` once per micro-batch and gets a
:class:`StepOutput` back; it never asks which method it trains. ("Step" in ``dpokit.steps`` is a
step of the engine's loop body, one micro-batch; the optimizer step is the engine's.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from dpokit.errors import ConfigError
from dpokit.losses import MethodSpec


@dataclass
class StepOutput:
    """What one micro-batch gives the engine.

    Attributes:
        loss: scalar, differentiable: the micro-batch's MEAN loss over its units
            (``Procedure.units(batch)``: rows, or tokens for a per-token loss). The engine turns
            it back into a sum and divides by the units of the whole optimizer step
            (:mod:`dpokit.accumulation`), so every unit of a step weighs the same.
        metrics: name -> detached 0-d tensor (a mean over the micro-batch's rows), or a
            :class:`~dpokit.metrics.Pooled` sum and count (a metric over some rows or over
            tokens), or a :class:`~dpokit.metrics.Difference`; pooled over micro-batches and
            processes by :class:`~dpokit.metrics.MetricAverager`.
        losses: ``(B,)`` detached per-example losses (B = pairs or examples of the batch).
        correct: ``(B,)`` bool: the example counts as ranked right (reward accuracy).
    """

    loss: torch.Tensor
    metrics: dict[str, torch.Tensor]
    losses: torch.Tensor
    correct: torch.Tensor


@dataclass
class StepContext:
    """What a per-batch step needs besides the batch; built once per split by the engine.

    Attributes:
        spec: the method's table entry (its ``compute`` gives the loss).
        hyperparameters: the method's hyperparameters (resolved or partial).
        policy: a :class:`~dpokit.logprobs.CompletionScorer`, possibly wrapped (DDP, FSDP).
        reference: anything with ``score(batch, return_hidden) -> ScoreOutput``, or None.
        policy_head, reference_head: the LM heads, for TDPO's token-level KL.
        chunk_size: tokens per chunk of the chunked LM head.
        accelerator: for collectives (e.g. KTO's cross-process reference point), or None.
        reward_baseline: for a method with a running reward baseline (BCO), the engine's view
            (:meth:`dpokit.steps.baseline.RewardBaselineHook.for_split`): called with the
            batch's LossInputs, it updates (training only) and returns the baseline; else None.
        filler: the batch is a filler (:mod:`dpokit.accumulation`): a process with no rows left
            in this slot of an uneven epoch runs it only to join the step's collectives; a step
            that pools rows across processes (KTO's z0, the reward baseline) counts none of it.
    """

    spec: MethodSpec
    hyperparameters: dict
    policy: torch.nn.Module
    reference: object | None
    policy_head: torch.nn.Module | None = None
    reference_head: torch.nn.Module | None = None
    chunk_size: int = 1024
    accelerator: object | None = None
    reward_baseline: Callable | None = None
    filler: bool = False


def batch_rows(batch: dict[str, torch.Tensor]) -> int:
    """The rows of a collated batch: its examples or pairs (``index`` ``(B,)``), not the 2B
    sequences of a pair batch. The unit of every per-row loss and of plain metrics."""
    return int(batch["index"].shape[0])


@dataclass(frozen=True)
class Procedure:
    """How the engine trains one kind of data.

    Attributes:
        prepare: ``(source, tokenizer, DataConfig, split) -> PreparedData``.
        collator: ``(pad_token_id) -> collate_fn``.
        batch_loss: ``(StepContext, batch) -> StepOutput``: one micro-batch's forward and loss.
        check: optional ``check(config, spec)``, called before anything loads: raise
            :class:`~dpokit.config.ConfigError` for a config this procedure cannot run.
        setup: optional ``setup(trainer)``, called once data and policy exist and before the
            data loaders are built (data warnings, extra columns such as SLiC's sampled targets).
        packed_collator: ``(pad_token_id, packing, packing_length, attention_cost=...)`` for
            ``config.packing`` other than ``"none"`` (:mod:`dpokit.data.packing`); None: this kind
            of data is collated one way only.
        units: ``(batch) -> int``: what ``batch_loss``'s loss is a mean over, known before the
            forward: the batch's rows (default, :func:`batch_rows`) or its completion tokens.
    """

    prepare: Callable
    collator: Callable
    batch_loss: Callable[[StepContext, dict], StepOutput]
    check: Callable | None = None
    setup: Callable | None = None
    packed_collator: Callable | None = None
    units: Callable[[dict], int] = batch_rows


def resolve_packing(config, spec, procedure) -> str:
    """The batch layout: ``config.packing`` where the procedure's data can be packed (``auto``:
    per batch the cheaper exact layout, see dpokit.data.packing), else ``none``."""
    if procedure.packed_collator is None:
        if config.packing not in ("auto", "none"):
            raise ConfigError(
                f"packing={config.packing} needs preference pairs; method {spec.name} trains on "
                f"{spec.data!r} data, collated one way only: use packing=none (or auto)"
            )
        return "none"
    return config.packing
