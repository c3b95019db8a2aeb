"""SLiC-HF: sequence likelihood calibration (Zhao et al., 2023, arXiv:2305.10425)."""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def slic_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    policy_target_logps: Tensor,
    *,
    delta: float = 1.0,
    lam: float = 0.1,
) -> LossOutput:
    """SLiC-HF loss per example: rank calibration hinge plus a likelihood regularizer.

    Equation::

        loss = max(0, delta - logp(y_w) + logp(y_l)) - lam * logp(y_ref)

    Args:
        policy_chosen_logps: ``(B,)`` log pi_theta(y_w|x), summed over completion tokens.
        policy_rejected_logps: ``(B,)`` log pi_theta(y_l|x).
        policy_target_logps: ``(B,)`` log pi_theta(y_ref|x) of the regularization target: the
            chosen answer itself ("direct" variant; pass ``policy_chosen_logps``) or a sample of
            the reference/SFT model (the seed's sample-and-rank variant).
        delta: hinge margin, >= 0 (default 1.0).
        lam: regularizer weight, >= 0 (default 0.1).

    Returns:
        :class:`LossOutput`. SLiC has no reference model and no implicit reward; the logged
        "rewards" are the policy log-probs ``logp(y_w)``, ``logp(y_l)`` (detached), the scores it
        calibrates. ``metrics["hinge"]`` and ``metrics["regularizer"]`` hold the two terms.

    Traps: reference-free -- no reference log-probs anywhere. Not TRL's ``hinge`` loss type,
    which is RSO's ``relu(1 - beta * h)`` on reference log-ratios.
    """
    check_range("delta", delta, 0.0)
    check_range("lam", lam, 0.0)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        policy_target_logps=policy_target_logps,
    )
    hinge = (delta - policy_chosen_logps + policy_rejected_logps).clamp(min=0)  # (B,)
    regularizer = -lam * policy_target_logps  # (B,) keeps y_ref likely
    return LossOutput(
        losses=hinge + regularizer,
        chosen_rewards=policy_chosen_logps.detach(),
        rejected_rewards=policy_rejected_logps.detach(),
        metrics={"hinge": hinge.detach(), "regularizer": regularizer.detach()},
    )
