"""Hinge loss on reference log-ratios, TRL's ``loss_type="hinge"``, from RSO (Liu et al., 2023,
"Statistical Rejection Sampling Improves Preference Optimization", arXiv:2309.06657)."""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def hinge_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """RSO's hinge loss per example: SLiC's calibration hinge on the reference-normalised margin.

    Equation (h = rho_w - rho_l as in :func:`dpokit.losses.dpo_loss`)::

        loss = max(0, 1 - beta * h)  =  beta * max(0, 1/beta - h)

    so ``1/beta`` is the margin in nats (10 at beta=0.1): pairs with h >= 1/beta get no gradient.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1), the reciprocal of the margin (RSO's gamma; TRL's ``beta``).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0 or tensors of different shapes.

    Traps: NOT dpokit's SLiC-HF (:func:`dpokit.losses.slic_loss`, method ``slic``), which has no
    reference model, its own margin ``delta`` and a likelihood regulariser. With policy ==
    reference the loss is 1 (not ln 2), and the gradient is the constant ``-beta`` per unit of h
    until the margin is reached, then exactly 0.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    losses = (1 - beta * (chosen_logratios - rejected_logratios)).clamp(min=0)  # (B,)
    return LossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
