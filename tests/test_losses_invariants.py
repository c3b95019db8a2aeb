"""Invariants: ln 2 at policy == reference, reductions to DPO, and sequence_kl's numerics."""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.losses import (
    dpo_loss,
    dpop_loss,
    odpo_loss,
    rdpo_loss,
    sequence_kl,
    spin_loss,
    tdpo_loss,
)

LN2 = math.log(2.0)


def batch(seed: int, n: int = 4, size: int = 6) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(size, generator=generator, dtype=torch.float64) * 5 - 20 for _ in range(n)]


# ---- policy == reference gives ln 2 ----------------------------------------------------------


def ln2_cases():
    chosen, rejected = batch(0, n=2)
    zeros = torch.zeros_like(chosen)
    # (policy_chosen, policy_rejected, reference_chosen, reference_rejected) with policy == ref
    same = (chosen, rejected, chosen.clone(), rejected.clone())
    cases = {
        "dpo": dpo_loss(*same),
        "dpop": dpop_loss(*same, lam=50.0),
        "odpo_zero_offset": odpo_loss(*same, zeros),
        "tdpo1_zero_kl": tdpo_loss(*same, zeros, zeros, variant="tdpo1"),
        "tdpo2_zero_kl": tdpo_loss(*same, zeros, zeros, variant="tdpo2"),
        "spin": spin_loss(*same, lam=0.1),
    }
    for eps in (0.0, 0.1, 0.25, 0.49):
        cases[f"rdpo_eps{eps}"] = rdpo_loss(*same, eps=eps)
    return cases


@pytest.mark.parametrize("name", sorted(ln2_cases()))
def test_policy_equals_reference_gives_ln2(name):
    # nls(0) = ln 2; for rDPO: ((1-eps) ln2 - eps ln2) / (1 - 2 eps) = ln 2 for every eps.
    out = ln2_cases()[name]
    assert torch.allclose(out.losses, torch.full_like(out.losses, LN2), atol=1e-12)


# ---- reductions to DPO -----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_special_cases_equal_dpo_exactly(seed):
    logps = batch(seed)
    dpo = dpo_loss(*logps, beta=0.3).losses
    assert torch.equal(dpop_loss(*logps, beta=0.3, lam=0.0).losses, dpo)
    assert torch.equal(rdpo_loss(*logps, beta=0.3, eps=0.0).losses, dpo)
    assert torch.equal(odpo_loss(*logps, torch.zeros_like(dpo), beta=0.3).losses, dpo)
    assert torch.equal(spin_loss(*logps, lam=0.3).losses, dpo)


def test_tdpo_with_equal_kls_equals_dpo():
    # D_w = D_l: the KL margin vanishes in both variants.
    logps = batch(5)
    kl = torch.full_like(logps[0], 0.7)
    dpo = dpo_loss(*logps).losses
    for variant in ("tdpo1", "tdpo2"):
        assert torch.allclose(tdpo_loss(*logps, kl, kl, variant=variant).losses, dpo)


def test_dpop_never_below_dpo():
    # The penalty only ever lowers the logit, so DPOP >= DPO example by example.
    logps = batch(7)
    assert torch.all(dpop_loss(*logps).losses >= dpo_loss(*logps).losses)


def test_losses_are_per_example():
    # Each example's loss depends on its own row only: the batched result equals row-by-row calls.
    logps = batch(9)
    batched = dpo_loss(*logps).losses
    rows = torch.cat([dpo_loss(*(x[i : i + 1] for x in logps)).losses for i in range(6)])
    assert batched.shape == (6,)
    assert torch.allclose(batched, rows)


# ---- sequence_kl -----------------------------------------------------------------------------


def direct_kl(reference_logits, policy_logits, mask):
    """Full-vocabulary KL(ref || policy) in float64, written out the long way."""
    ref = reference_logits.double()
    pol = policy_logits.double()
    p_ref = torch.exp(ref) / torch.exp(ref).sum(-1, keepdim=True)
    p_pol = torch.exp(pol) / torch.exp(pol).sum(-1, keepdim=True)
    per_position = (p_ref * (torch.log(p_ref) - torch.log(p_pol))).sum(-1)  # (B, T)
    return (per_position * mask.double()).sum(-1)


def random_logits(seed, shape=(3, 7, 11), dtype=torch.float64):
    generator = torch.Generator().manual_seed(seed)
    ref = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    pol = torch.randn(shape, generator=generator, dtype=torch.float64) * 2
    mask = torch.rand(shape[:2], generator=generator) > 0.3
    return ref.to(dtype), pol.to(dtype), mask


