"""cDPO: conservative DPO, label smoothing on DPO's sigmoid loss (Mitchell, 2023).

Source: Eric Mitchell, "A note on DPO with noisy preferences & relationship to IPO" (2023, a note
from the DPO authors, not on arXiv), and the ``label_smoothing`` option of the DPO authors' code.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def cdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    smoothing: float = 0.1,
) -> LossOutput:
    """Conservative DPO loss per example: DPO's cross-entropy against a smoothed label.

    Equation (z = beta * h, h = rho_w - rho_l as in :func:`dpokit.losses.dpo_loss`)::

        loss = (1 - smoothing) * -log sigmoid(z) + smoothing * -log sigmoid(-z)

    It is the binary cross-entropy of the Bradley-Terry probability sigmoid(z) against the target
    "y_w wins with probability 1 - smoothing", so its minimum is at a finite margin
    ``z* = log((1 - smoothing) / smoothing)`` (2.197225 at smoothing=0.1) instead of z -> infinity.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1).
        smoothing: probability given to "the rejected answer is the better one", in [0, 0.5)
            (default 0.1; 0 is DPO). Called ``label_smoothing`` in the DPO authors' code and in
            TRL before the 1.x refactor (``loss_type="sigmoid"``).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached).

    Raises:
        ValueError: ``beta`` <= 0, ``smoothing`` outside [0, 0.5), or tensors of different shapes.

    Traps: not rDPO (:func:`dpokit.losses.rdpo_loss`), which SUBTRACTS the flipped term and divides
    by ``1 - 2*eps``. TRL 1.16 has no cDPO: its ``loss_type="sigmoid"`` ignores
    ``label_smoothing``, which it reads as rDPO's flip rate under ``"robust"``, as EXO's epsilon
    under ``"exo_pair"`` and as this smoothing only under ``"aot"``/``"aot_unpaired"``. With
    policy == reference the loss is ln 2 = 0.693147 for any smoothing.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("smoothing", smoothing, 0.0, 0.5, high_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,) rho_w
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,) rho_l
    logits = beta * (chosen_logratios - rejected_logratios)  # (B,)
    losses = (1 - smoothing) * -F.logsigmoid(logits) + smoothing * -F.logsigmoid(-logits)
    return LossOutput(
        losses=losses,
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
    )
