"""Every worked example of docs/methods.md, reproduced to 1e-6.

Notation as in methods.md: nls(z) = -log sigmoid(z) = log(1 + exp(-z)); rho = logp - ref;
h = rho_w - rho_l. Example E: logp(y_w)=-10, logp(y_l)=-12, ref(y_w)=ref(y_l)=-11, so rho_w=+1,
rho_l=-1, h=2. The expected numbers are the ones printed in methods.md; the comments redo them.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from dpokit.losses import (
    dpo_loss,
    dpop_loss,
    ipo_loss,
    kto_kl_baseline,
    kto_loss,
    odpo_loss,
    odpo_offsets,
    rdpo_loss,
    sequence_kl,
    simpo_loss,
    slic_loss,
    spin_loss,
    tdpo_loss,
)

TOL = 1e-6
LN2 = 0.693147  # ln 2


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def example_e() -> tuple[torch.Tensor, ...]:
    """(policy_chosen, policy_rejected, reference_chosen, reference_rejected) of example E."""
    return t(-10.0), t(-12.0), t(-11.0), t(-11.0)


def close(actual: torch.Tensor, expected: float) -> bool:
    return abs(actual.item() - expected) < TOL


# ---- DPO -------------------------------------------------------------------------------------


def test_dpo_example_e():
    # beta*h = 0.1*2 = 0.2
    # nls(0.2) = log(1 + e^-0.2) = log(1 + 0.818731) = log(1.818731) = 0.598139
    out = dpo_loss(*example_e(), beta=0.1)
    assert close(out.losses, 0.598139)
    # logged rewards beta*rho: 0.1*(+1) = 0.1 and 0.1*(-1) = -0.1
    assert close(out.chosen_rewards, 0.1)
    assert close(out.rejected_rewards, -0.1)
    assert not out.chosen_rewards.requires_grad


def test_dpo_policy_equals_reference_is_ln2():
    # h = 0 -> nls(0) = log 2 = 0.693147
    out = dpo_loss(t(-11.0), t(-11.0), t(-11.0), t(-11.0))
    assert close(out.losses, LN2)


# ---- DPOP ------------------------------------------------------------------------------------


def dpop_example() -> tuple[torch.Tensor, ...]:
    # logp(y_w)=-12, logp(y_l)=-15, refs -11: rho_w=-1, rho_l=-4, h=3; penalty max(0, -11+12)=1
    return t(-12.0), t(-15.0), t(-11.0), t(-11.0)


def test_dpop_examples():
    # DPO: nls(0.1*3) = log(1 + e^-0.3) = log(1 + 0.740818) = log(1.740818) = 0.554355
    assert close(dpo_loss(*dpop_example(), beta=0.1).losses, 0.554355)
    # lam=50: nls(0.1*(3 - 50*1)) = nls(-4.7) = log(1 + e^4.7) = log(1 + 109.947172) = 4.709054
    out = dpop_loss(*dpop_example(), beta=0.1, lam=50.0)
    assert close(out.losses, 4.709054)
    assert close(out.metrics["dpop_penalty"], 1.0)
    # lam=5: nls(0.1*(3 - 5)) = nls(-0.2) = log(1 + e^0.2) = log(2.221403) = 0.798139
    assert close(dpop_loss(*dpop_example(), beta=0.1, lam=5.0).losses, 0.798139)


def test_dpop_penalty_inactive_when_chosen_above_reference():
    # E: logp(y_w)=-10 > ref(y_w)=-11, penalty max(0, -1) = 0 -> plain DPO 0.598139 even at lam=50
    out = dpop_loss(*example_e(), beta=0.1, lam=50.0)
    assert close(out.losses, 0.598139)
    assert close(out.metrics["dpop_penalty"], 0.0)


# ---- SLiC-HF ---------------------------------------------------------------------------------


def test_slic_example_e_target_chosen():
    # hinge max(0, 1 - (-10) + (-12)) = max(0, -1) = 0; regularizer -0.1*(-10) = 1.0; total 1.0
    pc, pr, _, _ = example_e()
    out = slic_loss(pc, pr, pc, delta=1.0, lam=0.1)
    assert close(out.losses, 1.0)
    assert close(out.metrics["hinge"], 0.0)
    assert close(out.metrics["regularizer"], 1.0)


def test_slic_active_hinge_and_sampled_target():
    # logp_w=-10, logp_l=-10.5: hinge 1 + 10 - 10.5 = 0.5; y_ref sampled with logp -20:
    # regularizer -0.1*(-20) = 2.0; total 2.5
    out = slic_loss(t(-10.0), t(-10.5), t(-20.0), delta=1.0, lam=0.1)
    assert close(out.losses, 2.5)


# ---- TDPO ------------------------------------------------------------------------------------


def test_tdpo_examples():
    d_w, d_l = t(0.3), t(0.5)
    # TDPO1: nls(0.1*(2 - (0.5 - 0.3))) = nls(0.18) = log(1 + e^-0.18) = log(1.835270) = 0.607192
    out1 = tdpo_loss(*example_e(), d_w, d_l, beta=0.1, variant="tdpo1")
    assert close(out1.losses, 0.607192)
    # TDPO2: nls(0.1*(2 - 0.5*0.2)) = nls(0.19) = log(1 + e^-0.19) = log(1.826959) = 0.602653
    out2 = tdpo_loss(*example_e(), d_w, d_l, beta=0.1, alpha=0.5, variant="tdpo2")
    assert close(out2.losses, 0.602653)
    # Logged rewards are beta*rho (DPO's), the reference code's beta*(rho + D) are in metrics:
    # 0.1*(1 + 0.3) = 0.13 and 0.1*(-1 + 0.5) = -0.05
    assert close(out2.chosen_rewards, 0.1) and close(out2.rejected_rewards, -0.1)
    assert close(out2.metrics["chosen_rewards_plus_kl"], 0.13)
    assert close(out2.metrics["rejected_rewards_plus_kl"], -0.05)


def test_sequence_kl_direction():
    # ref = (.5, .5), pol = (.8, .2):
    # KL(ref||pol) = .5*ln(.5/.8) + .5*ln(.5/.2) = .5*(-0.470004) + .5*(0.916291) = 0.223144
    # KL(pol||ref) = .8*ln(.8/.5) + .2*ln(.2/.5) = .8*0.470004 + .2*(-0.916291) = 0.192745 (wrong)
    reference_logits = torch.log(t(0.5, 0.5)).view(1, 1, 2)
    policy_logits = torch.log(t(0.8, 0.2)).view(1, 1, 2)
    kl = sequence_kl(reference_logits, policy_logits, torch.ones(1, 1, dtype=torch.bool))
    assert close(kl, 0.223144)
    assert not close(kl, 0.192745)


# ---- KTO -------------------------------------------------------------------------------------


def test_kto_example():
    # Mismatched log-ratios 0.2 and 0.6: z0 = max(0, (0.2 + 0.6)/2) = 0.4
    z0 = kto_kl_baseline(t(-9.8, -10.4), t(-10.0, -11.0))
    assert close(z0, 0.4)
    # desirable rho=+1:   1 - sigmoid(0.1*(1 - 0.4))  = 1 - sigmoid(0.06) = 1 - 0.514996 = 0.485004
    # undesirable rho=-1: 1 - sigmoid(0.1*(0.4 + 1)) = 1 - sigmoid(0.14) = 1 - 0.534943 = 0.465057
    out = kto_loss(t(-10.0, -12.0), t(-11.0, -11.0), torch.tensor([True, False]), z0, beta=0.1)
    assert close(out.losses[0], 0.485004)
    assert close(out.losses[1], 0.465057)
    # rewards beta*rho = (0.1, -0.1)
    assert torch.allclose(out.rewards, t(0.1, -0.1))
    assert out.chosen_rewards is None


def test_kto_baseline_clamped_at_zero():
    # mean of (-0.5, -0.1) = -0.3 < 0 -> z0 = 0
    assert kto_kl_baseline(t(-10.5, -10.1), t(-10.0, -10.0)).item() == 0.0


def test_kto_weights():
    # desirable_weight=2 doubles the desirable loss: 2*0.4850045 = 0.970009; undesirable unchanged
    out = kto_loss(
        t(-10.0, -12.0), t(-11.0, -11.0), torch.tensor([True, False]), 0.4, desirable_weight=2.0
    )
    assert close(out.losses[0], 0.970009)
    assert close(out.losses[1], 0.465057)


# ---- IPO -------------------------------------------------------------------------------------


def test_ipo_summed():
    # (h - 1/(2*0.1))^2 = (2 - 5)^2 = 9.0
    assert close(ipo_loss(*example_e(), tau=0.1).losses, 9.0)


def test_ipo_averaged():
    # |y_w|=5, |y_l|=4: rho_w = -10/5 - (-11/5) = -2 + 2.2 = 0.2
    #                   rho_l = -12/4 - (-11/4) = -3 + 2.75 = -0.25
    # h = 0.2 + 0.25 = 0.45; (0.45 - 5)^2 = (-4.55)^2 = 20.7025
    pc, pr, rc, rr = example_e()
    out = ipo_loss(pc / 5, pr / 4, rc / 5, rr / 4, tau=0.1)
    assert close(out.losses, 20.7025)


# ---- SPIN ------------------------------------------------------------------------------------


def test_spin_example_e():
    # Human answer logp -10 (opponent -11), own sample logp -12 (opponent -11): same numbers as E,
    # lam=0.1 in place of beta -> nls(0.1*2) = 0.598139
    assert close(spin_loss(*example_e(), lam=0.1).losses, 0.598139)


def test_spin_iteration_starts_at_ln2():
    # policy initialised from the opponent: both ratios 0 -> ln 2
    out = spin_loss(t(-10.0), t(-12.0), t(-10.0), t(-12.0), lam=0.1)
    assert close(out.losses, LN2)


# ---- SDPO (segment-level DPO = dpo_loss on segment sums) --------------------------------------


def test_segment_dpo_example():
    # Two agent turns in the segment [e, k]. Per-turn ratios: chosen 0.5 = -3.0 - (-3.5) and
    # 0.3 = -2.2 - (-2.5); rejected -0.2 = -4.2 - (-4.0) and -0.4 = -1.9 - (-1.5).
    # h = (0.5 + 0.3) - (-0.2 - 0.4) = 1.4; nls(0.14) = log(1 + e^-0.14) = log(1.869358) = 0.625595
    policy_chosen_turns, reference_chosen_turns = t(-3.0, -2.2), t(-3.5, -2.5)
    policy_rejected_turns, reference_rejected_turns = t(-4.2, -1.9), t(-4.0, -1.5)
    out = dpo_loss(
        policy_chosen_turns.sum().view(1),
        policy_rejected_turns.sum().view(1),
        reference_chosen_turns.sum().view(1),
        reference_rejected_turns.sum().view(1),
        beta=0.1,
    )
    assert close(out.losses, 0.625595)


def test_segment_dpo_shared_turn_leaves_loss_unchanged():
    # Prepend a shared history turn (policy -5.0, reference -4.6, ratio +0.4) to both sessions.
    # The segment mask excludes it: masked sums are those of the previous test -> 0.625595.
    # Even summed in, it adds 0.4 to both rho_w and rho_l and cancels in h.
    policy_chosen, reference_chosen = t(-5.0, -3.0, -2.2), t(-4.6, -3.5, -2.5)
    policy_rejected, reference_rejected = t(-5.0, -4.2, -1.9), t(-4.6, -4.0, -1.5)
    segment = t(0.0, 1.0, 1.0)  # agent turns inside [e, k]
    for mask in (segment, torch.ones(3, dtype=torch.float64)):
        out = dpo_loss(
            (policy_chosen * mask).sum().view(1),
            (policy_rejected * mask).sum().view(1),
            (reference_chosen * mask).sum().view(1),
            (reference_rejected * mask).sum().view(1),
            beta=0.1,
        )
        assert close(out.losses, 0.625595)


# ---- SimPO -----------------------------------------------------------------------------------


def test_simpo_example():
    # avg_w = -10/20 = -0.5, avg_l = -12/15 = -0.8; gamma = (gamma/beta) * beta = 0.5 * 2 = 1.0
    # nls(2*(-0.5 + 0.8) - 1.0) = nls(0.6 - 1.0) = nls(-0.4) = log(1 + e^0.4) = log(2.491825)
    # = 0.913015
    out = simpo_loss(t(-10.0 / 20), t(-12.0 / 15), beta=2.0, gamma=1.0)
    assert close(out.losses, 0.913015)
    # rewards beta*avg: 2*(-0.5) = -1.0, 2*(-0.8) = -1.6
    assert close(out.chosen_rewards, -1.0) and close(out.rejected_rewards, -1.6)


# ---- ODPO ------------------------------------------------------------------------------------


def test_odpo_example():
    # Delta = 1 * log(0.9 - 0.4) = log 0.5 = -0.693147
    offsets = odpo_offsets(t(0.9), t(0.4), alpha=1.0)
    assert close(offsets, -0.693147)
    # nls(0.1*2 - (-0.693147)) = nls(0.893147) = log(1 + e^-0.893147) = log(1.409365) = 0.343140
    out = odpo_loss(*example_e(), offsets, beta=0.1)
    assert close(out.losses, 0.343140)
    assert close(out.metrics["offset"], -0.693147)


def test_odpo_ratio_form():
    # Delta = 2 * log(0.9 / 0.45) = 2 * log 2 = 1.386294
    assert close(odpo_offsets(t(0.9), t(0.45), alpha=2.0, form="ratio"), 1.386294)


# ---- rDPO ------------------------------------------------------------------------------------


def test_rdpo_example_e():
    # nls(0.2) = 0.598139, nls(-0.2) = log(1 + e^0.2) = 0.798139
    # (0.9*0.598139 - 0.1*0.798139) / 0.8 = (0.538325 - 0.079814) / 0.8 = 0.458511 / 0.8 = 0.573139
    assert close(rdpo_loss(*example_e(), beta=0.1, eps=0.1).losses, 0.573139)


def test_rdpo_unbounded_below():
    # h=100: beta*h = 10; nls(10) = 4.5398e-5, nls(-10) = 10.0000454
    # (0.9*4.5398e-5 - 0.1*10.0000454) / 0.8 = (0.0000409 - 1.0000045) / 0.8 = -1.249955
    out = rdpo_loss(t(40.0), t(-60.0), t(0.0), t(0.0), beta=0.1, eps=0.1)
    assert close(out.losses, -1.249955)


def test_rdpo_is_not_cdpo():
    # cDPO (label smoothing) on E: 0.9*0.598139 + 0.1*0.798139 = 0.538325 + 0.079814 = 0.618139
    z = torch.tensor(0.2, dtype=torch.float64)
    cdpo = 0.9 * -F.logsigmoid(z) + 0.1 * -F.logsigmoid(-z)
    assert close(cdpo, 0.618139)
    rdpo = rdpo_loss(*example_e(), beta=0.1, eps=0.1).losses
    assert abs(rdpo.item() - cdpo.item()) > 0.04  # 0.573139 vs 0.618139


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_examples_hold_in_float32(dtype):
    # The engine keeps log-probs in fp32; the DPO example must hold there too.
    pc, pr, rc, rr = (x.to(dtype) for x in example_e())
    assert abs(dpo_loss(pc, pr, rc, rr).losses.item() - math.log1p(math.exp(-0.2))) < TOL
