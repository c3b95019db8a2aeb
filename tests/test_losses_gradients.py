"""Gradients: gradcheck in float64 for every loss, stop-gradients, and the sign of each loss's
gradient (preferring the chosen answer more must lower the loss)."""

from __future__ import annotations

import pytest
import torch
from torch.autograd import gradcheck

from dpokit.losses import (
    dpo_loss,
    dpop_loss,
    ipo_loss,
    kto_kl_baseline,
    kto_loss,
    odpo_loss,
    rdpo_loss,
    sequence_kl,
    simpo_loss,
    slic_loss,
    spin_loss,
    tdpo_loss,
)

B = 4


def leaf(values: torch.Tensor) -> torch.Tensor:
    return values.detach().to(torch.float64).requires_grad_(True)


def random_inputs(n: int, seed: int = 0, scale: float = 3.0) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return [
        leaf(torch.randn(B, generator=generator, dtype=torch.float64) * scale) for _ in range(n)
    ]


def losses_of(fn, **kwargs):
    return lambda *tensors: fn(*tensors, **kwargs).losses


# name -> (function of the differentiable tensors, number of tensor inputs)
GRADCHECK_CASES = {
    "dpo": (losses_of(dpo_loss, beta=0.1), 4),
    "dpop": (losses_of(dpop_loss, beta=0.1, lam=50.0), 4),
    "rdpo": (losses_of(rdpo_loss, beta=0.1, eps=0.2), 4),
    "ipo": (losses_of(ipo_loss, tau=0.1), 4),
    "odpo": (losses_of(odpo_loss, beta=0.1), 5),
    "tdpo1": (losses_of(tdpo_loss, beta=0.1, variant="tdpo1"), 6),
    "tdpo2": (losses_of(tdpo_loss, beta=0.1, alpha=0.5, variant="tdpo2"), 6),
    "simpo": (losses_of(simpo_loss, beta=2.0, gamma=1.0), 2),
    "slic": (losses_of(slic_loss, delta=1.0, lam=0.1), 3),
    "spin": (losses_of(spin_loss, lam=0.1), 4),
}


@pytest.mark.parametrize("name", sorted(GRADCHECK_CASES))
def test_gradcheck(name):
    fn, n = GRADCHECK_CASES[name]
    inputs = random_inputs(n, seed=sorted(GRADCHECK_CASES).index(name))
    if name == "odpo":
        inputs[4] = inputs[4].detach()  # offsets are data (detached inside)
    if name == "tdpo2":
        # sg(D_w): the analytic gradient is 0 by design, the numerical one is not.
        inputs[4] = inputs[4].detach()
    assert gradcheck(fn, tuple(inputs), eps=1e-6, atol=1e-6)


def test_gradcheck_slic_with_active_hinge():
    # Random inputs may leave the hinge at 0 everywhere; here delta - 2 + 1.5 > 0 for all rows.
    chosen = leaf(torch.full((B,), -2.0) + 0.1 * torch.arange(B))
    rejected = leaf(torch.full((B,), -1.5))
    target = leaf(torch.full((B,), -3.0))
    fn = losses_of(slic_loss, delta=1.0, lam=0.1)
    assert gradcheck(fn, (chosen, rejected, target), eps=1e-6, atol=1e-6)


