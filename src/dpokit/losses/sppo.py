"""SPPO with hard probabilities (Wu et al., 2024, "Self-Play Preference Optimization for Language
Model Alignment", arXiv:2405.00675; the square loss of Algorithm 1 with P in {0, 1})."""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def sppo_hard_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """SPPO loss per example with the winner's win probability set to 1 and the loser's to 0.

    Equation (rho = logp(y) - ref(y); eta = 1 / beta)::

        loss = (rho_w - 1 / (2 * beta)) ** 2 + (rho_l + 1 / (2 * beta)) ** 2

    The paper regresses each log-ratio on ``eta * (P(y beats pi_t) - 1/2)``: hard labels P = 1 /
    P = 0 give the targets +eta/2 and -eta/2 (+-5 nats at beta=0.1), each response on its own.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO;
            the reference is the previous iterate pi_t in the paper's self-play loop.
        beta: > 0 (default 0.1), TRL's name; the paper's step size eta is ``1 / beta``.

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0 or tensors of different shapes.

    Traps: this is TRL's offline approximation: the paper's SPPO samples several responses per
    prompt from pi_t each iteration and estimates P with a preference model (PairRM); with hard
    labels and fixed data it is a per-response IPO-like regression. With policy == reference the
    loss is ``2 * (1 / (2 * beta)) ** 2`` = 50 at beta=0.1, not ln 2, and it scales as 1/beta^2.
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
    target = 0.5 / beta  # eta / 2
    winner_error = (chosen_logratios - target) ** 2  # (B,)
    loser_error = (rejected_logratios + target) ** 2  # (B,)
    return LossOutput(
        losses=winner_error + loser_error,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={"winner_error": winner_error.detach(), "loser_error": loser_error.detach()},
    )
