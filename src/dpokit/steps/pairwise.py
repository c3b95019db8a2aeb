"""One micro-batch of a pairwise method: concatenated forward, reference, loss, metrics.

Serves every method whose data are preference pairs (DPO, DPOP, SLiC-HF, IPO, SimPO, ODPO, rDPO,
TDPO1/2): which inputs each loss needs comes from its :class:`~dpokit.losses.MethodSpec`.
"""

from __future__ import annotations

import torch

from dpokit.data import PairCollator, prepare_pairs
from dpokit.data.packing import pair_collator
from dpokit.logprobs import ScoreOutput, scorer_kwargs, sequence_kl_from_hidden
from dpokit.logprobs.kernels import sum_per_row
from dpokit.losses import LossInputs, LossOutput
from dpokit.losses.options import OptionSettings, option_settings
from dpokit.steps.base import Procedure, StepContext, StepOutput


def pairwise_batch_loss(ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """One micro-batch of B pairs: one forward over chosen and rejected rows, the reference's
    log-probs (and token-level KL when the method needs it), then ``spec.compute``.

    ``batch``: a :class:`~dpokit.data.PairCollator` batch (or a packed one): ``input_ids`` etc.
    ``(2B, T)`` (chosen rows, then rejected rows; a third block of B rows is SLiC's sampled y_ref),
    ``index`` ``(B,)``, optional ``score_chosen``/``score_rejected`` ``(B,)``. ``correct`` is
    chosen reward > rejected reward. Raises ``ValueError`` (from the loss) when an input the
    method needs is missing.
    """
    spec = ctx.spec
    options = option_settings(spec, ctx.hyperparameters)  # LD-DPO, WPO: what to compute
    policy_out: ScoreOutput = ctx.policy(
        batch["input_ids"],  # (2B, T): chosen rows, then rejected rows [, SLiC's y_ref rows]
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),  # position ids; packed rows' layout
        return_hidden=spec.token_kl,
        **({"return_log_sum_sq": True} if options.use_weighting else {}),
    )
    pairs = batch["index"].shape[0]
    # (B,) each; a third block, when present, is SLiC's sampled y_ref (steps/slic.py)
    policy_chosen, policy_rejected, *policy_target = policy_out.logps.split(pairs)
    chosen_lengths, rejected_lengths, *_ = policy_out.token_counts.split(pairs)
    inputs = LossInputs(
        policy_chosen_logps=policy_chosen,
        policy_rejected_logps=policy_rejected,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
        score_chosen=batch.get("score_chosen"),
        score_rejected=batch.get("score_rejected"),
        policy_target_logps=policy_target[0] if policy_target else None,
    )
    _feed_options(options, policy_out, pairs, inputs)
    if spec.reference != "none":
        reference_out = ctx.reference.score(batch, return_hidden=spec.token_kl)
        inputs.reference_chosen_logps, inputs.reference_rejected_logps = (
            options.reduction(reference_out, pairs).detach().float().split(pairs)
        )
        if spec.token_kl:
            seq_kl = sequence_kl_from_hidden(
                policy_out, reference_out, ctx.policy_head, ctx.reference_head, ctx.chunk_size
            )  # (2B,)
            inputs.chosen_seq_kl, inputs.rejected_seq_kl = seq_kl.split(pairs)
    if ctx.reward_baseline is not None:  # BCO: update (training) before the loss reads it
        inputs.reward_baseline = ctx.reward_baseline(inputs)
    out = spec.compute(inputs, ctx.hyperparameters)
    return StepOutput(
        loss=out.losses.mean(),
        metrics=pair_metrics(out, inputs),
        losses=out.losses.detach(),
        correct=(out.chosen_rewards > out.rejected_rewards),
    )


def _feed_options(
    options: OptionSettings, policy_out: ScoreOutput, pairs: int, inputs: LossInputs
) -> None:
    """Fill the option inputs (:mod:`dpokit.losses.options`) from the policy's per-token output:
    LD-DPO's sums ``(B,)`` each, WPO's sums of ``log sum_v p_v**2`` ``(B,)`` each (no grad)."""
    if not options.reduction.plain:
        ld = options.reduction(policy_out, pairs)  # (2B,)
        inputs.ld_policy_chosen_logps, inputs.ld_policy_rejected_logps = ld.split(pairs)
    if options.use_weighting:
        sums = sum_per_row(
            policy_out.token_log_sum_sq, policy_out.row_index, policy_out.logps.shape[0]
        )  # (2B,)
        inputs.chosen_log_sum_sq, inputs.rejected_log_sum_sq = sums.split(pairs)[:2]


def pair_metrics(out: LossOutput, inputs: LossInputs) -> dict[str, torch.Tensor]:
    """The logged scalars of a pairwise batch: loss, rewards, reward accuracy and margins,
    log-probs, log-ratios to the reference and token-level KL when present, plus the loss's own
    ``metrics``. Every value is a detached 0-d tensor (a mean over the batch's B pairs)."""
    chosen, rejected = out.chosen_rewards, out.rejected_rewards  # (B,) detached
    metrics = {
        "loss": out.losses.detach().mean(),
        "rewards/chosen": chosen.mean(),
        "rewards/rejected": rejected.mean(),
        "rewards/margins": (chosen - rejected).mean(),
        "rewards/accuracies": (chosen > rejected).float().mean(),
        "logps/chosen": inputs.policy_chosen_logps.detach().mean(),
        "logps/rejected": inputs.policy_rejected_logps.detach().mean(),
    }
    if inputs.policy_target_logps is not None:
        metrics["logps/target"] = inputs.policy_target_logps.detach().mean()
    if inputs.reference_chosen_logps is not None:
        # Mean log-ratio on the data: a sample-free proxy for how far the policy has moved.
        # With LD-DPO both sides are the length-desensitised sums.
        chosen_logps, rejected_logps = inputs.policy_chosen_logps, inputs.policy_rejected_logps
        if inputs.ld_policy_chosen_logps is not None:
            chosen_logps, rejected_logps = (
                inputs.ld_policy_chosen_logps,
                inputs.ld_policy_rejected_logps,
            )
        metrics["logratio/chosen"] = (chosen_logps.detach() - inputs.reference_chosen_logps).mean()
        metrics["logratio/rejected"] = (
            rejected_logps.detach() - inputs.reference_rejected_logps
        ).mean()
    if inputs.chosen_seq_kl is not None:
        metrics["kl/chosen"] = inputs.chosen_seq_kl.detach().mean()
        metrics["kl/rejected"] = inputs.rejected_seq_kl.detach().mean()
    for name, value in (out.metrics or {}).items():
        metrics[name] = value.detach().float().mean()
    return metrics


# Preference pairs, collated as two rows per pair or packed (dpokit.data.packing).
PAIRWISE_STEP = Procedure(
    prepare=prepare_pairs,
    collator=PairCollator,
    batch_loss=pairwise_batch_loss,
    packed_collator=pair_collator,
)