def test_gradcheck_kto():
    policy, reference = random_inputs(2, seed=7)
    desirable = torch.tensor([True, False, True, False])

    def fn(policy, reference):
        return kto_loss(policy, reference, desirable, 0.3, beta=0.5).losses

    assert gradcheck(fn, (policy, reference), eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("chunk_size", [None, 2])
def test_gradcheck_sequence_kl(chunk_size):
    generator = torch.Generator().manual_seed(3)
    reference = leaf(torch.randn(2, 3, 5, generator=generator, dtype=torch.float64))
    policy = leaf(torch.randn(2, 3, 5, generator=generator, dtype=torch.float64))
    mask = torch.tensor([[True, True, False], [False, True, True]])

    def fn(reference, policy):
        return sequence_kl(reference, policy, mask, chunk_size=chunk_size)

    assert gradcheck(fn, (reference, policy), eps=1e-6, atol=1e-6)


# ---- stop-gradients --------------------------------------------------------------------------


def test_tdpo2_no_gradient_through_chosen_kl_tdpo1_has_one():
    logps = random_inputs(4, seed=1)
    for variant, expect_zero in (("tdpo2", True), ("tdpo1", False)):
        chosen_kl, rejected_kl = leaf(torch.full((B,), 0.3)), leaf(torch.full((B,), 0.5))
        tdpo_loss(*logps, chosen_kl, rejected_kl, variant=variant).losses.sum().backward()
        if expect_zero:
            assert chosen_kl.grad is None or torch.all(chosen_kl.grad == 0)
        else:
            assert torch.all(chosen_kl.grad != 0)
        assert torch.all(rejected_kl.grad != 0)  # both variants push D_l down


def test_kto_baseline_carries_no_gradient():
    policy_mismatched, reference_mismatched = random_inputs(2, seed=2)
    z0 = kto_kl_baseline(policy_mismatched, reference_mismatched)
    assert not z0.requires_grad and z0.dim() == 0
    # And a baseline that does require grad is detached inside kto_loss.
    z0_leaf = leaf(torch.tensor(0.4))
    policy = leaf(torch.tensor([-10.0, -12.0]))
    reference = torch.full((2,), -11.0, dtype=torch.float64)
    out = kto_loss(policy, reference, torch.tensor([True, False]), z0_leaf)
    out.losses.sum().backward()
    assert z0_leaf.grad is None
    assert policy.grad is not None


def test_odpo_offsets_carry_no_gradient():
    logps = random_inputs(4, seed=4)
    offsets = leaf(torch.full((B,), -0.5))
    odpo_loss(*logps, offsets).losses.sum().backward()
    assert offsets.grad is None


# ---- DPOP's (1 + lam) factor -----------------------------------------------------------------


def test_dpop_gradient_has_one_plus_lam_factor():
    # logp_w=-12 < ref_w=-11: penalty active. d loss/d logp_w = -beta*(1+lam)*sigmoid(-z) while
    # d loss/d logp_l = +beta*sigmoid(-z), so their ratio is -(1+lam); DPO's ratio is -1.
    lam = 5.0

    def grads(fn, **kwargs):
        chosen, rejected = leaf(torch.tensor([-12.0])), leaf(torch.tensor([-15.0]))
        ref = torch.tensor([-11.0], dtype=torch.float64)
        fn(chosen, rejected, ref, ref, **kwargs).losses.sum().backward()
        return chosen.grad.item(), rejected.grad.item()

    dpop_chosen, dpop_rejected = grads(dpop_loss, beta=0.1, lam=lam)
    dpo_chosen, dpo_rejected = grads(dpo_loss, beta=0.1)
    assert dpop_chosen / dpop_rejected == pytest.approx(-(1 + lam), rel=1e-12)
    assert dpo_chosen / dpo_rejected == pytest.approx(-1.0, rel=1e-12)
    # Directly: z_dpop = 0.1*(3 - 5) = -0.2, z_dpo = 0.3.
    sig = torch.sigmoid
    assert dpop_chosen == pytest.approx(-0.1 * (1 + lam) * sig(torch.tensor(0.2)).item(), rel=1e-6)
    assert dpo_chosen == pytest.approx(-0.1 * sig(torch.tensor(-0.3)).item(), rel=1e-6)


def test_dpop_gradient_equals_dpo_when_penalty_inactive():
    def grad(fn, **kwargs):
        chosen = leaf(torch.tensor([-10.0]))
        ref = torch.tensor([-11.0], dtype=torch.float64)
        fn(chosen, torch.tensor([-12.0], dtype=torch.float64), ref, ref, **kwargs).losses.backward()
        return chosen.grad.item()

    assert grad(dpop_loss, lam=50.0) == pytest.approx(grad(dpo_loss), rel=1e-12)


# ---- monotonicity: raising the chosen log-prob lowers every loss -------------------------------

E = (-10.0, -12.0, -11.0, -11.0)


def monotone_cases():
    # name -> function of the chosen (policy) log-prob returning the (1,) losses; other inputs E's.
    ref_c, ref_r = torch.tensor([E[2]]), torch.tensor([E[3]])
    rej = torch.tensor([E[1]])
    d_w, d_l = torch.tensor([0.3]), torch.tensor([0.5])
    return {
        "dpo": lambda c: dpo_loss(c, rej, ref_c, ref_r).losses,
        "dpop": lambda c: dpop_loss(c, rej, ref_c, ref_r).losses,
        "rdpo_0.1": lambda c: rdpo_loss(c, rej, ref_c, ref_r, eps=0.1).losses,
        "rdpo_0.4": lambda c: rdpo_loss(c, rej, ref_c, ref_r, eps=0.4).losses,
        "ipo": lambda c: ipo_loss(c, rej, ref_c, ref_r).losses,  # h=2 < 1/(2 tau) = 5
        "odpo": lambda c: odpo_loss(c, rej, ref_c, ref_r, torch.tensor([-0.69])).losses,
        "tdpo1": lambda c: tdpo_loss(c, rej, ref_c, ref_r, d_w, d_l, variant="tdpo1").losses,
        "tdpo2": lambda c: tdpo_loss(c, rej, ref_c, ref_r, d_w, d_l).losses,
        "simpo": lambda c: simpo_loss(c / 20, rej / 15).losses,
        # hinge active: 1 - (-10) + (-9.5) = 1.5 > 0; the target is another answer
        "slic_hinge": lambda c: slic_loss(c, torch.tensor([-9.5]), torch.tensor([-30.0])).losses,
        "slic_target": lambda c: slic_loss(c, rej, c).losses,
        "kto": lambda c: kto_loss(c, ref_c, torch.tensor([True]), 0.4).losses,
        "spin": lambda c: spin_loss(c, rej, ref_c, ref_r).losses,
    }


@pytest.mark.parametrize("name", sorted(monotone_cases()))
def test_raising_chosen_logp_lowers_loss(name):
    fn = monotone_cases()[name]
    chosen = leaf(torch.tensor([E[0]]))
    loss = fn(chosen)
    loss.sum().backward()
    assert chosen.grad.item() < 0
    with torch.no_grad():
        assert fn(chosen + 0.5).item() < loss.item()


def test_kto_undesirable_prefers_lower_logp():
    policy = leaf(torch.tensor([-12.0]))
    kto_loss(policy, torch.tensor([-11.0]), torch.tensor([False]), 0.4).losses.backward()
    assert policy.grad.item() > 0


def test_ipo_is_not_monotone_past_its_target():
    # h = 8 > 1/(2*0.1) = 5: raising the chosen log-prob moves h further from the target.
    chosen = leaf(torch.tensor([-4.0]))
    ref = torch.tensor([-11.0], dtype=torch.float64)
    ipo_loss(chosen, torch.tensor([-12.0], dtype=torch.float64), ref, ref).losses.backward()
    assert chosen.grad.item() > 0
