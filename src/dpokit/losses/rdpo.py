"""rDPO: provably robust DPO under label noise (Chowdhury et al., 2024, arXiv:2403.00409)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def rdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    eps: float = 0.1,
) -> LossOutput:
    """Robust DPO loss per example, an unbiased estimate of DPO's under flip rate ``eps``.

    Equation::

        z    = beta * (rho_w - rho_l)
        loss = ((1 - eps) * -log sigmoid(z) - eps * -log sigmoid(-z)) / (1 - 2 * eps)

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` summed completion log-probs, as for DPO.
        beta: > 0 (default 0.1).
        eps: assumed probability that a pair's label is flipped, in [0, 0.5) (default 0.1).
            ``eps=0`` is DPO.

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Traps: the loss is unbounded below (``h=100`` gives -1.249955 on example E with eps=0.1):
    that is the method, not a bug -- do not clamp it. It is NOT cDPO / label smoothing, which
    ADDS ``eps * -log sigmoid(-z)`` and does not divide by ``1 - 2*eps``.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("eps", eps, 0.0, 0.5, high_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    # The minus sign on the flipped-label term is what makes the estimate unbiased.
    losses = ((1 - eps) * -F.logsigmoid(logits) - eps * -F.logsigmoid(-logits)) / (1 - 2 * eps)
    return LossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
