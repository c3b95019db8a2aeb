"""WPO: Weighted Preference Optimization (Zhou et al., 2024, arXiv:2406.11827).

Off-policy preference pairs are reweighted by how likely the CURRENT policy is to produce them, so
that training on a fixed dataset behaves more like on-policy training. Each answer's weight is the
exponential of its per-token mean of ``log p(y_t) - log sum_v p(v)^2`` (the "aligned" log-prob:
a token as likely as the policy's own expected token probability counts as 1), without gradient;
the pair's weight is the product of its two answers' weights.

What the log-prob engine must provide, per answer, for the POLICY only (the reference is not used):

* the summed completion log-prob ``logp(y)`` and the completion length ``|y|`` (as always), and
* ``S(y) = sum over completion tokens t of log sum_v p_t(v)^2``, a ``(B,)`` tensor without
  gradient, where ``p_t`` is the policy's next-token distribution at the position predicting
  token t. :func:`log_sum_sq_probs` computes the per-token quantity from a chunk of logits
  (``logsumexp(2 z) - 2 logsumexp(z)``, no softmax materialised), so a chunked LM-head kernel can
  produce it next to the token log-probs and sum it over each sequence's completion tokens.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def log_sum_sq_probs(logits: Tensor) -> Tensor:
    """``log sum_v softmax(logits)_v**2`` over the last dimension, without gradient.

    Args:
        logits: ``(..., V)`` next-token logits (any float dtype; computed in at least fp32).

    Returns:
        ``(...)`` fp32 (fp64 for fp64 logits), detached; always <= 0 (= 0 for a one-hot
        distribution, ``-log V`` for a uniform one).
    """
    with torch.no_grad():
        wide = logits if logits.dtype == torch.float64 else logits.float()
        return torch.logsumexp(2.0 * wide, dim=-1) - 2.0 * torch.logsumexp(wide, dim=-1)


def wpo_weights_from_sums(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_log_sum_sq_probs: Tensor,
    rejected_log_sum_sq_probs: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    max_weight: float | None = None,
) -> Tensor:
    """WPO pair weights from per-sequence sums, detached.

    Equation (sums over the completion tokens of y; S as in the module docstring)::

        w(y)   = exp((logp(y) - S(y)) / |y|)
        weight = w(y_w) * w(y_l)        [min(weight, max_weight) when max_weight is given]

    Args:
        policy_chosen_logps, policy_rejected_logps: ``(B,)`` summed completion log-probs of the
            POLICY (the current model; gradients are cut here).
        chosen_log_sum_sq_probs, rejected_log_sum_sq_probs: ``(B,)`` S(y_w), S(y_l).
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (0 read as 1).
        max_weight: optional cap, > 0. ``None`` (default) = TRL 1.16 (no cap); ``1.0`` = TRL
            before 1.0 (``clamp(max=1)``).

    Returns:
        ``(B,)`` weights, no gradient, dtype of ``policy_chosen_logps``.

    Raises:
        ValueError: ``max_weight`` <= 0; shapes differ.
    """
    if max_weight is not None:
        check_range("max_weight", max_weight, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_log_sum_sq_probs=chosen_log_sum_sq_probs,
        rejected_log_sum_sq_probs=rejected_log_sum_sq_probs,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    with torch.no_grad():
        dtype = policy_chosen_logps.dtype
        chosen = (policy_chosen_logps - chosen_log_sum_sq_probs.to(dtype)) / chosen_lengths.to(
            dtype
        ).clamp(min=1.0)
        rejected = (
            policy_rejected_logps - rejected_log_sum_sq_probs.to(dtype)
        ) / rejected_lengths.to(dtype).clamp(min=1.0)
        weights = torch.exp(chosen + rejected)  # (B,) = w(y_w) * w(y_l)
        if max_weight is not None:
            weights = weights.clamp(max=max_weight)
    return weights


def wpo_weights(
    chosen_token_logps: Tensor,
    chosen_token_log_sum_sq_probs: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_token_log_sum_sq_probs: Tensor,
    rejected_mask: Tensor,
    *,
    max_weight: float | None = None,
) -> Tensor:
    """WPO pair weights from per-token quantities, detached.

    Args:
        chosen_token_logps: ``(B, Tw)`` policy log-prob of each token of y_w.
        chosen_token_log_sum_sq_probs: ``(B, Tw)`` :func:`log_sum_sq_probs` of the policy's
            distribution at the same positions.
        chosen_mask: ``(B, Tw)`` completion-token mask of y_w (values off it are ignored).
        rejected_token_logps, rejected_token_log_sum_sq_probs, rejected_mask: ``(B, Tl)`` for y_l.
        max_weight: optional cap, see :func:`wpo_weights_from_sums`.

    Returns:
        ``(B,)`` weights ``w(y_w) * w(y_l)``, no gradient.

    Raises:
        ValueError: ``max_weight`` <= 0; per-token tensors of different shapes.

    Source: Zhou et al. 2024, WPO: Enhancing RLHF with Weighted Preference Optimization,
    arXiv:2406.11827 (the length-normalised, sampling-aligned weight; TRL 1.16
    ``use_weighting``, which quotes the paper's Eq. 2).

    Traps: the weights must be computed from the policy being trained at this step (not the
    reference, not a cache) and must carry no gradient. They are not normalised: with the
    aligned form a typical weight is near 1 and can exceed it.
    """
    sums = []
    for name, logps, lssp, mask in (
        ("chosen", chosen_token_logps, chosen_token_log_sum_sq_probs, chosen_mask),
        ("rejected", rejected_token_logps, rejected_token_log_sum_sq_probs, rejected_mask),
    ):
        if logps.dim() != 2 or logps.shape != lssp.shape or logps.shape != mask.shape:
            raise ValueError(
                f"{name}: token log-probs, log_sum_sq_probs and mask must all be (B, T); got "
                f"{tuple(logps.shape)}, {tuple(lssp.shape)}, {tuple(mask.shape)}"
            )
        on = mask.bool()
        zero = logps.new_zeros(())
        sums.append(
            (
                logps.detach().where(on, zero).sum(dim=1),
                lssp.detach().to(logps.dtype).where(on, zero).sum(dim=1),
                on.sum(dim=1),
            )
        )
    (chosen_logps, chosen_lssp, chosen_len), (rejected_logps, rejected_lssp, rejected_len) = sums
    return wpo_weights_from_sums(
        chosen_logps,
        rejected_logps,
        chosen_lssp,
        rejected_lssp,
        chosen_len,
        rejected_len,
        max_weight=max_weight,
    )


def apply_pair_weights(
    output: LossOutput, weights: Tensor, *, name: str = "wpo_weight"
) -> LossOutput:
    """``output`` with each example's loss multiplied by a detached weight, logged as ``name``.

    Args:
        output: a :class:`LossOutput` with losses ``(B,)`` (one method, or a combination).
        weights: ``(B,)`` weights, e.g. :func:`wpo_weights`; detached here in any case.
        name: metric key of the weights (default ``"wpo_weight"``).

    Returns:
        A new :class:`LossOutput`: ``losses * weights``; rewards and metrics kept, plus
        ``metrics[name]``.

    Raises:
        ValueError: shapes differ.

    Traps: TRL 1.16 multiplies EVERY component of a combined loss by the weight (its ``sft``
    term included), which is what applying this to a :func:`combine_losses` result does;
    applying it before adding an NLL term weights the preference part only.
    """
    check_same_shape(losses=output.losses, weights=weights)
    weights = weights.detach().to(output.losses.dtype)
    return LossOutput(
        losses=output.losses * weights,
        chosen_rewards=output.chosen_rewards,
        rejected_rewards=output.rejected_rewards,
        rewards=output.rewards,
        metrics={**output.metrics, name: weights},
    )
