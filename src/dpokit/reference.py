"""The reference model, three ways.

1. :class:`FrozenReference` - a separate frozen copy (the starting policy or ``--reference PATH``).
2. :class:`AdapterOffReference` - with LoRA, the policy itself with its adapter switched off: no
   second copy of the weights in memory.
3. :class:`PrecomputedReference` - sequence log-probs computed once before training, in eval mode,
   and cached on disk under a key that hashes the reference weights' identity, the dataset
   fingerprint and the tokenization settings; reused across runs, recomputed when any changes.
   Without ``--reference`` the table is scored by the policy itself before its first step
   (:class:`StartingPolicyReference`), each process scoring its shard of the rows.

All three answer ``score(batch, return_hidden)`` with the same :class:`~dpokit.logprobs.ScoreOutput`
the policy gives, under ``no_grad``, so the engine never asks which one it holds.
:func:`choose_reference_mode` picks one for a method and a config, and :class:`ReferenceBuilder`
builds it (one per data split) for the engine.
"""

from __future__ import annotations

import contextlib
import json
import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from dpokit.distributed import (
    log_sharded_plan,
    refuse_other_reference,
    refuse_separate_reference,
)
from dpokit.errors import NonFiniteError
from dpokit.logprobs import CompletionScorer, ScoreOutput, scorer_kwargs
from dpokit.modeling import build_scorer, load_model, loading_kwargs
from dpokit.reference_cache import (
    CacheKey,
    PrecomputedReference,
    default_cache_dir,
    load_cached,
    model_identity,
    save_cached,
)
from dpokit.sharding import shard_scorer

logger = logging.getLogger(__name__)


class NonFiniteReferenceError(NonFiniteError):
    """The reference scored NaN/inf log-probs while they were pre-computed; the message names the
    rows and whether the reference weights hold NaN/inf. Nothing is cached."""


@contextlib.contextmanager
def eval_mode(module: torch.nn.Module) -> Iterator[None]:
    """Dropout off for the duration (a reference is always scored deterministically)."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def score_batch(scorer, batch: dict[str, torch.Tensor], return_hidden: bool) -> ScoreOutput:
    """One scorer call on a collated batch (two-row or packed layout)."""
    return scorer(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),  # position ids; packed rows' layout
        return_hidden=return_hidden,
    )


class FrozenReference:
    """A separate frozen model, kept in eval mode with no gradients."""

    def __init__(self, scorer: CompletionScorer):
        self.scorer = scorer.eval().requires_grad_(False)

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor], return_hidden: bool = False) -> ScoreOutput:
        """Sequence log-probs ``(R,)`` of the batch's R rows (``input_ids`` ``(R, T)``), no grad."""
        return score_batch(self.scorer, batch, return_hidden)

    @property
    def lm_head(self) -> torch.nn.Module:
        """The reference model's LM head (TDPO's token-level KL)."""
        return self.scorer.model.get_output_embeddings()


class AdapterOffReference:
    """The LoRA policy with its adapter disabled: the base weights are the reference.

    ``runner`` is the module called to score (default: ``policy_scorer``). Under FSDP / ZeRO-3 it
    is the sharded wrapper, whose forward gathers the weights; under DDP the plain scorer, so the
    reference forward runs no collective.
    """

    def __init__(self, policy_scorer: CompletionScorer, runner: torch.nn.Module | None = None):
        self.policy_scorer = policy_scorer  # the unwrapped scorer (not the DDP wrapper)
        self.runner = runner if runner is not None else policy_scorer

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor], return_hidden: bool = False) -> ScoreOutput:
        """Sequence log-probs ``(R,)`` of the batch's rows with the adapter off, no grad."""
        with self.policy_scorer.model.disable_adapter(), eval_mode(self.runner):
            return score_batch(self.runner, batch, return_hidden)

    @property
    def lm_head(self) -> torch.nn.Module:
        """The policy's LM head (LoRA does not adapt it: it is the base model's)."""
        return self.policy_scorer.model.get_output_embeddings()


class StartingPolicyReference:
    """The policy before its first step, which *is* the reference then (no ``--reference``).

    Used only to pre-compute the reference log-probs: no second copy of the weights is loaded,
    and under FSDP / ZeRO-3 ``runner`` (the sharded wrapper) gathers the weights as training
    does. Scores in eval mode (no dropout) under ``no_grad``; never freezes the policy.
    """

    def __init__(self, runner: torch.nn.Module):
        self.runner = runner

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor], return_hidden: bool = False) -> ScoreOutput:
        """Sequence log-probs ``(R,)`` of the batch's rows in eval mode, no grad."""
        with eval_mode(self.runner):
            return score_batch(self.runner, batch, return_hidden)


