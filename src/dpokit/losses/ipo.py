"""IPO: Identity Preference Optimization (Azar et al., 2023, arXiv:2310.12036)."""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def ipo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    tau: float = 0.1,
) -> LossOutput:
    """IPO loss per example: a squared loss that pulls the log-ratio margin to a fixed target.

    Equation::

        h    = (logp(y_w) - ref(y_w)) - (logp(y_l) - ref(y_l))
        loss = (h - 1 / (2 * tau)) ** 2

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs, either summed or averaged per completion
            token -- the caller decides, and must average policy and reference with the same
            lengths. The IPO authors' results use per-token averages; the method table's
            ``average`` hyperparameter (default True) does the division.
        tau: regularization strength, > 0 (called ``beta`` in most codebases; default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``tau * rho`` (detached; the TRL convention).

    Traps: unlike DPO the loss is not monotone in h: past the target ``1/(2*tau)`` pushing the
    chosen answer further up increases it. With summed log-probs the target (5 nats at tau=0.1)
    means something very different for long and short answers.
    """
    check_range("tau", tau, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    margin = chosen_logratios - rejected_logratios  # (B,) h
    return LossOutput(
        losses=(margin - 1 / (2 * tau)) ** 2,
        chosen_rewards=tau * chosen_logratios.detach(),
        rejected_rewards=tau * rejected_logratios.detach(),
    )
