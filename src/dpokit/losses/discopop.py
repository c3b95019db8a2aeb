"""DiscoPOP: the log-ratio modulated loss found by LLM-driven search (Chris Lu et al., 2024,
"Discovering Preference Optimization Algorithms with and for Large Language Models",
arXiv:2406.08414, Eq. 5)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def discopop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    tau: float = 0.05,
) -> LossOutput:
    """DiscoPOP (log-ratio modulated) loss per example: a blend of DPO's logistic loss and an
    exponential loss, weighted by a sharp sigmoid of the margin.

    Equation (z = beta * h, h = rho_w - rho_l as in :func:`dpokit.losses.dpo_loss`)::

        m    = sigmoid(z / tau)
        loss = (1 - m) * -log sigmoid(z) + m * exp(-z)

    Below z = 0 it behaves like DPO, above like the exponential loss, with a switch of width
    ~tau. The blend is non-convex in z.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1).
        tau: temperature of the modulation, > 0 (default 0.05, the paper's); TRL's
            ``discopop_tau``.

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached) and ``metrics["modulation"]``
        (m, detached).

    Raises:
        ValueError: ``beta`` <= 0, ``tau`` <= 0, or tensors of different shapes.

    Traps: the literal formula (TRL's) computes exp(-z) first: for z < -88 in float32 that is
    inf, m is 0, and 0 * inf = NaN. Here ``m * exp(-z)`` is ``exp(-z + log sigmoid(z / tau))``,
    equal wherever the literal one is finite and finite everywhere. With policy == reference the
    loss is (ln 2 + 1) / 2 = 0.846574, not ln 2.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("tau", tau, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,) z
    modulation = torch.sigmoid(logits / tau)  # (B,) m
    logistic = -F.logsigmoid(logits)  # (B,)
    # m * exp(-z) in log space: exp(-z) alone overflows where m underflows to 0.
    exponential = torch.exp(F.logsigmoid(logits / tau) - logits)  # (B,)
    return LossOutput(
        losses=(1 - modulation) * logistic + exponential,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={"modulation": modulation.detach()},
    )