@torch.no_grad()
def compute_reference_logps(
    reference,
    batches: Iterable[dict[str, torch.Tensor]],
    num_rows: int,
    gather=None,
    reduction: Callable | None = None,
) -> PrecomputedReference:
    """Score every row once with ``reference`` (any object with ``score``).

    ``batches`` may be this process's shard; ``gather`` (e.g. ``accelerator.gather_for_metrics``)
    collects the shards so every process ends with the full table. ``reduction(out, pairs)``
    (a :class:`~dpokit.losses.options.SequenceReduction`, e.g. LD-DPO) turns a batch's score into
    its ``(2B,)`` sequence log-probs; default the plain sums.
    """
    logps = torch.zeros((num_rows, 2))
    counts = torch.zeros((num_rows, 2), dtype=torch.long)
    scored = torch.zeros(num_rows, dtype=torch.bool)
    local_rows = 0  # this process's shard (the gathered table holds every row)
    for batch in batches:
        out = reference.score(batch)
        pairs = batch["index"].shape[0]
        local_rows += pairs
        index = batch["index"]  # (B,)
        sequence_logps = reduction(out, pairs) if reduction is not None else out.logps  # (2B,)
        row_logps = sequence_logps.float().view(2, pairs).T  # (B, 2): chosen, rejected
        row_counts = out.token_counts.view(2, pairs).T  # (B, 2)
        if gather is not None:
            index, row_logps, row_counts = gather((index, row_logps, row_counts))
        logps[index.cpu()] = row_logps.cpu()
        counts[index.cpu()] = row_counts.cpu()
        scored[index.cpu()] = True
    if not scored.all():
        missing = int((~scored).sum())
        raise RuntimeError(f"reference log-probs missing for {missing} of {num_rows} rows")
    nonfinite = (~torch.isfinite(logps)).any(dim=1)  # (num_rows,)
    if nonfinite.any():
        raise NonFiniteReferenceError(nonfinite_reference_message(reference, nonfinite))
    table = PrecomputedReference(logps, counts)
    table.local_rows = local_rows
    return table


# ---- choosing and building the reference of a run ---------------------------------------------


def choose_reference_mode(config, spec) -> str:
    """The reference of a run: ``"none"``, ``"adapter"``, ``"model"`` or ``"precomputed"``.

    ``config`` is a :class:`~dpokit.config.TrainConfig`, ``spec`` the method's
    :class:`~dpokit.losses.MethodSpec`. ``config.reference_mode`` ``auto`` picks none if the
    method needs none; an online reference (adapter-off with LoRA, else a frozen copy) for
    token-level methods; otherwise pre-computed and cached. Any other mode is taken as given.
    """
    if spec.reference == "none":
        return "none"
    if config.reference_mode != "auto":
        return config.reference_mode
    if spec.reference == "online":
        return "adapter" if config.lora and config.reference is None else "model"
    return "precomputed"


