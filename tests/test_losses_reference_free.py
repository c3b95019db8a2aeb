"""ORPO, CPO (and CPO-SimPO) and the chosen-answer NLL term: worked examples by hand, float64
gradient checks, the value at equal chosen/rejected log-probs, equality with TRL 1.16's formulas
(re-written here from reading ``trl/experimental/{orpo,cpo}`` and ``trl/trainer/dpo_trainer.py``;
TRL is not imported) and bad hyperparameters.

Notation: nls(z) = -log sigmoid(z) = log(1 + exp(-z)); a = per-token average log-prob.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from dpokit.losses.cpo import cpo_loss
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.nll import add_chosen_nll, chosen_nll_term
from dpokit.losses.orpo import log1mexp, log_odds, orpo_loss

TOL = 1e-6
LN2 = math.log(2.0)


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected: float) -> bool:
    return abs(actual.item() - expected) < TOL


def leaf(values: torch.Tensor) -> torch.Tensor:
    return values.detach().to(torch.float64).requires_grad_(True)


# ---- ORPO ------------------------------------------------------------------------------------


def test_orpo_worked_example():
    # a_w = -0.5, a_l = -1.0, beta = 0.1
    # log odds(y_w) = -0.5 - log(1 - e^-0.5) = -0.5 - log(1 - 0.606531) = -0.5 - log(0.393469)
    #               = -0.5 + 0.932752 = 0.432752
    # log odds(y_l) = -1.0 - log(1 - e^-1) = -1.0 - log(0.632121) = -1.0 + 0.458675 = -0.541325
    # log odds ratio = 0.432752 + 0.541325 = 0.974077
    # L_OR = nls(0.974077) = log(1 + e^-0.974077) = log(1 + 0.377541) = 0.320300
    # loss = -a_w + beta * L_OR = 0.5 + 0.1 * 0.320300 = 0.532030
    out = orpo_loss(t(-0.5), t(-1.0), beta=0.1)
    assert close(out.losses, 0.532030)
    assert close(out.metrics["log_odds_ratio"], 0.974077)
    assert close(out.metrics["odds_ratio_loss"], 0.320300)
    assert close(out.metrics["nll_loss"], 0.5)
    # rewards beta * a: 0.1 * -0.5 = -0.05, 0.1 * -1.0 = -0.1
    assert close(out.chosen_rewards, -0.05)
    assert close(out.rejected_rewards, -0.1)
    assert not out.chosen_rewards.requires_grad


def test_orpo_equal_answers_gives_nll_plus_beta_ln2():
    # equal averages: log odds ratio 0, L_OR = nls(0) = ln 2; loss = 0.7 + 0.2 * 0.693147 = 0.838629
    out = orpo_loss(t(-0.7), t(-0.7), beta=0.2)
    assert close(out.losses, 0.7 + 0.2 * LN2)
    assert close(out.losses, 0.838629)


def test_log1mexp_is_accurate_at_both_ends():
    # Near 0, log(-expm1(x)) is exact and log1p(-exp(x)) loses everything; far below, the
    # opposite: at x = -50, 1 - e^-50 rounds to 1 and the naive log gives 0, not -1.9287e-22.
    near = [-1e-10, -0.01, -0.5]
    far = [-0.7, -5.0, -50.0]
    exact = [math.log(-math.expm1(v)) for v in near] + [math.log1p(-math.exp(v)) for v in far]
    got = log1mexp(t(*near, *far))
    assert torch.allclose(got, t(*exact), rtol=1e-12, atol=0)
    assert abs(got[-1].item() - -1.9287498479639178e-22) < 1e-34
    # a probability of exactly 1 (a = 0) stays finite in the log odds
    assert torch.isfinite(log_odds(torch.zeros(2))).all()


def test_orpo_gradcheck():
    generator = torch.Generator().manual_seed(0)
    a_w = leaf(-(torch.rand(5, generator=generator, dtype=torch.float64) * 3 + 0.05))
    a_l = leaf(-(torch.rand(5, generator=generator, dtype=torch.float64) * 3 + 0.05))
    assert gradcheck(lambda w, lo: orpo_loss(w, lo, beta=0.3).losses, (a_w, a_l))


def _trl_log1mexp(x):
    # TRL 1.16 trl/experimental/orpo/orpo_trainer.py: branch at -ln 2
    return torch.where(
        x < -0.6931471805599453, torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x))
    )


def _token_batch(seed: int, batch: int, lengths: list[int], width: int):
    """Per-token log-probs (B, T) < 0 and a right-padded completion mask."""
    generator = torch.Generator().manual_seed(seed)
    token_logps = -torch.rand(batch, width, generator=generator, dtype=torch.float64) * 2 - 0.01
    mask = torch.arange(width)[None, :] < torch.tensor(lengths)[:, None]
    return token_logps * mask, mask


def test_orpo_matches_trl_formula():
    beta = 0.25
    # equal chosen lengths, completion-only labels: TRL's batch token-mean NLL = mean of ours
    chosen_tok, chosen_mask = _token_batch(1, 4, [6, 6, 6, 6], 6)
    rejected_tok, rejected_mask = _token_batch(2, 4, [3, 7, 5, 2], 7)
    a_w = chosen_tok.sum(1) / chosen_mask.sum(1)
    a_l = rejected_tok.sum(1) / rejected_mask.sum(1)
    # TRL odds_ratio_loss + get_batch_loss_metrics
    trl_log_odds = (a_w - a_l) - (_trl_log1mexp(a_w) - _trl_log1mexp(a_l))
    trl_or = beta * F.logsigmoid(trl_log_odds)
    trl_nll = -chosen_tok[chosen_mask].mean()  # nn.CrossEntropyLoss over the chosen tokens
    trl_loss = trl_nll - trl_or.mean()
    out = orpo_loss(a_w, a_l, beta=beta)
    assert torch.allclose(out.loss, trl_loss, rtol=0, atol=1e-12)
    assert torch.allclose(out.metrics["log_odds_ratio"], trl_log_odds, rtol=0, atol=1e-12)
    assert torch.allclose(beta * out.metrics["odds_ratio_loss"], -trl_or, rtol=0, atol=1e-12)
    assert torch.allclose(out.chosen_rewards, beta * a_w)


# ---- CPO -------------------------------------------------------------------------------------

# logp(y_w) = -10 over 8 tokens (a_w = -1.25), logp(y_l) = -12 over 4 tokens (a_l = -3)
CPO_EXAMPLE = (t(-10.0), t(-12.0), t(8.0), t(4.0))


def test_cpo_sigmoid_worked_example():
    # z = beta * (logp_w - logp_l) = 0.1 * (-10 + 12) = 0.2
    # nls(0.2) = log(1 + e^-0.2) = log(1.818731) = 0.598139
    # NLL = -logp_w / |y_w| = 10 / 8 = 1.25; loss = 0.598139 + 1.0 * 1.25 = 1.848139
    out = cpo_loss(*CPO_EXAMPLE, beta=0.1, alpha=1.0)
    assert close(out.losses, 1.848139)
    assert close(out.metrics["preference_loss"], 0.598139)
    assert close(out.metrics["nll_loss"], 1.25)
    # rewards beta * logp: -1.0 and -1.2
    assert close(out.chosen_rewards, -1.0)
    assert close(out.rejected_rewards, -1.2)


def test_cpo_label_smoothing_worked_example():
    # eps = 0.1: 0.9 * nls(0.2) + 0.1 * nls(-0.2); nls(-0.2) = log(1 + e^0.2) = log(2.221403)
    # = 0.798139; 0.9 * 0.598139 + 0.1 * 0.798139 = 0.538325 + 0.079814 = 0.618139
    # + NLL 1.25 = 1.868139
    out = cpo_loss(*CPO_EXAMPLE, beta=0.1, alpha=1.0, label_smoothing=0.1)
    assert close(out.losses, 1.868139)


def test_cpo_simpo_worked_example():
    # averages a_w = -10/8 = -1.25, a_l = -12/4 = -3; beta = 2, gamma = 0.5
    # z = 2 * (-1.25 + 3) - 0.5 = 3.0; nls(3) = log(1 + e^-3) = log(1.049787) = 0.048587
    # loss = 0.048587 + 1.0 * 1.25 = 1.298587
    out = cpo_loss(*CPO_EXAMPLE, beta=2.0, alpha=1.0, variant="simpo", gamma=0.5)
    assert close(out.losses, 1.298587)
    # rewards beta * a: 2 * -1.25 = -2.5 and 2 * -3 = -6
    assert close(out.chosen_rewards, -2.5)
    assert close(out.rejected_rewards, -6.0)
    # alpha = 0 leaves SimPO's own loss (AlphaPO's default in TRL)
    assert close(cpo_loss(*CPO_EXAMPLE, beta=2.0, alpha=0.0, variant="simpo").losses, 0.048587)


def test_cpo_equal_answers():
    # logp_w = logp_l = -6 over 3 tokens each: nls(0) + NLL = ln 2 + 2 = 2.693147;
    # SimPO variant: nls(-gamma) + NLL = log(1 + e^0.5) + 2 = 0.974077 + 2 = 2.974077
    same = (t(-6.0), t(-6.0), t(3.0), t(3.0))
    assert close(cpo_loss(*same).losses, LN2 + 2.0)
    assert close(cpo_loss(*same, variant="simpo", gamma=0.5).losses, 2.974077)


@pytest.mark.parametrize("variant", ["sigmoid", "simpo"])
def test_cpo_gradcheck(variant):
    generator = torch.Generator().manual_seed(3)
    pw = leaf(-torch.rand(4, generator=generator, dtype=torch.float64) * 20)
    pl = leaf(-torch.rand(4, generator=generator, dtype=torch.float64) * 20)
    nw, nl = t(3.0, 5.0, 9.0, 1.0), t(7.0, 2.0, 4.0, 6.0)
    kwargs = dict(beta=0.5, alpha=0.7, variant=variant, gamma=0.3, label_smoothing=0.1)
    assert gradcheck(lambda w, lo: cpo_loss(w, lo, nw, nl, **kwargs).losses, (pw, pl))


@pytest.mark.parametrize("variant", ["sigmoid", "simpo"])
def test_cpo_matches_trl_formula(variant):
    beta, cpo_alpha, simpo_gamma, eps = 0.1, 1.0, 0.5, 0.05
    chosen_tok, chosen_mask = _token_batch(4, 5, [5] * 5, 5)  # equal chosen lengths
    rejected_tok, rejected_mask = _token_batch(5, 5, [2, 8, 4, 6, 3], 8)
    pw, pl = chosen_tok.sum(1), rejected_tok.sum(1)
    nw, nl = chosen_mask.sum(1), rejected_mask.sum(1)
    # TRL 1.16 CPOTrainer: average_log_prob for simpo, then cpo_loss, then + cpo_alpha * nll
    lw, ll = (pw / nw, pl / nl) if variant == "simpo" else (pw, pl)
    logits = lw - ll
    if variant == "simpo":
        logits = logits - simpo_gamma / beta
    trl_losses = -F.logsigmoid(beta * logits) * (1 - eps) - F.logsigmoid(-beta * logits) * eps
    trl_loss = trl_losses.mean() + cpo_alpha * -chosen_tok[chosen_mask].mean()
    out = cpo_loss(
        pw,
        pl,
        nw,
        nl,
        beta=beta,
        alpha=cpo_alpha,
        variant=variant,
        gamma=simpo_gamma,
        label_smoothing=eps,
    )
    assert torch.allclose(out.loss, trl_loss, rtol=0, atol=1e-12)
    assert torch.allclose(out.metrics["preference_loss"], trl_losses, rtol=0, atol=1e-12)
    assert torch.allclose(out.chosen_rewards, beta * lw)


# ---- the NLL term ----------------------------------------------------------------------------


def test_chosen_nll_term_worked_example():
    # weight * -logp / |y|: 0.5 * 10 / 4 = 1.25 and 0.5 * 3 / 1 = 1.5; a length of 0 reads as 1
    # and its sum is 0, so the term is 0
    term = chosen_nll_term(t(-10.0, -3.0, 0.0), t(4.0, 1.0, 0.0), 0.5)
    assert torch.allclose(term, t(1.25, 1.5, 0.0), rtol=0, atol=TOL)
    assert torch.equal(chosen_nll_term(t(-10.0), t(4.0), 0.0), t(0.0))


def test_add_chosen_nll_to_dpo_example_e():
    # DPO on example E (logp_w=-10, logp_l=-12, refs -11): 0.598139
    # RPO, alpha=1, |y_w|=5: + 10 / 5 = 2 -> 2.598139; the metric is the unweighted NLL, 2
    dpo = dpo_loss(t(-10.0), t(-12.0), t(-11.0), t(-11.0), beta=0.1)
    out = add_chosen_nll(dpo, t(-10.0), torch.tensor([5]), weight=1.0)
    assert close(out.losses, 2.598139)
    assert close(out.metrics["nll_loss"], 2.0)
    assert out.chosen_rewards is dpo.chosen_rewards
    # alpha = 0.25: 0.598139 + 0.25 * 2 = 1.098139, metric still 2
    quarter = add_chosen_nll(dpo, t(-10.0), torch.tensor([5]), weight=0.25)
    assert close(quarter.losses, 1.098139)
    assert close(quarter.metrics["nll_loss"], 2.0)


def test_rpo_at_policy_equals_reference():
    # DPO part ln 2 at policy == reference, plus the NLL: 0.693147 + 12 / 6 = 2.693147
    dpo = dpo_loss(t(-12.0), t(-9.0), t(-12.0), t(-9.0))
    assert close(add_chosen_nll(dpo, t(-12.0), t(6.0), weight=1.0).losses, LN2 + 2.0)


def test_chosen_nll_term_gradcheck():
    logps = leaf(torch.tensor([-3.0, -17.5, -0.2]))
    lengths = torch.tensor([2, 9, 1])
    assert gradcheck(lambda lp: chosen_nll_term(lp, lengths, 0.7), (logps,))


def test_chosen_nll_term_vs_trl_sft():
    # TRL 1.16 loss_type "sft": -chosen_per_token_logps[chosen_mask].mean(), one batch mean.
    tok, mask = _token_batch(7, 4, [5, 5, 5, 5], 5)
    ours = chosen_nll_term(tok.sum(1), mask.sum(1), 1.0).mean()
    assert torch.allclose(ours, -tok[mask].mean(), rtol=0, atol=1e-12)
    # Unequal lengths: TRL weighs each answer by its length, we weigh answers equally.
    tok, mask = _token_batch(8, 2, [1, 9], 9)
    per_answer = -tok.sum(1) / mask.sum(1)
    ours = chosen_nll_term(tok.sum(1), mask.sum(1), 1.0).mean()
    assert torch.allclose(ours, per_answer.mean())
    token_mean = (per_answer[0] * 1 + per_answer[1] * 9) / 10
    assert torch.allclose(-tok[mask].mean(), token_mean)


# ---- bad hyperparameters ---------------------------------------------------------------------

X, Y, N = torch.tensor([-10.0, -11.0]), torch.tensor([-12.0, -13.0]), torch.tensor([4, 5])

BAD_CALLS = {
    "orpo_beta_zero": (lambda: orpo_loss(X, Y, beta=0.0), r"beta must be > 0"),
    "orpo_beta_nan": (lambda: orpo_loss(X, Y, beta=float("nan")), r"beta"),
    "orpo_shapes": (lambda: orpo_loss(X, Y[:1]), r"same shape"),
    "cpo_beta": (lambda: cpo_loss(X, Y, N, N, beta=-1.0), r"beta must be > 0"),
    "cpo_alpha": (lambda: cpo_loss(X, Y, N, N, alpha=-0.1), r"alpha must be >= 0"),
    "cpo_variant": (lambda: cpo_loss(X, Y, N, N, variant="ipo"), r"variant must be one of"),
    "cpo_gamma": (lambda: cpo_loss(X, Y, N, N, variant="simpo", gamma=-1.0), r"gamma"),
    "cpo_smoothing": (
        lambda: cpo_loss(X, Y, N, N, label_smoothing=0.5),
        r"label_smoothing must be in \[0, 0\.5\)",
    ),
    "cpo_lengths_shape": (lambda: cpo_loss(X, Y, N[:1], N), r"same shape"),
    "nll_weight": (lambda: chosen_nll_term(X, N, -1.0), r"weight must be >= 0"),
    "nll_shapes": (lambda: chosen_nll_term(X, N[:1], 1.0), r"same shape"),
    "add_nll_weight": (
        lambda: add_chosen_nll(dpo_loss(X, Y, X, Y), X, N, weight=float("nan")),
        r"weight",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_hyperparameters_raise(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()