@pytest.mark.parametrize("chunk_size", [None, 1, 3, 7, 100])
def test_sequence_kl_matches_direct_computation(chunk_size):
    ref, pol, mask = random_logits(0)
    kl = sequence_kl(ref, pol, mask, chunk_size=chunk_size)
    assert kl.shape == (3,) and kl.dtype == torch.float64
    assert torch.allclose(kl, direct_kl(ref, pol, mask), atol=1e-12)


def test_sequence_kl_zero_for_equal_logits():
    ref, _, mask = random_logits(1)
    assert torch.allclose(sequence_kl(ref, ref.clone(), mask), torch.zeros(3, dtype=ref.dtype))


def test_sequence_kl_nonnegative():
    ref, pol, mask = random_logits(2)
    assert torch.all(sequence_kl(ref, pol, mask) >= 0)


def test_sequence_kl_respects_mask():
    ref, pol, mask = random_logits(3)
    kl = sequence_kl(ref, pol, mask)
    # Changing logits at masked-out positions changes nothing.
    noisy_pol = torch.where(mask[..., None], pol, pol + 10 * torch.randn_like(pol))
    assert torch.allclose(sequence_kl(ref, noisy_pol, mask), kl)
    # An all-false mask gives 0; a float 0/1 mask gives the same as a bool one.
    assert torch.all(sequence_kl(ref, pol, torch.zeros_like(mask)) == 0)
    assert torch.allclose(sequence_kl(ref, pol, mask.double()), kl)


@pytest.mark.parametrize("low", [float("-inf"), -1e9, -1e4])
def test_sequence_kl_finite_when_reference_probabilities_underflow(low):
    ref, pol, mask = random_logits(4, dtype=torch.float32)
    ref[:, :, :3] = low  # p_ref == 0 exactly for three tokens at every position
    pol.requires_grad_(True)
    kl = sequence_kl(ref, pol, mask, chunk_size=2)
    assert torch.all(torch.isfinite(kl))
    # The KL ignores the zero-probability tokens (0 * log 0 = 0): compare on the support only.
    expected = direct_kl(ref[:, :, 3:], pol.detach()[:, :, 3:], mask)
    # ...plus the policy's normaliser over all tokens (its mass outside the support):
    log_mass_on_support = torch.logsumexp(pol.detach()[:, :, 3:].double(), -1) - torch.logsumexp(
        pol.detach().double(), -1
    )
    expected = expected - (log_mass_on_support * mask).sum(-1)
    assert torch.allclose(kl.double(), expected, atol=1e-4)
    kl.sum().backward()
    assert torch.all(torch.isfinite(pol.grad))


def test_sequence_kl_padding_rows_of_minus_inf_do_not_poison_the_result():
    ref, pol, mask = random_logits(5)
    mask[:, -1] = False
    ref[:, -1, :] = float("-inf")  # a fully -inf (padding) position: its softmax is NaN
    kl = sequence_kl(ref, pol, mask)
    assert torch.all(torch.isfinite(kl))
    assert torch.allclose(kl, direct_kl(ref[:, :-1], pol[:, :-1], mask[:, :-1]))


def test_sequence_kl_upcasts_bf16():
    ref, pol, mask = random_logits(6, dtype=torch.bfloat16)
    kl = sequence_kl(ref, pol, mask, chunk_size=4)
    assert kl.dtype == torch.float32
    # Same as the float64 computation on the very same (bf16-rounded) values.
    assert torch.allclose(kl.double(), direct_kl(ref, pol, mask), atol=1e-4)


def test_sequence_kl_bf16_gradient_flows_in_fp32():
    ref, pol, mask = random_logits(7, dtype=torch.bfloat16)
    pol.requires_grad_(True)
    sequence_kl(ref, pol, mask, chunk_size=3).sum().backward()
    assert pol.grad is not None and pol.grad.dtype == torch.bfloat16
    assert torch.all(torch.isfinite(pol.grad))
    # grad of KL(ref || pol) wrt policy logits is softmax(pol) - softmax(ref) at masked positions
    expected = (torch.softmax(pol.double(), -1) - torch.softmax(ref.double(), -1)) * mask[..., None]
    assert torch.allclose(pol.grad.double(), expected, atol=1e-2)


@pytest.mark.parametrize("chunk_size", [None, 4])
def test_sequence_kl_empty_sequence_is_zero(chunk_size):
    logits = torch.zeros(2, 0, 5)
    kl = sequence_kl(logits, logits, torch.zeros(2, 0, dtype=torch.bool), chunk_size=chunk_size)
    assert kl.shape == (2,) and torch.all(kl == 0)


def test_sequence_kl_no_grad_path_matches_grad_path():
    ref, pol, mask = random_logits(8)
    with torch.no_grad():
        plain = sequence_kl(ref, pol, mask, chunk_size=2)
    checkpointed = sequence_kl(ref, pol.clone().requires_grad_(True), mask, chunk_size=2)
    assert torch.allclose(plain, checkpointed.detach())
