"""EXO: efficient exact optimization of the alignment objective, pairwise form (Ji et al., 2024,
"Towards Efficient Exact Optimization of Language Model Alignment", arXiv:2402.00856, Eq. 16)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def exo_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    smoothing: float = 1e-3,
) -> LossOutput:
    """Pairwise EXO loss per example: REVERSE KL from the policy's pair distribution to a smoothed
    preference label (DPO is the forward direction).

    Equation (z = beta * h, h = rho_w - rho_l as in :func:`dpokit.losses.dpo_loss`)::

        q_w = sigmoid(z),  q_l = sigmoid(-z)       (softmax of beta * rho over {y_w, y_l})
        p_w = 1 - smoothing,  p_l = smoothing      (the smoothed label)
        loss = KL(q || p) = q_w * (log q_w - log p_w) + q_l * (log q_l - log p_l)

    The loss is >= 0 and is 0 at ``z* = log((1 - smoothing) / smoothing)`` (6.906755 at 1e-3):
    like IPO it stops pushing past a target margin, unlike DPO.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1); the paper's beta_pi (the policy's temperature).
        smoothing: epsilon, the label's probability that y_l wins, in (0, 0.5) (default 1e-3, the
            paper's recommendation). TRL 1.16 calls it ``label_smoothing`` (default 0.0, which
            TRL rejects for ``exo_pair``); dpokit names it ``smoothing`` because TRL's key means
            something else under ``loss_type="robust"``.

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0, ``smoothing`` outside (0, 0.5), or tensors of different shapes.

    Traps: smoothing = 0 is not "no smoothing" but log 0 = -inf: the method needs epsilon > 0.
    With policy == reference the loss is ``-ln 2 - (log(1 - eps) + log eps) / 2`` (2.761231 at
    eps=1e-3), not ln 2. This is the K=2 form from preference pairs; the paper's full EXO uses
    K > 2 sampled completions scored by a reward model, which is not implemented here.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("smoothing", smoothing, 0.0, 0.5, low_open=True, high_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    # logsigmoid keeps log q finite for any logit; q * log q -> 0 where q underflows.
    log_q_w, log_q_l = F.logsigmoid(logits), F.logsigmoid(-logits)
    chosen_term = torch.sigmoid(logits) * (log_q_w - math.log1p(-smoothing))  # (B,)
    rejected_term = torch.sigmoid(-logits) * (log_q_l - math.log(smoothing))  # (B,)
    losses = chosen_term + rejected_term
    return LossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
