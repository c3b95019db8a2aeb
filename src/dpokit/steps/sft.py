"""Supervised fine-tuning as a per-batch step: NLL of the completion tokens.

    loss = - sum_{n, t in completion(n)} log pi(y_t | x, y_<t)  /  sum_n |completion(n)|

i.e. the token-averaged negative log-likelihood (over the tokens of the whole optimizer step:
``units`` is the completion tokens, see :mod:`dpokit.accumulation`), from the same
:class:`~dpokit.logprobs.CompletionScorer` the preference methods use (summed log-probs and token
counts). ``Trainer(config, spec=SFT_SPEC)`` runs it with every engine feature (accumulation,
checkpoints, resume, LoRA, eval split); :func:`dpokit.recipes.sft.run_sft` is that call.

SFT is not a preference method, so :data:`SFT_SPEC` is not in :data:`dpokit.losses.METHODS`; it
names ``STEPS["sft"]`` by its ``step`` field, and no method of the table does (SPIN's rows are SFT
data too, but its table entry names the pairwise step its rounds train with).
"""

from __future__ import annotations

from types import MappingProxyType

import torch

from dpokit.data.sft import SFTCollator, prepare_sft
from dpokit.losses import LossInputs, LossOutput, MethodSpec
from dpokit.metrics import Pooled
from dpokit.steps.base import Procedure, StepContext, StepOutput


def sft_loss(policy_logps: torch.Tensor, token_counts: torch.Tensor) -> LossOutput:
    """Per-example NLL per token, ``-logps / counts``. (B,), (B,) -> LossOutput.losses (B,)."""
    return LossOutput(losses=-policy_logps / token_counts.clamp(min=1))


def _compute(inputs: LossInputs, hyperparameters=None) -> LossOutput:
    (logps, counts) = inputs.require("sft", "policy_logps", "chosen_lengths")
    return sft_loss(logps, counts)


SFT_SPEC = MethodSpec(
    name="sft",
    title="Supervised fine-tuning (completion NLL)",
    paper="-",
    formula="-sum_t log pi(y_t | x, y_<t) / |y|",
    loss=sft_loss,
    compute=_compute,
    hyperparameters=MappingProxyType({}),
    reference="none",
    averaged_logps=False,
    token_kl=False,
    scores=False,
    data="sft",
    step="sft",
)


def completion_tokens(batch: dict[str, torch.Tensor]) -> int:
    """The completion tokens the scorer scores in ``batch`` (``completion_mask`` inside the
    ``attention_mask``): the units SFT's loss is a mean over (``Procedure.units``)."""
    scored = batch["completion_mask"].bool() & batch["attention_mask"].bool()  # (B, T)
    return int(scored.sum())


def sft_batch_loss(ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """One micro-batch: token-averaged NLL over all completion tokens of the batch.

    ``batch``: an :class:`~dpokit.data.sft.SFTCollator` batch, ``input_ids`` etc. ``(B, T)``.
    ``losses`` ``(B,)``: each example's NLL per token; ``correct`` is all False (no pairs).
    """
    out = ctx.policy(
        batch["input_ids"],  # (B, T)
        batch["attention_mask"],
        batch["completion_mask"],
        position_ids=batch.get("position_ids"),
    )
    tokens = out.token_counts.sum()  # scalar: completion tokens in the batch (= units)
    nll = -out.logps.sum()
    loss = nll / tokens.clamp(min=1)  # every token weighs the same, however long its row
    per_example = -out.avg_logps.detach()  # (B,)
    metrics = {
        "loss": Pooled(nll.detach().double(), tokens),  # per token over the whole step
        "nll/per_example": per_example.mean(),
        "logps/completion": out.logps.detach().mean(),
        "completion_tokens": out.token_counts.float().mean(),  # per example
    }
    # There are no pairs, hence no reward accuracy: `correct` is all False by definition.
    correct = torch.zeros_like(per_example, dtype=torch.bool)
    return StepOutput(loss=loss, metrics=metrics, losses=per_example, correct=correct)


# SFT rows (prompt + completion, or messages), collated one way.
SFT_STEP = Procedure(
    prepare=prepare_sft,
    collator=SFTCollator,
    batch_loss=sft_batch_loss,
    units=completion_tokens,
)
