"""ORPO: Monolithic Preference Optimization without Reference Model (Hong et al., 2024,
arXiv:2403.07691). SFT and preference alignment in one loss, no reference model."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape

_LN_HALF = -math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x < 0``, accurate at both ends (Maechler 2012).

    ``log(-expm1(x))`` loses nothing near 0, ``log1p(-exp(x))`` nothing far below; the switch is
    at ``-ln 2``. ``x = 0`` gives ``-inf`` and ``x > 0`` NaN: the caller keeps ``x`` negative.
    """
    # Each branch is evaluated on a clamped copy so that torch.where's unused side stays finite
    # and cannot poison the gradient with inf * 0.
    near = x.clamp(min=_LN_HALF)
    far = x.clamp(max=_LN_HALF)
    return torch.where(x > _LN_HALF, torch.log(-torch.expm1(near)), torch.log1p(-torch.exp(far)))


def log_odds(avg_logps: Tensor) -> Tensor:
    """ORPO's log odds of an answer from its per-token average log-prob ``a``, shape kept.

    ``odds = P / (1 - P)`` with ``P = exp(a)``, so ``log odds = a - log(1 - exp(a))``. ``a`` is
    clamped to just below 0 (the smallest normal number of its dtype), where a probability of
    exactly 1 would give an infinite log odds.
    """
    tiny = torch.finfo(avg_logps.dtype).tiny
    avg_logps = avg_logps.clamp(max=-tiny)
    return avg_logps - log1mexp(avg_logps)


def orpo_loss(
    policy_chosen_avg_logps: Tensor,
    policy_rejected_avg_logps: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ORPO loss per example: NLL of the chosen answer plus a weighted odds-ratio term.

    Equation (a = per-token average log-prob, P = exp(a))::

        log_odds(y) = a(y) - log(1 - exp(a(y)))
        L_OR        = -log sigmoid(log_odds(y_w) - log_odds(y_l))
        loss        = -a(y_w) + beta * L_OR

    Args:
        policy_chosen_avg_logps: ``(B,)`` per-token AVERAGE log-prob of y_w (sum / |y_w|), < 0.
        policy_rejected_avg_logps: ``(B,)`` same for y_l.
        beta: weight of the odds-ratio term, the paper's lambda, > 0 (default 0.1 as in TRL's
            ``ORPOConfig.beta``; the paper's authors call it ``alpha`` in their code).

    Returns:
        :class:`LossOutput` with rewards ``beta * a`` (detached), TRL's logged rewards;
        ``metrics["nll_loss"]`` = ``-a(y_w)``, ``metrics["odds_ratio_loss"]`` = ``L_OR``
        (unweighted) and ``metrics["log_odds_ratio"]`` = ``log_odds(y_w) - log_odds(y_l)``.

    Raises:
        ValueError: ``beta`` <= 0 or not a number; shapes differ.

    Source: Hong, Lee and Thorne 2024, arXiv:2403.07691: L_ORPO = L_SFT + lambda * L_OR, with the
    odds of the length-normalised likelihood (TRL quotes its Eqs. 4 and 7 for the odds ratio).

    Traps: the odds use AVERAGED log-probs (with sums P is ~0 and the odds ratio is DPO without a
    reference); no reference model at all. With equal chosen and rejected averages the loss is
    ``-a(y_w) + beta * ln 2``. TRL names: ``beta`` here is ``ORPOConfig.beta`` (lambda); TRL
    logs ``log_odds_chosen`` for our ``log_odds_ratio`` and ``log_odds_ratio`` for
    ``log sigmoid(...)`` = ``-odds_ratio_loss``. TRL's NLL is a token mean over the whole batch
    and includes the prompt tokens; here it is the chosen completion's per-token mean, per
    example (equal to TRL's when all chosen answers have the same length and no prompt is
    scored).
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_avg_logps=policy_chosen_avg_logps,
        policy_rejected_avg_logps=policy_rejected_avg_logps,
    )
    log_odds_ratio = log_odds(policy_chosen_avg_logps) - log_odds(policy_rejected_avg_logps)
    odds_ratio_loss = -F.logsigmoid(log_odds_ratio)  # (B,) L_OR
    nll = -policy_chosen_avg_logps  # (B,) L_SFT on the completion, per token
    return LossOutput(
        losses=nll + beta * odds_ratio_loss,
        chosen_rewards=beta * policy_chosen_avg_logps.detach(),
        rejected_rewards=beta * policy_rejected_avg_logps.detach(),
        metrics={
            "nll_loss": nll.detach(),
            "odds_ratio_loss": odds_ratio_loss.detach(),
            "log_odds_ratio": log_odds_ratio.detach(),
        },
    )
