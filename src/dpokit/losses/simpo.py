"""SimPO: Simple Preference Optimization, reference-free (Meng et al., 2024, arXiv:2405.14734)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def simpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 2.0,
    gamma: float = 1.0,
) -> LossOutput:
    """SimPO loss per example: length-normalised log-likelihood margin with a target margin.

    Equation::

        loss = -log sigmoid(beta * (avg_logp(y_w) - avg_logp(y_l)) - gamma)
        avg_logp(y) = logp(y) / |y|   (sum over completion tokens / number of completion tokens)

    Args:
        policy_chosen_avg_logps: ``(B,)`` per-token AVERAGE log-prob of the chosen completion.
        policy_rejected_avg_logps: ``(B,)`` same for the rejected completion.
        beta: > 0 (default 2.0; the paper uses 2.0 to 10).
        gamma: target reward margin, ABSOLUTE as in the paper's equation, >= 0 (default 1.0).

    Returns:
        :class:`LossOutput` with rewards ``beta * avg_logp`` (detached): SimPO's implicit reward.

    Traps: the authors' reference code takes ``gamma_beta_ratio`` = gamma / beta (typical
    0.3-0.8) and computes ``beta * (margin - gamma_beta_ratio)``; here ``gamma`` is the product,
    so ``gamma_beta_ratio=0.5, beta=2`` is ``gamma=1.0``. Pass averages, not sums: summed
    log-probs turn the method into a length-biased, reference-free DPO.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("gamma", gamma, 0.0)
    check_same_shape(
        policy_chosen_avg_logps=policy_chosen_avg_logps,
        policy_rejected_avg_logps=policy_rejected_avg_logps,
    )
    logits = beta * (policy_chosen_avg_logps - policy_rejected_avg_logps) - gamma  # (B,)
    return LossOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=beta * policy_chosen_avg_logps.detach(),
        rejected_rewards=beta * policy_rejected_avg_logps.detach(),
    )
