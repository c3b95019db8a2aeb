"""Length-normalised DPO, TRL's ``loss_type="sigmoid_norm"``: DPO on per-token averaged
log-ratios (no paper of its own; DPO is Rafailov et al., 2023, arXiv:2305.18290, Eq. 7)."""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape
from dpokit.losses.dpo import dpo_loss


def sigmoid_norm_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """DPO loss per example with each log-ratio divided by its completion's token count.

    Equation (rho = logp(y) - ref(y), SUMMED over completion tokens; |y| = completion tokens)::

        loss = -log sigmoid(beta * (rho_w / |y_w| - rho_l / |y_l|))

    This is exactly how TRL 1.16 normalises: the summed log-ratio (policy and reference alike) is
    divided by the number of completion tokens of that answer, the same count for policy and
    reference; the prompt and padding never count.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs SUMMED over completion tokens, as for DPO.
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (int or float), >= 1.
        beta: > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho / |y|`` (detached): the rewards inside this
        loss. TRL logs ``beta * rho`` (summed) for every loss type; multiply by |y| to compare.

    Raises:
        ValueError: ``beta`` <= 0, a length < 1 (TRL silently clamps it to 1), or tensors of
        different shapes.

    Traps: unlike SimPO the reference stays in, and unlike IPO's averaging the loss is still the
    logistic one. The per-token margins are ~|y| times smaller than the summed ones, so beta must
    be ~|y| times larger for the same effect. With policy == reference the loss is ln 2.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    for name, lengths in (
        ("chosen_lengths", chosen_lengths),
        ("rejected_lengths", rejected_lengths),
    ):
        if bool((lengths < 1).any()):
            raise ValueError(f"{name} must all be >= 1 token, got min {lengths.min().item()!r}")
    chosen_lengths = chosen_lengths.to(policy_chosen_logps.dtype)
    rejected_lengths = rejected_lengths.to(policy_rejected_logps.dtype)
    # One DPO loss in the code base: DPO on the averaged log-probs is this loss exactly.
    return dpo_loss(
        policy_chosen_logps / chosen_lengths,
        policy_rejected_logps / rejected_lengths,
        reference_chosen_logps / chosen_lengths,
        reference_rejected_logps / rejected_lengths,
        beta=beta,
    )
