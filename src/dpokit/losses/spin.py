"""SPIN: self-play fine-tuning (Chen et al., 2024, arXiv:2401.01335)."""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range
from dpokit.losses.dpo import dpo_loss


def spin_loss(
    policy_real_logps: Tensor,
    policy_generated_logps: Tensor,
    opponent_real_logps: Tensor,
    opponent_generated_logps: Tensor,
    *,
    lam: float = 0.1,
) -> LossOutput:
    """SPIN loss per example: DPO's logistic loss with the human answer as the winner, the
    previous iterate's own sample as the loser, and the previous iterate as the reference.

    Equation (pi_t = the opponent, the model of the previous iteration)::

        loss = -log sigmoid(lam * (log pi(y|x)/pi_t(y|x) - log pi(y'|x)/pi_t(y'|x)))

    Args:
        policy_real_logps: ``(B,)`` log pi_theta(y|x) of the human (SFT) answer, summed.
        policy_generated_logps: ``(B,)`` log pi_theta(y'|x), y' sampled from pi_t.
        opponent_real_logps: ``(B,)`` log pi_t(y|x); no gradient.
        opponent_generated_logps: ``(B,)`` log pi_t(y'|x); no gradient.
        lam: > 0 (default 0.1); plays the role of DPO's beta.

    Returns:
        :class:`LossOutput` of :func:`dpokit.losses.dpo_loss` with ``beta=lam`` (rewards
        ``lam * rho``, detached).

    Traps: the iteration (generate with pi_t at temperature 1, train from pi_t with reference
    pi_t, repeat) is the SPIN recipe (dpokit.recipes.spin); every iteration starts at ln 2.
    """
    check_range("lam", lam, 0.0, low_open=True)  # checked here so the message says lam, not beta
    return dpo_loss(
        policy_real_logps,
        policy_generated_logps,
        opponent_real_logps,
        opponent_generated_logps,
        beta=lam,
    )
