"""APO: anchored preference optimization, zero and down variants (D'Oosterlinck et al., 2024,
"Anchored Preference Optimization and Contrastive Revisions", arXiv:2408.06266, Eqs. 7 and 8)."""

from __future__ import annotations

import torch
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def _rewards(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    beta: float,
) -> tuple[Tensor, Tensor]:
    """Check the inputs; return (beta * rho_w, beta * rho_l), each ``(B,)``."""
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    return (
        beta * (policy_chosen_logps - reference_chosen_logps),
        beta * (policy_rejected_logps - reference_rejected_logps),
    )


def apo_zero_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """APO-zero loss per example: push the chosen likelihood UP and the rejected one DOWN.

    Equation (r = beta * rho, rho = logp(y) - ref(y); the paper's Eq. 7 plus the constant 1)::

        loss = (1 - sigmoid(r_w)) + sigmoid(r_l)

    For data whose chosen answers are better than the model's own outputs.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0 or tensors of different shapes.

    Traps: the paper writes ``-sigmoid(r_w) + sigmoid(r_l)``; TRL (and this function) add 1 so the
    loss lies in [0, 2]. Gradients are the same; logged values differ by exactly 1. With policy ==
    reference the loss is 1. The sigmoids saturate: gradients vanish once |r| is large.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    losses = (1 - torch.sigmoid(chosen_rewards)) + torch.sigmoid(rejected_rewards)
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
    )


def apo_down_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """APO-down loss per example: push BOTH likelihoods down, the rejected one more.

    Equation (r = beta * rho; the paper's Eq. 8 plus the constant 1)::

        loss = sigmoid(r_w) + (1 - sigmoid(r_w - r_l))

    For data whose chosen answers are worse than the model's own outputs.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0 or tensors of different shapes.

    Traps: the paper writes ``sigmoid(r_w) - sigmoid(r_w - r_l)``; TRL (and this function) add 1
    (loss in [0, 2]). With policy == reference the loss is 1. Picking zero vs down is a property
    of the DATA relative to the model, not a tuning knob.
    """
    chosen_rewards, rejected_rewards = _rewards(
        policy_chosen_logps,
        policy_rejected_logps,
        reference_chosen_logps,
        reference_rejected_logps,
        beta,
    )
    losses = torch.sigmoid(chosen_rewards) + (1 - torch.sigmoid(chosen_rewards - rejected_rewards))
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
    )
