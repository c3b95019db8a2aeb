"""The options on the pairwise methods through the method table and the log-prob engine:
nll_weight, ld_alpha, f_divergence_type, use_weighting (dpokit.losses.options).

Worked examples by hand (example E: logp(y_w)=-10, logp(y_l)=-12, ref = -11 each, so DPO with
beta 0.1 gives nls(0.2) = 0.598139), float64 gradient checks, the first-loss invariants, and the
per-token quantities (LD weights, log sum_v p_v^2) against a direct full-logits computation.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch.autograd import gradcheck

from dpokit.logprobs import CompletionScorer, chunked_token_logps
from dpokit.losses import LossInputs, dpo_loss, get_method
from dpokit.losses.fdpo import F_DIVERGENCES, fdpo_loss
from dpokit.losses.ld_dpo import ld_flat_weights, ld_token_weights
from dpokit.losses.options import SequenceReduction
from dpokit.losses.wpo import log_sum_sq_probs

LN2 = math.log(2.0)
TOL = 1e-6


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def e_inputs(**extra) -> LossInputs:
    return LossInputs(
        policy_chosen_logps=t(-10.0),
        policy_rejected_logps=t(-12.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-11.0),
        chosen_lengths=torch.tensor([5]),
        rejected_lengths=torch.tensor([4]),
        **extra,
    )


def loss(method: str, inputs: LossInputs, **hp) -> torch.Tensor:
    return get_method(method).compute(inputs, hp).losses


# ---- NLL term -------------------------------------------------------------------------------


def test_nll_weight_worked_example_and_logged_nll():
    # NLL = 10 / 5 = 2: weight 1 -> 0.598139 + 2, weight 0.25 -> 0.598139 + 0.5.
    assert abs(loss("dpo", e_inputs(), nll_weight=1.0).item() - 2.598139) < TOL
    assert abs(loss("dpo", e_inputs(), nll_weight=0.25).item() - 1.098139) < TOL
    out = get_method("rdpo").compute(e_inputs(), {"nll_weight": 0.5, "eps": 0.0})
    assert abs(out.losses.item() - (0.598139 + 1.0)) < TOL
    assert abs(out.metrics["nll_loss"].item() - 2.0) < TOL  # unweighted
    assert "nll_loss" not in get_method("dpo").compute(e_inputs(), {}).metrics  # off by default


@pytest.mark.parametrize("method", ["dpo", "dpop", "ipo", "odpo", "rdpo", "tdpo2"])
def test_nll_first_loss_invariant(method):
    # policy == reference, logp(y_w) = -12 over 6 tokens: the method's own loss + 12/6.
    zero = dict(
        policy_chosen_logps=t(-12.0),
        policy_rejected_logps=t(-7.0),
        reference_chosen_logps=t(-12.0),
        reference_rejected_logps=t(-7.0),
        chosen_lengths=torch.tensor([6]),
        rejected_lengths=torch.tensor([3]),
        score_chosen=t(0.9),
        score_rejected=t(0.1),
        chosen_seq_kl=t(0.0),
        rejected_seq_kl=t(0.0),
    )
    base = loss(method, LossInputs(**zero)).item()
    assert abs(loss(method, LossInputs(**zero), nll_weight=1.0).item() - (base + 2.0)) < TOL
    if method == "dpo":
        assert abs(base + 2.0 - (LN2 + 2.0)) < TOL  # 2.693147


def test_nll_weight_gradcheck():
    generator = torch.Generator().manual_seed(0)
    values = [torch.randn(4, generator=generator, dtype=torch.float64) * 3 for _ in range(4)]
    lengths = torch.tensor([3, 5, 1, 8])

    def f(pc, pr, rc, rr):
        inputs = LossInputs(pc, pr, lengths, lengths + 1, rc, rr)
        return get_method("dpo").compute(inputs, {"nll_weight": 0.7, "beta": 0.3}).losses

    assert gradcheck(f, [v.requires_grad_() for v in values])


# ---- f-DPO ----------------------------------------------------------------------------------


def test_f_divergence_worked_examples_through_the_table():
    expected = {"forward_kl": 0.582517, "js_divergence": 0.644397, "reverse_kl": 0.598139}
    for divergence, value in expected.items():
        got = loss("dpo", e_inputs(), f_divergence_type=divergence).item()
        assert abs(got - value) < TOL, divergence
    got = loss("dpo", e_inputs(), f_divergence_type="alpha_divergence")
    assert abs(got.item() - 0.594349) < TOL
    got = loss("dpo", e_inputs(), f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.3)
    assert abs(got.item() - 0.590639) < TOL


@pytest.mark.parametrize("divergence", F_DIVERGENCES)
def test_f_divergence_on_dpo_equals_fdpo_loss_and_starts_at_ln2(divergence):
    generator = torch.Generator().manual_seed(3)
    pc, pr, rc, rr = (torch.randn(6, generator=generator, dtype=torch.float64) * 2 for _ in "abcd")
    lengths = torch.full((6,), 4)
    inputs = LossInputs(pc, pr, lengths, lengths, rc, rr)
    hp = {"beta": 0.2, "f_divergence_type": divergence, "f_alpha_divergence_coef": 0.3}
    got = get_method("dpo").compute(inputs, hp).losses
    want = fdpo_loss(pc, pr, rc, rr, beta=0.2, divergence=divergence, alpha_coef=0.3).losses
    assert torch.allclose(got, want, atol=1e-12)
    equal = LossInputs(pc, pr, lengths, lengths, pc.clone(), pr.clone())
    ln2 = torch.full((6,), LN2, dtype=torch.float64)
    assert torch.allclose(get_method("dpo").compute(equal, hp).losses, ln2)

    def f(pc, pr):
        return get_method("rdpo").compute(LossInputs(pc, pr, lengths, lengths, rc, rr), hp).losses

    assert gradcheck(f, [pc.clone().requires_grad_(), pr.clone().requires_grad_()])


def test_f_divergence_is_offered_only_where_it_is_f_dpo():
    assert "f_divergence_type" in get_method("dpo").hyperparameters
    # not functions of rho_w - rho_l alone (IPO's and sigmoid_norm's rho / |y| are: they take it,
    # as in TRL 1.16; tests/test_trl_loss_fields.py checks them against TRL's formula)
    for method in ("dpop", "odpo", "tdpo2", "nca_pair", "bco_pair", "sppo_hard", "apo_zero"):
        with pytest.raises(ValueError, match="f_divergence_type"):
            get_method(method).compute(e_inputs(), {"f_divergence_type": "forward_kl"})


# ---- LD-DPO ---------------------------------------------------------------------------------


def test_ld_alpha_worked_example_through_the_table():
    # y_w tokens (-1, -2, -3), y_l five tokens of -1; reference (-1.5 x3), (-2 x5); alpha 0.5:
    # policy LD sums -6, -4; reference LD sums -4.5, -8 -> nls(0.1 * -5.5) = 1.005492.
    inputs = LossInputs(
        policy_chosen_logps=t(-6.0),
        policy_rejected_logps=t(-5.0),  # plain sums: used by the NLL term only
        ld_policy_chosen_logps=t(-6.0),
        ld_policy_rejected_logps=t(-4.0),
        reference_chosen_logps=t(-4.5),
        reference_rejected_logps=t(-8.0),
        chosen_lengths=torch.tensor([3]),
        rejected_lengths=torch.tensor([5]),
    )
    assert abs(loss("dpo", inputs, ld_alpha=0.5).item() - 1.005492) < TOL
    # NLL from the PLAIN chosen sum: 6 / 3 = 2.
    assert abs(loss("dpo", inputs, ld_alpha=0.5, nll_weight=1.0).item() - 3.005492) < TOL
    with pytest.raises(ValueError, match="ld_policy_chosen_logps"):
        loss("dpo", e_inputs(), ld_alpha=0.5)


def test_ld_flat_weights_equal_the_padded_weights():
    # Pairs of random lengths, tokens laid out as the scorer does, chosen and rejected
    # sequences interleaved in the flat order (as packed rows may give).
    generator = torch.Generator().manual_seed(1)
    pairs = 4
    lengths = torch.randint(1, 7, (2 * pairs,), generator=generator)
    row_index = torch.cat([torch.full((int(n),), i) for i, n in enumerate(lengths)])
    perm = torch.randperm(2 * pairs, generator=generator)
    row_index = torch.cat([row_index[row_index == i] for i in perm])
    width = int(lengths.max())
    mask = torch.arange(width)[None, :] < lengths[:, None]  # (2B, W)
    chosen_w, rejected_w = ld_token_weights(
        mask[:pairs], mask[pairs:], alpha=0.3, dtype=torch.float64
    )
    padded = torch.cat([chosen_w, rejected_w])  # (2B, W)
    flat = ld_flat_weights(row_index, pairs, 0.3, torch.float64)
    position = torch.zeros_like(row_index)
    for i in range(2 * pairs):
        position[row_index == i] = torch.arange(int(lengths[i]))
    assert torch.equal(flat, padded[row_index, position])


# ---- WPO ------------------------------------------------------------------------------------


def test_use_weighting_worked_example_through_the_table():
    # y_w: token 0 under (0.8, 0.2) then token 1 under (0.5, 0.5); y_l: token 1 under (0.8, 0.2).
    # Pair weight 1.084652 * 0.294118 = 0.319015; DPO on E weighted: 0.190815.
    inputs = LossInputs(
        policy_chosen_logps=t(math.log(0.8) + math.log(0.5)),
        policy_rejected_logps=t(math.log(0.2)),
        chosen_lengths=torch.tensor([2]),
        rejected_lengths=torch.tensor([1]),
        chosen_log_sum_sq=t(math.log(0.68) + math.log(0.5)),
        rejected_log_sum_sq=t(math.log(0.68)),
    )
    inputs.reference_chosen_logps = inputs.policy_chosen_logps - 1.0  # rho_w = +1 as in E
    inputs.reference_rejected_logps = inputs.policy_rejected_logps + 1.0  # rho_l = -1
    out = get_method("dpo").compute(inputs, {"use_weighting": True})
    assert abs(out.metrics["wpo_weight"].item() - 0.319015) < TOL
    assert abs(out.losses.item() - 0.190815) < TOL
    # At policy == reference: weight * ln 2.
    inputs.reference_chosen_logps = inputs.policy_chosen_logps
    inputs.reference_rejected_logps = inputs.policy_rejected_logps
    out = get_method("dpo").compute(inputs, {"use_weighting": True})
    assert abs(out.losses.item() - 0.319015 * LN2) < TOL


def test_kernel_log_sum_sq_equals_full_logits_and_leaves_gradients_alone():
    generator = torch.Generator().manual_seed(2)
    hidden = torch.randn(37, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(50, 16, generator=generator, dtype=torch.float64, requires_grad=True)
    targets = torch.randint(0, 50, (37,), generator=generator)
    for save_rows in (0, 16):
        logps, lss = chunked_token_logps(
            hidden, weight, targets, chunk_size=8, save_rows=save_rows, return_log_sum_sq=True
        )
        logits = hidden @ weight.T
        assert torch.allclose(lss, log_sum_sq_probs(logits), atol=1e-12)
        assert not lss.requires_grad
        plain = chunked_token_logps(hidden, weight, targets, chunk_size=8)
        assert torch.equal(logps, plain)
        (grad,) = torch.autograd.grad(logps.sum(), hidden)
        (grad_plain,) = torch.autograd.grad(plain.sum(), hidden)
        assert torch.allclose(grad, grad_plain, atol=1e-12)


@pytest.mark.parametrize("fast", [True, False])
def test_scorer_log_sum_sq_and_ld_sums_equal_full_logits(tiny_model, fast):
    torch.manual_seed(0)
    vocab = tiny_model.config.vocab_size
    input_ids = torch.randint(4, vocab, (4, 12))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 9:] = 0
    attention_mask[3, 7:] = 0
    completion = torch.zeros_like(input_ids, dtype=torch.bool)
    completion[:, 5:] = True
    completion &= attention_mask.bool()
    scorer = CompletionScorer(tiny_model, chunk_size=5, fast=fast).eval()
    with torch.no_grad():
        out = scorer(input_ids, attention_mask, completion, return_log_sum_sq=True)
        logits = tiny_model(input_ids=input_ids, attention_mask=attention_mask).logits.float()
    logits = logits[:, :-1]  # position p predicts token p + 1
    token_logp = logits.log_softmax(-1).gather(2, input_ids[:, 1:, None]).squeeze(2)  # (4, 11)
    mask = completion[:, 1:]
    got = torch.zeros(4).index_add(0, out.row_index, out.token_log_sum_sq)
    want = torch.stack([log_sum_sq_probs(logits[r][mask[r]]).sum() for r in range(4)])
    assert torch.allclose(got, want, atol=1e-5)
    # LD sums of the two pairs (rows 0, 1 chosen; 2, 3 rejected), alpha 0.4, by hand.
    ld = SequenceReduction(0.4)(out, pairs=2)
    w_chosen, w_rejected = ld_token_weights(mask[:2], mask[2:], alpha=0.4)
    weights = torch.cat([w_chosen, w_rejected])
    want = (token_logp.masked_fill(~mask, 0.0) * weights).sum(dim=1)
    assert torch.allclose(ld, want, atol=1e-5)
    assert torch.allclose(SequenceReduction(1.0)(out, 2), out.logps)


def test_dpo_loss_is_what_the_wrapper_calls():
    # Off by default: the wrapped compute is the method itself.
    pc, pr, rc, rr = t(-3.0, -4.0), t(-5.0, -1.0), t(-2.0, -4.5), t(-6.0, -1.5)
    inputs = LossInputs(pc, pr, torch.tensor([2, 3]), torch.tensor([4, 1]), rc, rr)
    got = get_method("dpo").compute(inputs, {"beta": 0.3}).losses
    assert torch.equal(got, dpo_loss(pc, pr, rc, rr, beta=0.3).losses)
