"""The options on pairwise methods -- LD-DPO, f-DPO, WPO weighting -- and combined objectives:
worked examples by hand, float64 gradient checks, the ln 2 invariant at policy == reference, and
equality with TRL 1.16's formulas (re-written here from ``trl/trainer/dpo_trainer.py``, not
imported), plus a direct full-logits check of WPO's per-token quantity.

Example E: logp(y_w)=-10, logp(y_l)=-12, ref(y_w)=ref(y_l)=-11, so rho_w=+1, rho_l=-1.
nls(z) = -log sigmoid(z) = log(1 + exp(-z)).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from dpokit.losses.base import LossOutput
from dpokit.losses.combine import combine_losses
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.fdpo import F_DIVERGENCES, f_divergence_scores, fdpo_loss
from dpokit.losses.ld_dpo import ld_sequence_logps, ld_token_weights
from dpokit.losses.nll import chosen_nll_term
from dpokit.losses.wpo import (
    apply_pair_weights,
    log_sum_sq_probs,
    wpo_weights,
    wpo_weights_from_sums,
)

TOL = 1e-6
LN2 = math.log(2.0)
NAN = float("nan")


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def close(actual: torch.Tensor, expected: float) -> bool:
    return abs(actual.item() - expected) < TOL


def example_e() -> tuple[torch.Tensor, ...]:
    return t(-10.0), t(-12.0), t(-11.0), t(-11.0)


def random_logps(n: int, seed: int, batch: int = 5, scale: float = 3.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (torch.randn(batch, generator=generator, dtype=torch.float64) * scale).requires_grad_()
        for _ in range(n)
    ]


# ---- LD-DPO ----------------------------------------------------------------------------------

# One pair. y_w: 3 completion tokens after a 2-token prompt; y_l: 5 tokens after a 1-token
# prompt. NaN marks positions off the completion mask (prompt, padding): they must be ignored.
LD_CHOSEN_MASK = torch.tensor([[0, 0, 1, 1, 1, 0]])
LD_REJECTED_MASK = torch.tensor([[0, 1, 1, 1, 1, 1, 0]])
LD_POLICY = (t(NAN, NAN, -1.0, -2.0, -3.0, NAN)[None], t(NAN, -1, -1, -1, -1, -1, NAN)[None])
LD_REFERENCE = (t(NAN, NAN, -1.5, -1.5, -1.5, NAN)[None], t(NAN, -2, -2, -2, -2, -2, NAN)[None])


def ld_pair(token_logps, alpha):
    chosen, rejected = token_logps
    return ld_sequence_logps(chosen, LD_CHOSEN_MASK, rejected, LD_REJECTED_MASK, alpha=alpha)


def test_ld_dpo_worked_example():
    # shared length l_p = min(3, 5) = 3; only y_l has a tail (its tokens 4 and 5)
    # policy:    y_w = -1 - 2 - 3 = -6;   y_l = (-1 - 1 - 1) + 0.5 * (-1 - 1) = -3 - 1 = -4
    # reference: y_w = 3 * -1.5 = -4.5;   y_l = (3 * -2) + 0.5 * (2 * -2) = -6 - 2 = -8
    pw, pl = ld_pair(LD_POLICY, 0.5)
    rw, rl = ld_pair(LD_REFERENCE, 0.5)
    assert close(pw, -6.0) and close(pl, -4.0) and close(rw, -4.5) and close(rl, -8.0)
    # rho_w = -6 + 4.5 = -1.5, rho_l = -4 + 8 = 4, h = -5.5; beta = 0.1:
    # nls(-0.55) = log(1 + e^0.55) = log(1 + 1.733253) = log(2.733253) = 1.005492
    assert close(dpo_loss(pw, pl, rw, rl, beta=0.1).losses, 1.005492)
    # alpha = 1 is plain DPO: y_l = -5 and -10, rho_l = 5, h = -6.5
    # nls(-0.65) = log(1 + e^0.65) = log(1 + 1.915541) = log(2.915541) = 1.070055
    pw1, pl1 = ld_pair(LD_POLICY, 1.0)
    rw1, rl1 = ld_pair(LD_REFERENCE, 1.0)
    assert close(pl1, -5.0) and close(rl1, -10.0)
    assert close(dpo_loss(pw1, pl1, rw1, rl1, beta=0.1).losses, 1.070055)
    # alpha = 0 drops the tail: y_l = -3
    assert close(ld_pair(LD_POLICY, 0.0)[1], -3.0)


def test_ld_token_weights_by_hand():
    chosen_w, rejected_w = ld_token_weights(LD_CHOSEN_MASK, LD_REJECTED_MASK, alpha=0.25)
    assert chosen_w.tolist() == [[0, 0, 1, 1, 1, 0]]
    assert rejected_w.tolist() == [[0, 1, 1, 1, 0.25, 0.25, 0]]


def test_ld_dpo_policy_equals_reference_is_ln2():
    pw, pl = ld_pair(LD_POLICY, 0.3)
    assert close(dpo_loss(pw, pl, pw, pl).losses, LN2)


def test_ld_dpo_gradcheck():
    generator = torch.Generator().manual_seed(0)
    chosen_mask = torch.tensor([[1, 1, 1, 0], [0, 1, 1, 1], [1, 1, 0, 0]])
    rejected_mask = torch.tensor([[1, 1, 1, 1, 1], [1, 0, 0, 0, 0], [0, 1, 1, 1, 0]])
    tensors = [
        (-torch.rand(3, width, generator=generator, dtype=torch.float64) * 3).requires_grad_()
        for width in (4, 5, 4, 5)
    ]

    def loss(pol_w, pol_l, ref_w, ref_l):
        pw, pl = ld_sequence_logps(pol_w, chosen_mask, pol_l, rejected_mask, alpha=0.4)
        rw, rl = ld_sequence_logps(ref_w, chosen_mask, ref_l, rejected_mask, alpha=0.4)
        return dpo_loss(pw, pl, rw, rl, beta=0.5).losses

    assert gradcheck(loss, tuple(tensors))


def _random_spans(generator, batch, width):
    """(B, T) masks, each a contiguous non-empty span (prompt before, padding after)."""
    starts = torch.randint(0, width // 2, (batch,), generator=generator)
    lengths = torch.randint(1, width // 2 + 1, (batch,), generator=generator)
    positions = torch.arange(width)[None, :]
    return (positions >= starts[:, None]) & (positions < (starts + lengths)[:, None])


@pytest.mark.parametrize("ld_alpha", [0.0, 0.35, 1.0])
def test_ld_dpo_matches_trl_formula(ld_alpha):
    generator = torch.Generator().manual_seed(11)
    batch, width = 6, 10
    chosen_mask = _random_spans(generator, batch, width)
    rejected_mask = _random_spans(generator, batch, width)
    tokens = -torch.rand(2 * batch, width, generator=generator, dtype=torch.float64) * 4
    # TRL's fused LM head returns 0 log-prob off the label mask; batch is [chosen; rejected]
    shift_completion_mask = torch.cat([chosen_mask, rejected_mask]).long()
    per_token_logps = tokens * shift_completion_mask
    comp_pos = shift_completion_mask.cumsum(dim=1)
    comp_lens = shift_completion_mask.sum(dim=1).long()
    chosen_lens, rejected_lens = comp_lens.chunk(2, dim=0)
    shared_lens = torch.minimum(chosen_lens, rejected_lens)
    shared_lens = torch.cat([shared_lens, shared_lens], dim=0)
    shared_mask = (comp_pos > 0) & (comp_pos <= shared_lens.unsqueeze(1))
    tail_mask = comp_pos > shared_lens.unsqueeze(1)
    trl = (per_token_logps * shared_mask).sum(1) + ld_alpha * (per_token_logps * tail_mask).sum(1)
    trl_chosen, trl_rejected = trl.chunk(2, dim=0)

    # ours gets garbage off the mask, which it must ignore
    garbage = torch.full_like(tokens, -1e4)
    ours_tokens = torch.where(shift_completion_mask.bool(), tokens, garbage)
    chosen_tokens, rejected_tokens = ours_tokens.chunk(2, dim=0)
    chosen, rejected = ld_sequence_logps(
        chosen_tokens, chosen_mask, rejected_tokens, rejected_mask, alpha=ld_alpha
    )
    assert torch.allclose(chosen, trl_chosen, rtol=0, atol=1e-12)
    assert torch.allclose(rejected, trl_rejected, rtol=0, atol=1e-12)


# ---- f-DPO -----------------------------------------------------------------------------------


def test_fdpo_worked_examples_on_e():
    e = example_e()
    # reverse KL is DPO: nls(0.1 * 2) = 0.598139
    assert close(fdpo_loss(*e, divergence="reverse_kl").losses, 0.598139)
    # forward KL, s = 1 - e^-rho: s_w = 1 - 0.367879 = 0.632121, s_l = 1 - 2.718282 = -1.718282
    # diff 2.350402; nls(0.235040) = log(1 + e^-0.235040) = log(1 + 0.790539) = 0.582517
    out = fdpo_loss(*e, divergence="forward_kl")
    assert close(out.losses, 0.582517)
    assert close(out.metrics["chosen_f_score"], 0.632121)
    assert close(out.metrics["rejected_f_score"], -1.718282)
    # rewards stay beta * rho, as in TRL: 0.1 and -0.1
    assert close(out.chosen_rewards, 0.1) and close(out.rejected_rewards, -0.1)
    # JS, s = log 2 + log sigmoid(rho): s_w - s_l = logsig(1) - logsig(-1) = 1 exactly
    # nls(0.1) = log(1 + e^-0.1) = log(1 + 0.904837) = 0.644397
    assert close(fdpo_loss(*e, divergence="js_divergence").losses, 0.644397)
    # alpha-divergence c = 0.5, s = (e^(-0.5 rho) - 1) / -0.5 = 2 * (1 - e^(-rho/2)):
    # s_w = 2 * (1 - 0.606531) = 0.786939, s_l = 2 * (1 - 1.648721) = -1.297443, diff 2.084381
    # nls(0.208438) = log(1 + 0.811851) = 0.594349
    assert close(fdpo_loss(*e, divergence="alpha_divergence").losses, 0.594349)
    # c = 0.3: s = (e^(-0.7 rho) - 1) / -0.7: s_w = (1 - 0.496585) / 0.7 = 0.719164,
    # s_l = (1 - 2.013753) / 0.7 = -1.448218, diff 2.167382; nls(0.216738) = 0.590639
    out = fdpo_loss(*e, divergence="alpha_divergence", alpha_coef=0.3)
    assert close(out.losses, 0.590639)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_fdpo_policy_equals_reference_is_ln2(divergence):
    same = t(-11.0, -3.0), t(-7.0, -40.0)
    out = fdpo_loss(*same, *same, divergence=divergence, alpha_coef=0.2)
    assert torch.allclose(out.losses, t(LN2, LN2), rtol=0, atol=TOL)


def test_fdpo_alpha_limits_and_paper_convention():
    rho = t(-2.0, -0.3, 0.0, 0.7, 3.0)
    scores = lambda **kw: f_divergence_scores(rho, **kw)  # noqa: E731
    # c = 1 is reverse KL, c = 0 is forward KL (exactly, not in the limit)
    assert torch.equal(scores(divergence="alpha_divergence", alpha_coef=1.0), rho)
    assert torch.allclose(
        scores(divergence="alpha_divergence", alpha_coef=0.0), scores(divergence="forward_kl")
    )
    # the paper's f'(u) = (1 - u^-a) / a with a = 1 - c (as TRL < 1.0 computed it)
    a = 1.0 - 0.3
    paper = (1.0 - torch.exp(-a * rho)) / a
    assert torch.allclose(scores(divergence="alpha_divergence", alpha_coef=0.3), paper)


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_fdpo_gradcheck(divergence):
    tensors = random_logps(4, seed=5, scale=1.0)
    fn = lambda *x: fdpo_loss(*x, beta=0.7, divergence=divergence, alpha_coef=0.4).losses  # noqa: E731
    assert gradcheck(fn, tuple(tensors))


def _trl_fdpo_losses(pc, pr, rc, rr, beta, f_divergence_type, coef):
    # TRL 1.16 DPOTrainer._compute_loss, loss_type "sigmoid"
    chosen_logratios, rejected_logratios = pc - rc, pr - rr
    if f_divergence_type == "reverse_kl":
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    elif f_divergence_type == "forward_kl":
        chosen_scores = 1 - torch.exp(-chosen_logratios)
        rejected_scores = 1 - torch.exp(-rejected_logratios)
    elif f_divergence_type == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    else:
        scale = 1.0 / (coef - 1.0)
        t_chosen = torch.clamp(((coef - 1.0) * chosen_logratios).float(), max=80.0)
        t_rejected = torch.clamp(((coef - 1.0) * rejected_logratios).float(), max=80.0)
        chosen_scores = (torch.exp(t_chosen) - 1.0) * scale
        rejected_scores = (torch.exp(t_rejected) - 1.0) * scale
    return -F.logsigmoid(beta * (chosen_scores - rejected_scores))


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_fdpo_matches_trl_formula(divergence):
    # float32, as TRL runs it (its alpha-divergence cap table has no float64 entry)
    pc, pr, rc, rr = (x.detach().float() for x in random_logps(4, seed=9, batch=64, scale=2.0))
    ours = fdpo_loss(pc, pr, rc, rr, beta=0.2, divergence=divergence, alpha_coef=0.35).losses
    theirs = _trl_fdpo_losses(pc, pr, rc, rr, 0.2, divergence, 0.35)
    assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)


def test_fdpo_alpha_cap_keeps_the_loss_finite():
    # rho_w = -500: exp(0.5 * 500) would overflow fp32; the cap keeps a finite (large) loss
    pc, pr, ref = torch.tensor([-600.0]), torch.tensor([-100.0]), torch.tensor([-100.0])
    out = fdpo_loss(pc, pr, ref, ref, divergence="alpha_divergence", alpha_coef=0.5)
    assert torch.isfinite(out.losses).all() and out.losses.item() > 1e30


# ---- WPO -------------------------------------------------------------------------------------


def _logits_of(*distributions: tuple[float, ...]) -> torch.Tensor:
    """Logits (T, V) whose softmax rows are the given probability vectors."""
    return torch.log(torch.tensor(distributions, dtype=torch.float64))


def test_wpo_worked_example():
    # y_w: token 0 under (0.8, 0.2), then token 1 under (0.5, 0.5); y_l: token 1 under (0.8, 0.2)
    # sum p^2: 0.8^2 + 0.2^2 = 0.68 and 0.5^2 + 0.5^2 = 0.5
    # y_w aligned: log(0.8 / 0.68) = log(1.176471) = 0.162519; log(0.5 / 0.5) = 0
    #   mean 0.081259 -> w(y_w) = e^0.081259 = 1.084652
    # y_l aligned: log(0.2 / 0.68) = log(0.294118) -> w(y_l) = 0.294118
    # pair weight 1.084652 * 0.294118 = 0.319015
    chosen_logits = _logits_of((0.8, 0.2), (0.5, 0.5))[None]  # (1, 2, 2)
    rejected_logits = _logits_of((0.8, 0.2), (0.5, 0.5))[None]  # second position is padding
    chosen_labels, rejected_labels = torch.tensor([[0, 1]]), torch.tensor([[1, 0]])
    chosen_mask, rejected_mask = torch.tensor([[1, 1]]), torch.tensor([[1, 0]])

    def token_logps(logits, labels):
        return logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)

    weights = wpo_weights(
        token_logps(chosen_logits, chosen_labels),
        log_sum_sq_probs(chosen_logits),
        chosen_mask,
        token_logps(rejected_logits, rejected_labels),
        log_sum_sq_probs(rejected_logits),
        rejected_mask,
    )
    assert close(weights, 0.319015)
    # weighted DPO on example E: 0.319015 * 0.598139 = 0.190815
    out = apply_pair_weights(dpo_loss(*example_e(), beta=0.1), weights)
    assert close(out.losses, 0.190815)
    assert close(out.metrics["wpo_weight"], 0.319015)
    # TRL < 1.0 capped the pair weight at 1: unchanged here; a weight of 2.5 would become 1
    assert close(wpo_weights_from_sums(t(0.0), t(0.0), t(-5.0), t(-5.0), t(5.0), t(5.0)), math.e**2)
    capped = wpo_weights_from_sums(t(0.0), t(0.0), t(-5.0), t(-5.0), t(5), t(5), max_weight=1.0)
    assert close(capped, 1.0)


def test_wpo_matches_direct_full_logits_computation():
    generator = torch.Generator().manual_seed(2)
    batch, width, vocab = 3, 6, 11
    logits = torch.randn(2 * batch, width, vocab, generator=generator, dtype=torch.float64) * 2
    labels = torch.randint(0, vocab, (2 * batch, width), generator=generator)
    mask = torch.rand(2 * batch, width, generator=generator) < 0.7
    mask[:, 0] = True  # every answer has a token
    # direct: probabilities, their squares, the ratio -- no log-space tricks
    probs = logits.softmax(-1)
    p_label = probs.gather(-1, labels[..., None]).squeeze(-1)
    aligned = torch.log(p_label / (probs**2).sum(-1))
    per_answer = torch.exp((aligned * mask).sum(1) / mask.sum(1))
    direct = per_answer[:batch] * per_answer[batch:]
    # the pieces the engine would provide: token log-probs and log_sum_sq_probs per position
    token_logps = logits.log_softmax(-1).gather(-1, labels[..., None]).squeeze(-1)
    lssp = log_sum_sq_probs(logits)
    ours = wpo_weights(
        token_logps[:batch], lssp[:batch], mask[:batch],
        token_logps[batch:], lssp[batch:], mask[batch:],
    )  # fmt: skip
    assert torch.allclose(ours, direct, rtol=1e-12, atol=0)
    # TRL 1.16: aligned = (per_token_logps - log_sum_sq_probs) * mask; mean; exp; product
    trl_mean = ((token_logps - lssp) * mask).sum(1) / mask.sum(1).clamp_min(1)
    chosen_w, rejected_w = torch.exp(trl_mean).chunk(2, dim=0)
    assert torch.allclose(ours, chosen_w * rejected_w, rtol=1e-12, atol=0)
    # the (B,) route: sums over completion tokens, same weights
    sums = wpo_weights_from_sums(
        (token_logps * mask)[:batch].sum(1), (token_logps * mask)[batch:].sum(1),
        (lssp * mask)[:batch].sum(1), (lssp * mask)[batch:].sum(1),
        mask[:batch].sum(1), mask[batch:].sum(1),
    )  # fmt: skip
    assert torch.allclose(sums, direct, rtol=1e-12, atol=0)


def test_log_sum_sq_probs_is_fp32_and_detached_for_bf16_logits():
    logits = torch.randn(4, 7, dtype=torch.bfloat16, requires_grad=True)
    out = log_sum_sq_probs(logits)
    assert out.dtype == torch.float32 and not out.requires_grad
    direct = torch.log((logits.float().softmax(-1) ** 2).sum(-1))
    assert torch.allclose(out, direct, atol=1e-6)


def test_wpo_weights_carry_no_gradient_and_weighted_loss_gradcheck():
    pc, pr, rc, rr = random_logps(4, seed=3)
    lengths = t(4, 6, 2, 9, 3)
    weights = wpo_weights_from_sums(pc, pr, pc.detach() * 0.9, pr.detach() * 0.9, lengths, lengths)
    assert not weights.requires_grad
    fn = lambda *x: apply_pair_weights(dpo_loss(*x, beta=0.3), weights).losses  # noqa: E731
    assert gradcheck(fn, (pc, pr, rc, rr))
    # at policy == reference the weighted loss is weight * ln 2
    same = apply_pair_weights(dpo_loss(rc, rr, rc, rr), weights).losses
    assert torch.allclose(same, weights * LN2)


# ---- combined objectives ---------------------------------------------------------------------


def bco_pair(pc, pr, rc, rr, beta=0.1) -> LossOutput:
    """TRL 1.16 ``bco_pair``: nls(beta * rho_w) + nls(-beta * rho_l) (written here for the test)."""
    losses = -F.logsigmoid(beta * (pc - rc)) - F.logsigmoid(-beta * (pr - rr))
    return LossOutput(losses=losses)


def mpo(pc, pr, rc, rr, chosen_lengths, weights=None):
    nll = LossOutput(losses=chosen_nll_term(pc, chosen_lengths, 1.0))
    parts = {"sigmoid": dpo_loss(pc, pr, rc, rr), "bco_pair": bco_pair(pc, pr, rc, rr), "sft": nll}
    return combine_losses(parts, weights or {"sigmoid": 0.8, "bco_pair": 0.2, "sft": 1.0})


def test_mpo_worked_example_on_e():
    # sigmoid: nls(0.2) = 0.598139; bco_pair: nls(0.1 * 1) + nls(-0.1 * -1) = 2 * 0.644397
    # = 1.288793; sft: 10 / 5 = 2. loss = 0.8 * 0.598139 + 0.2 * 1.288793 + 1.0 * 2
    # = 0.478511 + 0.257759 + 2 = 2.736270
    out = mpo(*example_e(), t(5.0))
    assert close(out.losses, 2.736270)
    assert close(out.metrics["loss/sigmoid"], 0.598139)  # unweighted components
    assert close(out.metrics["loss/bco_pair"], 1.288793)
    assert close(out.metrics["loss/sft"], 2.0)
    assert close(out.chosen_rewards, 0.1)  # from the first component with rewards (DPO)


def test_mpo_at_policy_equals_reference():
    # 0.8 ln 2 + 0.2 * 2 ln 2 + NLL = 1.2 * 0.693147 + 12 / 4 = 0.831777 + 3 = 3.831777
    same = t(-12.0), t(-7.0)
    assert close(mpo(*same, *same, t(4.0)).losses, 1.2 * LN2 + 3.0)


def test_combine_gradcheck_and_metrics_keep_component_metrics():
    pc, pr, rc, rr = random_logps(4, seed=8)
    lengths = t(3, 1, 7, 2, 5)
    assert gradcheck(lambda *x: mpo(*x, lengths).losses, (pc, pr, rc, rr))
    orpo_like = LossOutput(losses=pc * 0, metrics={"nll_loss": -pc.detach()})
    out = combine_losses({"a": dpo_loss(pc, pr, rc, rr), "b": orpo_like})
    assert torch.equal(out.metrics["b/nll_loss"], -pc.detach())
    assert torch.allclose(out.losses, dpo_loss(pc, pr, rc, rr).losses)  # default weights 1


def test_combine_matches_trl_formula():
    # TRL 1.16: loss = sum_k weight_k * per_sequence_loss_k.mean(); "sft" is the token mean of
    # the chosen completions (equal lengths here, so it equals our per-answer mean)
    pc, pr, rc, rr = (x.detach() for x in random_logps(4, seed=4, batch=16))
    lengths = torch.full((16,), 7.0, dtype=torch.float64)
    trl = (
        0.8 * -F.logsigmoid(0.1 * ((pc - rc) - (pr - rr))).mean()
        + 0.2 * (-F.logsigmoid(0.1 * (pc - rc)) - F.logsigmoid(-0.1 * (pr - rr))).mean()
        + 1.0 * (-pc.sum() / lengths.sum())
    )
    assert torch.allclose(mpo(pc, pr, rc, rr, lengths).loss, trl, rtol=0, atol=1e-12)


# ---- bad hyperparameters ---------------------------------------------------------------------

X, Y = torch.tensor([-10.0, -11.0]), torch.tensor([-12.0, -13.0])
M = torch.tensor([[1, 1, 0], [1, 0, 0]])
TOK = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, 0.0, 0.0]])

BAD_CALLS = {
    "ld_alpha_high": (lambda: ld_sequence_logps(TOK, M, TOK, M, alpha=1.5), r"alpha must be in"),
    "ld_alpha_negative": (lambda: ld_token_weights(M, M, alpha=-0.1), r"alpha must be in"),
    "ld_shape": (lambda: ld_sequence_logps(TOK, M[:, :2], TOK, M, alpha=0.5), r"chosen"),
    "ld_batch": (lambda: ld_token_weights(M, M[:1], alpha=0.5), r"same B"),
    "fdpo_beta": (lambda: fdpo_loss(X, Y, X, Y, beta=0.0), r"beta must be > 0"),
    "fdpo_divergence": (
        lambda: fdpo_loss(X, Y, X, Y, divergence="hellinger"),
        r"divergence must be one of",
    ),
    "fdpo_alpha_coef": (
        lambda: fdpo_loss(X, Y, X, Y, divergence="alpha_divergence", alpha_coef=1.5),
        r"alpha_coef must be in \[0, 1\]",
    ),
    "wpo_max_weight": (
        lambda: wpo_weights_from_sums(X, Y, X, Y, X, Y, max_weight=0.0),
        r"max_weight must be > 0",
    ),
    "wpo_shapes": (lambda: wpo_weights(TOK, TOK[:, :2], M, TOK, TOK, M), r"chosen"),
    "apply_weights_shape": (
        lambda: apply_pair_weights(dpo_loss(X, Y, X, Y), X[:1]),
        r"same shape",
    ),
    "combine_empty": (lambda: combine_losses({}), r"at least one"),
    "combine_names": (
        lambda: combine_losses({"a": dpo_loss(X, Y, X, Y)}, {"b": 1.0}),
        r"loss_weights must name exactly",
    ),
    "combine_negative": (
        lambda: combine_losses({"a": dpo_loss(X, Y, X, Y)}, {"a": -1.0}),
        r"loss_weights\['a'\] must be >= 0",
    ),
    "combine_inf": (
        lambda: combine_losses({"a": dpo_loss(X, Y, X, Y)}, {"a": math.inf}),
        r"loss_weights\['a'\] must be finite",
    ),
    "combine_shapes": (
        lambda: combine_losses({"a": dpo_loss(X, Y, X, Y), "b": LossOutput(losses=X[:1])}),
        r"same shape",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_hyperparameters_raise(case):
    call, message = BAD_CALLS[case]
    with pytest.raises(ValueError, match=message):
        call()
