"""CPO: Contrastive Preference Optimization (Xu et al., 2024, arXiv:2401.08417), and CPO-SimPO.

Reference-free: a DPO-like sigmoid loss on the policy's own log-probs plus a behaviour-cloning NLL
term on the chosen answer. Its SimPO variant (TRL ``CPOConfig(loss_type="simpo")``) averages the
log-probs per token and subtracts a target margin, keeping the NLL term.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_choice, check_range, check_same_shape
from dpokit.losses.nll import chosen_nll_term

CPO_VARIANTS = ("sigmoid", "simpo")


def cpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    chosen_lengths: Tensor,
    rejected_lengths: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 1.0,
    variant: str = "sigmoid",
    gamma: float = 0.5,
    label_smoothing: float = 0.0,
) -> LossOutput:
    """CPO loss per example (or CPO-SimPO with ``variant="simpo"``).

    Equation (s = summed log-probs for ``sigmoid``, per-token averages ``logp/|y|`` for
    ``simpo``; eps = label_smoothing)::

        z    = beta * (s(y_w) - s(y_l))              variant "sigmoid" (CPO)
        z    = beta * (s(y_w) - s(y_l)) - gamma      variant "simpo"
        loss = (1 - eps) * -log sigmoid(z) + eps * -log sigmoid(-z) + alpha * -logp(y_w)/|y_w|

    Args:
        policy_chosen_logps: ``(B,)`` log pi_theta(y_w|x), SUMMED over completion tokens.
        policy_rejected_logps: ``(B,)`` same for y_l.
        chosen_lengths, rejected_lengths: ``(B,)`` completion token counts (0 read as 1).
        beta: > 0 (default 0.1, TRL's and the paper's).
        alpha: weight of the NLL term, >= 0 (default 1.0; TRL ``cpo_alpha``).
        variant: ``"sigmoid"`` (CPO, default) or ``"simpo"`` (TRL ``loss_type``).
        gamma: ``"simpo"`` only: ABSOLUTE target margin, >= 0 (default 0.5; TRL ``simpo_gamma``,
            which TRL also applies as ``beta * (margin - simpo_gamma / beta)``).
        label_smoothing: conservative smoothing eps in [0, 0.5) (default 0; TRL's CPO
            ``label_smoothing``, the cDPO form, NOT rDPO's flip rate).

    Returns:
        :class:`LossOutput` with rewards ``beta * s`` (detached, TRL's);
        ``metrics["preference_loss"]`` (the sigmoid part) and ``metrics["nll_loss"]`` (the
        unweighted per-token NLL of y_w).

    Raises:
        ValueError: a hyperparameter out of range or an unknown ``variant``; shapes differ.

    Source: Xu et al. 2024, arXiv:2401.08417, L_CPO = L_prefer + L_NLL (TRL quotes its Eq. 3
    for the preference part); the SimPO variant follows Meng et al. 2024, arXiv:2405.14734.

    Traps: no reference model -- the "log-ratios" are raw log-probs, so with summed log-probs a
    long answer dominates; use ``simpo`` for per-token averages. Equal chosen and rejected
    log-probs give ``ln 2 + alpha * nll`` (``sigmoid``) and ``nls(-gamma) + alpha * nll``
    (``simpo``): no first-loss invariant to check against. TRL's NLL is a token mean over the
    whole batch; here per-token per example (equal for equal chosen lengths). TRL's CPO defaults
    (beta 0.1, gamma 0.5) are not SimPO's paper (beta 2-10, gamma about 0.5 * beta).
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("alpha", alpha, 0.0)
    check_choice("variant", variant, CPO_VARIANTS)
    check_range("gamma", gamma, 0.0)
    check_range("label_smoothing", label_smoothing, 0.0, 0.5, high_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        chosen_lengths=chosen_lengths,
        rejected_lengths=rejected_lengths,
    )
    chosen, rejected = policy_chosen_logps, policy_rejected_logps  # (B,)
    if variant == "simpo":
        dtype = policy_chosen_logps.dtype
        chosen = chosen / chosen_lengths.to(dtype).clamp(min=1.0)
        rejected = rejected / rejected_lengths.to(dtype).clamp(min=1.0)
    logits = beta * (chosen - rejected)  # (B,)
    if variant == "simpo":
        logits = logits - gamma
    # cDPO-style smoothing: (1 - eps) * nls(z) + eps * nls(-z); eps = 0 is CPO's Eq. as printed.
    eps = label_smoothing
    preference = -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)  # (B,)
    nll = chosen_nll_term(policy_chosen_logps, chosen_lengths, 1.0)  # (B,)
    return LossOutput(
        losses=preference + alpha * nll,
        chosen_rewards=beta * chosen.detach(),
        rejected_rewards=beta * rejected.detach(),
        metrics={"preference_loss": preference.detach(), "nll_loss": nll.detach()},
    )
