"""f-DPO: DPO under other f-divergence constraints (Wang et al., 2023, arXiv:2309.16240).

DPO's implicit reward ``beta * log(pi/pi_ref)`` comes from the reverse-KL constraint. Under an
f-divergence constraint the reward is ``beta * f'(pi/pi_ref)`` plus a term that cancels between
chosen and rejected, so f-DPO is DPO with ``rho = log u`` replaced by ``f'(u)``, ``u = pi/pi_ref``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_choice, check_range, check_same_shape

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")

# exp() argument cap, as TRL 1.16: exp(80) ~ 5.5e34 stays finite in fp32/bf16; fp16 overflows
# above ~11.1. Beyond the cap the score is constant (zero gradient): such a pair is far off.
_EXP_CAP = {torch.float16: 11.0}
_DEFAULT_EXP_CAP = 80.0


def _capped_exp_minus_one(t: Tensor) -> Tensor:
    """``exp(t) - 1`` with ``t`` capped from above, computed in at least fp32, dtype kept."""
    cap = _EXP_CAP.get(t.dtype, _DEFAULT_EXP_CAP)
    wide = t.float() if t.dtype in (torch.float16, torch.bfloat16) else t
    return torch.expm1(wide.clamp(max=cap)).to(t.dtype)


def f_divergence_scores(
    logratios: Tensor,
    *,
    divergence: str = "reverse_kl",
    alpha_coef: float = 0.5,
) -> Tensor:
    """``f'(u)`` of each sequence, ``u = pi/pi_ref = exp(rho)``, up to an additive constant.

    Equation (c = alpha_coef)::

        reverse_kl:        rho                          (f(u) = u log u: DPO)
        forward_kl:        1 - exp(-rho)                (f(u) = -log u)
        js_divergence:     log 2 + log sigmoid(rho)     (= log(2u / (1 + u)))
        alpha_divergence:  (exp((c - 1) * rho) - 1) / (c - 1);  c = 1 gives rho, c = 0 forward_kl

    Args:
        logratios: ``rho = logp(y) - ref(y)``, any shape (``(B,)`` summed log-ratios here).
        divergence: one of :data:`F_DIVERGENCES` (TRL ``f_divergence_type``; default reverse KL).
        alpha_coef: the alpha-divergence coefficient c in [0, 1] (TRL 1.16's
            ``f_alpha_divergence_coef``, default 0.5); used only by ``alpha_divergence``.

    Returns:
        Tensor of ``logratios``' shape and dtype.

    Raises:
        ValueError: unknown ``divergence``; ``alpha_coef`` outside [0, 1].

    Traps: the PAPER's alpha is ``1 - c``: its ``f'(u) = (1 - u**-alpha) / alpha`` is
    ``(u**(c-1) - 1) / (c - 1)``. TRL before 1.0 used the paper's alpha (``u**-alpha``) under the
    same name; at the common 0.5 the two agree. ``exp`` is capped as in TRL (see module); with
    fp16 inputs a capped score times ``1 / (1 - c)`` can still overflow, so pass fp32 log-probs
    (dpokit's scorer always returns fp32).
    """
    check_choice("divergence", divergence, F_DIVERGENCES)
    check_range("alpha_coef", alpha_coef, 0.0, 1.0)
    if divergence == "reverse_kl" or (divergence == "alpha_divergence" and alpha_coef == 1.0):
        return logratios
    if divergence == "js_divergence":
        return math.log(2.0) + F.logsigmoid(logratios)
    exponent = -1.0 if divergence == "forward_kl" else alpha_coef - 1.0  # in [-1, 0)
    return _capped_exp_minus_one(exponent * logratios) / exponent


def fdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    divergence: str = "reverse_kl",
    alpha_coef: float = 0.5,
) -> LossOutput:
    """f-DPO loss per example: DPO's sigmoid loss on the difference of ``f'(pi/pi_ref)``.

    Equation (s = :func:`f_divergence_scores`)::

        rho_w = logp(y_w) - ref(y_w),  rho_l = logp(y_l) - ref(y_l)
        loss  = -log sigmoid(beta * (s(rho_w) - s(rho_l)))

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` summed completion log-probs, as for DPO.
        beta: > 0 (default 0.1).
        divergence: ``"reverse_kl"`` (DPO, default), ``"forward_kl"``, ``"js_divergence"`` or
            ``"alpha_divergence"`` (TRL ``f_divergence_type``).
        alpha_coef: c in [0, 1] for ``alpha_divergence`` (TRL 1.16 ``f_alpha_divergence_coef``;
            the paper's alpha is 1 - c). Default 0.5.

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached, as TRL logs them whatever the
        divergence), and ``metrics["chosen_f_score"]``/``["rejected_f_score"]`` = ``s(rho)``.

    Raises:
        ValueError: a hyperparameter out of range or unknown; shapes differ.

    Source: Wang, Jiang, Yang, Liu and Chen 2023, Beyond Reverse KL, arXiv:2309.16240 (f-DPO's
    loss with the f' of its table of divergences).

    Traps: with policy == reference every divergence gives ln 2 (all scores equal). Only the
    difference of scores is meaningful: the constant dropped from each f' cancels, and so does
    the log-partition term that makes this valid. ``forward_kl`` and small ``alpha_coef`` blow
    up as ``exp(-rho)`` when the policy makes an answer much LESS likely than the reference.
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
    options = {"divergence": divergence, "alpha_coef": alpha_coef}
    chosen_scores = f_divergence_scores(chosen_logratios, **options)  # (B,)
    rejected_scores = f_divergence_scores(rejected_logratios, **options)  # (B,)
    return LossOutput(
        losses=-F.logsigmoid(beta * (chosen_scores - rejected_scores)),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={
            "chosen_f_score": chosen_scores.detach(),
            "rejected_f_score": rejected_scores.detach(),
        },
    )
