"""DPOP: DPO-Positive (Pal et al., 2024, "Smaug", arXiv:2402.13228)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def dpop_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    lam: float = 50.0,
) -> LossOutput:
    """DPO-Positive loss per example.

    Equation::

        penalty = max(0, ref(y_w) - logp(y_w))
        loss    = -log sigmoid(beta * (rho_w - rho_l - lam * penalty))

    The penalty is active only while the policy's chosen log-prob is below the reference's; it
    keeps DPO from lowering the likelihood of the preferred answer. While active, the gradient
    wrt ``logp(y_w)`` carries a factor ``(1 + lam)`` relative to DPO's at the same logit.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` summed completion log-probs, as for
            :func:`dpokit.losses.dpo_loss`.
        beta: > 0 (default 0.1).
        lam: penalty weight, >= 0 (default 50, the paper's common value). ``lam=0`` is DPO.

    Returns:
        :class:`LossOutput`: rewards ``beta * rho`` (detached, without the penalty);
        ``metrics["dpop_penalty"]`` = the ``(B,)`` penalty before ``lam``.

    Traps: the penalty sits INSIDE ``beta`` and the sigmoid, and uses the chosen log-ratio only;
    some public code subtracts ``lam * penalty`` outside ``beta``, which is a different objective.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("lam", lam, 0.0)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    penalty = (-chosen_logratios).clamp(min=0)  # (B,) max(0, ref(y_w) - logp(y_w))
    logits = beta * (chosen_logratios - rejected_logratios - lam * penalty)  # (B,)
    return LossOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={"dpop_penalty": penalty.detach()},
    )