@dataclass
class ReferenceBuilder:
    """Builds a run's reference from its policy, once the policy is prepared.

    Attributes:
        config: the run's :class:`~dpokit.config.TrainConfig`.
        accelerator: the run's ``accelerate.Accelerator``.
        policy: the prepared policy scorer (possibly DDP/FSDP-wrapped).
        sharding: ``"fsdp"``, ``"zero3"`` or None (:func:`dpokit.distributed.parameter_sharding`).
        dtype: the dtype a separate reference model is loaded in.
        loader: ``loader(prepared) -> DataLoader``, unshuffled, with the run's collator.
        reduction: how a pre-computed table sums per-token log-probs (a
            :class:`~dpokit.losses.options.SequenceReduction`; its ``cache_settings()`` are part
            of the cache key); None: plain sums.
    """

    config: object
    accelerator: object
    policy: torch.nn.Module
    sharding: str | None
    dtype: torch.dtype
    loader: Callable
    reduction: object | None = None

    def build(self, mode: str, splits: dict) -> dict[str, object | None]:
        """One reference per split name of ``splits`` (name -> PreparedData or None), for
        ``mode`` from :func:`choose_reference_mode`: a pre-computed table is indexed by its
        split's rows, the online references are shared.

        Raises ``ValueError`` (:mod:`dpokit.distributed`) for a separate reference model under
        sharded parameters, with what to use instead.
        """
        log_sharded_plan(self.sharding, mode)
        if mode == "none":
            return dict.fromkeys(splits)
        if mode == "adapter":
            return dict.fromkeys(splits, AdapterOffReference(*self.policy_runner()))
        if mode == "model":
            refuse_separate_reference(self.sharding)
            return dict.fromkeys(splits, self.frozen())
        return {
            name: self.precomputed(data) if data is not None else None
            for name, data in splits.items()
        }

    def frozen(self) -> FrozenReference:
        """A frozen copy of ``config.reference`` (else the starting model) on the device."""
        name = self.config.reference or self.config.model
        # dpokit's FSDP2: processes other than 0 build it on meta; shard_scorer fills them.
        empty = self.sharding == "fsdp2" and not self.accelerator.is_main_process
        model = load_model(
            name,
            self.dtype,
            disable_dropout=self.config.disable_dropout,
            loading=loading_kwargs(self.config),
            empty=empty,
        )
        scorer = build_scorer(
            model,
            empty,
            chunk_size=self.config.logps_chunk_size,
            pass_tokens=self.config.decoder_pass_tokens,
        )
        if self.sharding == "fsdp2":  # dpokit's FSDP2 shards the reference too (forward only)
            model.requires_grad_(False)
            shard_scorer(scorer, model, self.accelerator.device.type)
        return FrozenReference(scorer.to(self.accelerator.device))

    def policy_runner(self) -> tuple[CompletionScorer, torch.nn.Module]:
        """(the plain policy scorer, the module to call for reference forwards): the sharded
        wrapper under FSDP / ZeRO-3 (it gathers the weights), else the plain scorer (no DDP
        collective in a forward that has no backward)."""
        scorer = self.accelerator.unwrap_model(self.policy)
        return scorer, self.policy if self.sharding else scorer

    def for_precompute(self):
        """What scores the table: without ``--reference`` the policy before its first step is
        the reference (LoRA: adapter off), so no second copy of the weights is loaded."""
        if self.config.reference is None:
            scorer, runner = self.policy_runner()
            if self.config.lora:
                return AdapterOffReference(scorer, runner)
            return StartingPolicyReference(runner)
        refuse_other_reference(self.sharding, self.config.reference)
        return self.frozen()

    @property
    def show_progress(self) -> bool:
        """Progress bars on the main process only, unless ``progress=false``."""
        return bool(self.config.progress and self.accelerator.is_main_process)

    def cache_key(self, prepared) -> CacheKey:
        """The table's cache key: reference weights, the split's data, dtype and precision."""
        config = self.config
        return CacheKey(
            reference_identity=model_identity(config.reference or config.model, self.show_progress),
            data_fingerprint=prepared.fingerprint,
            settings=json.dumps(
                {
                    "dtype": config.dtype,
                    "mixed_precision": self.accelerator.mixed_precision,
                    **(self.reduction.cache_settings() if self.reduction is not None else {}),
                }
            ),
        )

    def precomputed(self, prepared) -> PrecomputedReference:
        """The split's reference log-probs from the cache, else scored (each process its shard,
        gathered) and cached by the main process."""
        acc = self.accelerator
        cache_dir = Path(self.config.reference_cache_dir or default_cache_dir())
        key, num_rows = self.cache_key(prepared), len(prepared.dataset)
        cached = load_cached(cache_dir, key, num_rows)
        if cached is not None:
            logger.info("reference log-probs: cache hit %s", key.digest)
            return cached
        logger.info("reference log-probs: computing for %d rows (cache %s)", num_rows, key.digest)
        reference = self.for_precompute()
        loader = acc.prepare_data_loader(self.loader(prepared))
        batches = tqdm(loader, desc="reference log-probs", disable=not self.show_progress)
        with acc.autocast():
            table = compute_reference_logps(
                reference,
                batches,
                num_rows,
                gather=acc.gather_for_metrics,
                reduction=self.reduction,
            )
        logger.info(
            "reference log-probs: process %d scored %d of %d rows",
            acc.process_index,
            table.local_rows,
            num_rows,
        )
        if acc.is_main_process:
            save_cached(cache_dir, key, table)
        acc.wait_for_everyone()
        return table


def nonfinite_reference_message(reference, nonfinite: torch.Tensor) -> str:
    """Which rows (``nonfinite``: (num_rows,) bool) scored NaN/inf, and why: the reference
    weights' non-finite parameters when there are any, else an overflow in the forward."""
    rows = nonfinite.nonzero().flatten().tolist()
    shown = ", ".join(map(str, rows[:10])) + (", ..." if len(rows) > 10 else "")
    names = []
    for module in _reference_modules(reference):
        names += [n for n, p in module.named_parameters() if not torch.isfinite(p).all()]
    if names:
        cause = (
            f"the reference model's weights hold NaN/inf ({', '.join(names[:3])}"
            f"{', ...' if len(names) > 3 else ''}): use a checkpoint saved before the values "
            "diverged"
        )
    else:
        cause = (
            "the reference weights are finite, so the forward overflowed: try dtype=float32 "
            "mixed_precision=no"
        )
    return (
        f"reference log-probs are NaN/inf for {len(rows)} of {nonfinite.numel()} rows "
        f"(rows {shown}) while pre-computing them; {cause}. Nothing was cached"
    )


def _reference_modules(reference) -> list[torch.nn.Module]:
    """The modules a reference scores with (frozen copy, starting policy, or adapter-off)."""
    found = (getattr(reference, name, None) for name in ("scorer", "runner", "policy_scorer"))
    return [module for module in found if isinstance(module, torch.nn.Module)][:1]
