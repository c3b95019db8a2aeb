"""DPO: Direct Preference Optimization (Rafailov et al., 2023, arXiv:2305.18290).

Also the loss of two methods that only change its inputs (no copies of the loss exist):

* Segment-level DPO, SDPO (Kong et al., 2025, arXiv:2501.01821): chosen and rejected sessions share
  the dialogue up to the first erroneous agent turn and end at the same segment end; the log-probs
  passed here are summed over the agent's turns inside that segment only (the shared prefix and the
  partner's turns are masked context). Turns present in both sessions cancel, which is the point.
* Stepwise DPO, sDPO (Kim et al., 2024, arXiv:2403.19270): the data is split into chunks and chunk
  t is trained with the model after chunk t-1 as the frozen reference. Only the reference changes;
  the loss is this one.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """DPO loss per example.

    Equation::

        rho_w = logp(y_w) - ref(y_w),  rho_l = logp(y_l) - ref(y_l),  h = rho_w - rho_l
        loss  = -log sigmoid(beta * h)

    Args:
        policy_chosen_logps: ``(B,)`` log pi_theta(y_w|x), summed over completion tokens.
        policy_rejected_logps: ``(B,)`` log pi_theta(y_l|x).
        reference_chosen_logps: ``(B,)`` log pi_ref(y_w|x); no gradient expected.
        reference_rejected_logps: ``(B,)`` log pi_ref(y_l|x).
        beta: inverse temperature of the implicit reward, > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with ``losses`` ``(B,)`` and rewards ``beta * rho`` (detached).

    Traps: sum (not average) the log-probs over completion tokens only; with policy == reference
    every example gives ln 2 = 0.693147, the first logged loss of every correct run.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) rho_w
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) rho_l
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    losses = -F.logsigmoid(logits)  # (B,) stable for any logit, unlike log(sigmoid)
    return LossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
