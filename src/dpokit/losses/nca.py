"""NCA: noise contrastive alignment, pairwise form (Chen et al., 2024, "Noise Contrastive
Alignment of Language Models with Explicit Rewards", arXiv:2402.05369)."""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def nca_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """Pairwise NCA loss per example: absolute (not relative) likelihood targets.

    Equation (r = beta * rho, rho = logp(y) - ref(y))::

        loss = -log sigmoid(r_w) - 1/2 * log sigmoid(-r_w) - 1/2 * log sigmoid(-r_l)

    The first term classifies y_w as data (r_w up); the two halves are the noise-contrastive
    regulariser over both responses (r down). Only the chosen reward's optimum is finite in pairs
    (r_w* = log 2 = 0.693147); r_l is pushed down without a floor.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0 or tensors of different shapes.

    Traps: the loss depends on rho_w and rho_l separately, not only on h, so shifting both by the
    same amount changes it (unlike DPO). With policy == reference it is 2 ln 2 = 1.386294, not
    ln 2. The paper's general NCA takes K responses with reward-model scores (soft targets); this
    is the pairwise case with a hard preference label, as in TRL's ``nca_pair``.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # (B,) r_w
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # (B,) r_l
    losses = (
        -F.logsigmoid(chosen_rewards)
        - 0.5 * F.logsigmoid(-chosen_rewards)
        - 0.5 * F.logsigmoid(-rejected_rewards)
    )
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
    )
