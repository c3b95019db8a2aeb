"""TRL 1.16's DPO loss types that dpokit lacked, plus cDPO: worked examples by hand, gradcheck,
the value at policy == reference, equality with TRL's formulas and hyperparameter checks.

Notation as in docs/methods.md: nls(z) = -log sigmoid(z) = log(1 + exp(-z)); rho = logp - ref;
h = rho_w - rho_l. Example E: logp(y_w)=-10, logp(y_l)=-12, ref(y_w)=ref(y_l)=-11, so rho_w=+1,
rho_l=-1, h=2; beta=0.1. Values used below: nls(0.1)=0.644397, nls(-0.1)=0.744397,
nls(0.2)=0.598139, nls(-0.2)=0.798139, sigmoid(0.1)=0.524979, sigmoid(0.2)=0.549834.

The TRL formulas in ``trl_formula`` are re-written from reading trl 1.16.0's
``trainer/dpo_trainer.py`` (``_compute_loss``) and, for BCO's running mean, trl 0.19.1's
``RunningMoments`` and ``BCOTrainer.bco_loss``; trl is not imported.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck

from dpokit.losses.aot import aot_loss, aot_unpaired_loss
from dpokit.losses.apo import apo_down_loss, apo_zero_loss
from dpokit.losses.bco import RewardBaseline, bco_pair_loss
from dpokit.losses.cdpo import cdpo_loss
from dpokit.losses.discopop import discopop_loss
from dpokit.losses.exo import exo_pair_loss
from dpokit.losses.hinge import hinge_loss
from dpokit.losses.nca import nca_pair_loss
from dpokit.losses.sigmoid_norm import sigmoid_norm_loss
from dpokit.losses.sppo import sppo_hard_loss

TOL = 1e-6
LN2 = 0.693147


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


def example_e() -> tuple[torch.Tensor, ...]:
    return t(-10.0), t(-12.0), t(-11.0), t(-11.0)


def at_reference() -> tuple[torch.Tensor, ...]:
    """Policy == reference on three pairs of different lengths: every rho is 0."""
    policy = t(-11.0, -40.0, -3.5)
    return policy, policy - 2.0, policy.clone(), policy - 2.0


def values(out) -> list[float]:
    return out.losses.tolist()


def assert_close(actual, expected: list[float]) -> None:
    assert len(actual) == len(expected)
    assert all(abs(a - e) < TOL for a, e in zip(actual, expected, strict=True)), (actual, expected)


# ---- (a) worked examples and (c) policy == reference ------------------------------------------


def test_cdpo_example_e():
    # z = beta*h = 0.2; 0.9*nls(0.2) + 0.1*nls(-0.2) = 0.9*0.598139 + 0.1*0.798139
    #   = 0.538325 + 0.079814 = 0.618139 (the number docs/methods.md gives for cDPO on E)
    out = cdpo_loss(*example_e(), beta=0.1, smoothing=0.1)
    assert_close(values(out), [0.618139])
    assert_close(out.chosen_rewards.tolist(), [0.1])  # beta*rho_w
    assert_close(values(cdpo_loss(*example_e(), smoothing=0.0)), [0.598139])  # = DPO
    # h = 0: (1-s)*ln2 + s*ln2 = ln 2 for any s
    assert_close(values(cdpo_loss(*at_reference(), smoothing=0.3)), [LN2] * 3)


def test_hinge_example_e():
    # max(0, 1 - beta*h) = max(0, 1 - 0.1*2) = 0.8; at h = 0 it is 1
    assert_close(values(hinge_loss(*example_e(), beta=0.1)), [0.8])
    assert_close(values(hinge_loss(*at_reference())), [1.0] * 3)
    # past the margin 1/beta = 10 nats: logp(y_w) = -10 + 9 -> h = 11, max(0, 1 - 1.1) = 0
    assert_close(values(hinge_loss(t(-1.0), t(-12.0), t(-11.0), t(-11.0))), [0.0])


def test_exo_pair_example_e():
    # z = 0.2: q_w = sigmoid(0.2) = 0.549834, q_l = 0.450166; log q_w = -0.598139,
    # log q_l = -0.798139; eps = 1e-3: log(1-eps) = -0.0010005, log eps = -6.907755
    # q_w*(log q_w - log(1-eps)) = 0.549834*(-0.597138) = -0.328327
    # q_l*(log q_l - log eps)    = 0.450166*( 6.109616) =  2.750342
    # sum = 2.422015
    assert_close(values(exo_pair_loss(*example_e(), beta=0.1, smoothing=1e-3)), [2.422015])
    # h = 0: 0.5*(-0.693147 + 0.0010005) + 0.5*(-0.693147 + 6.907755) = -0.346073 + 3.107304
    assert_close(values(exo_pair_loss(*at_reference())), [2.761231] * 3)
    # the minimum 0 sits at z* = log((1-eps)/eps) = log 999 = 6.906755, i.e. h = 69.06755
    h_star = math.log(999) / 0.1
    out = exo_pair_loss(t(-11.0 + h_star), t(-11.0), t(-11.0), t(-11.0))
    assert abs(out.losses.item()) < 1e-12


def test_nca_pair_example_e():
    # r_w = 0.1, r_l = -0.1: nls(0.1) + 0.5*nls(-0.1) + 0.5*nls(0.1)
    #   = 0.644397 + 0.372198 + 0.322198 = 1.338793
    assert_close(values(nca_pair_loss(*example_e(), beta=0.1)), [1.338793])
    # rho = 0: ln2 + ln2/2 + ln2/2 = 2 ln2 = 1.386294
    assert_close(values(nca_pair_loss(*at_reference())), [1.386294] * 3)


def test_bco_pair_example_e():
    # delta = 0 (TRL 1.16): nls(0.1) + nls(-(-0.1)) = 2*0.644397 = 1.288793
    assert_close(values(bco_pair_loss(*example_e(), 0.0, beta=0.1)), [1.288793])
    # delta = 0.05: nls(0.1 - 0.05) + nls(-(-0.1 - 0.05)) = nls(0.05) + nls(0.15)
    #   = log(1 + e^-0.05) + log(1 + e^-0.15) = log(1.951229) + log(1.860708)
    #   = 0.668558 + 0.620859 = 1.289417
    out = bco_pair_loss(*example_e(), torch.tensor(0.05), beta=0.1)
    assert_close(values(out), [1.289417])
    assert_close(out.metrics["reward_baseline"].tolist(), [0.05])
    assert_close(values(bco_pair_loss(*at_reference(), 0.0)), [1.386294] * 3)  # 2 ln 2


def test_sppo_hard_example_e():
    # targets +-1/(2*beta) = +-5: (1 - 5)^2 + (-1 + 5)^2 = 16 + 16 = 32
    assert_close(values(sppo_hard_loss(*example_e(), beta=0.1)), [32.0])
    # rho = 0: 5^2 + 5^2 = 50
    assert_close(values(sppo_hard_loss(*at_reference())), [50.0] * 3)


def test_apo_examples_e():
    # zero: (1 - sigmoid(0.1)) + sigmoid(-0.1) = 0.475021 + 0.475021 = 0.950042
    assert_close(values(apo_zero_loss(*example_e(), beta=0.1)), [0.950042])
    # down: sigmoid(0.1) + (1 - sigmoid(0.1 - (-0.1))) = 0.524979 + 0.450166 = 0.975145
    assert_close(values(apo_down_loss(*example_e(), beta=0.1)), [0.975145])
    # rho = 0: (1 - 0.5) + 0.5 = 1 and 0.5 + (1 - 0.5) = 1
    assert_close(values(apo_zero_loss(*at_reference())), [1.0] * 3)
    assert_close(values(apo_down_loss(*at_reference())), [1.0] * 3)


def test_discopop_example_e():
    # z = 0.2, m = sigmoid(0.2/0.05) = sigmoid(4) = 0.982014
    # (1 - m)*nls(0.2) + m*exp(-0.2) = 0.017986*0.598139 + 0.982014*0.818731
    #   = 0.010758 + 0.804005 = 0.814763
    out = discopop_loss(*example_e(), beta=0.1, tau=0.05)
    assert_close(values(out), [0.814763])
    assert_close(out.metrics["modulation"].tolist(), [0.982014])
    # z = 0: m = 0.5, 0.5*ln2 + 0.5*1 = 0.846574
    assert_close(values(discopop_loss(*at_reference())), [0.846574] * 3)


def test_sigmoid_norm_example_e():
    # |y_w| = 20, |y_l| = 15: rho_w/20 - rho_l/15 = 0.05 + 0.066667 = 0.116667
    # nls(0.1*0.116667) = nls(0.0116667) = log(1 + e^-0.0116667) = log(1.988401) = 0.687331
    out = sigmoid_norm_loss(*example_e(), t(20.0), t(15.0), beta=0.1)
    assert_close(values(out), [0.687331])
    assert_close(out.chosen_rewards.tolist(), [0.005])  # beta*rho_w/|y_w| = 0.1*1/20
    lengths = torch.tensor([20, 3, 1])  # integer counts are accepted
    assert_close(values(sigmoid_norm_loss(*at_reference(), lengths, lengths)), [LN2] * 3)


def aot_batch() -> tuple[torch.Tensor, ...]:
    """Pair 1 = E; pair 2: logp(y_w)=-22, logp(y_l)=-21, ref(y_w)=-19, ref(y_l)=-21."""
    return t(-10.0, -22.0), t(-12.0, -21.0), t(-11.0, -19.0), t(-11.0, -21.0)


def test_aot_paired_example():
    # policy log-odds u = (-10+12, -22+21) = (2, -1) -> sorted (-1, 2)
    # reference log-odds v = (0, -19+21) = (0, 2)    -> sorted (0, 2)
    # margins by rank: (-1 - 0, 2 - 2) = (-1, 0): losses nls(-0.1) = 0.744397, nls(0) = 0.693147
    out = aot_loss(*aot_batch(), beta=0.1)
    assert_close(values(out), [0.744397, LN2])
    # DPO on the same pairs: h = (2, -3), losses (0.598139, 0.854355), mean 0.726247 != 0.718772
    assert abs(out.loss.item() - 0.718772) < TOL
    # rewards stay per pair, in input order: beta*rho_w = (0.1, -0.3)
    assert_close(out.chosen_rewards.tolist(), [0.1, -0.3])
    # smoothing 0.1, rank 1: 0.9*nls(-0.1) + 0.1*nls(0.1) = 0.669957 + 0.064440 = 0.734397
    assert_close(values(aot_loss(*aot_batch(), smoothing=0.1)), [0.734397, LN2])
    assert_close(values(aot_loss(*at_reference(), smoothing=0.2)), [LN2] * 3)


def test_aot_unpaired_example():
    # rho_w = (1, -22+19) = (1, -3) -> sorted (-3, 1); rho_l = (-1, 0) -> sorted (-1, 0)
    # margins by rank: (-3 + 1, 1 - 0) = (-2, 1): nls(-0.2) = 0.798139, nls(0.1) = 0.644397
    out = aot_unpaired_loss(*aot_batch(), beta=0.1)
    assert_close(values(out), [0.798139, 0.644397])
    assert_close(out.metrics["sorted_margin"].tolist(), [-2.0, 1.0])
    assert_close(values(aot_unpaired_loss(*at_reference())), [LN2] * 3)


def test_aot_depends_on_the_batch_and_is_cdpo_for_one_pair():
    # B = 1: sorting is the identity and the margin is h, so AOT is cDPO
    one = tuple(x[:1] for x in aot_batch())
    assert_close(values(aot_loss(*one, smoothing=0.1)), values(cdpo_loss(*one, smoothing=0.1)))
    # pair 1 alone has loss nls(0.2); next to pair 2 its rank-1 loss is nls(-0.1)
    assert abs(aot_loss(*aot_batch()).loss.item() - dpo_mean(aot_batch())) > 1e-3


def dpo_mean(batch) -> float:
    pc, pr, rc, rr = batch
    return (-F.logsigmoid(0.1 * ((pc - rc) - (pr - rr)))).mean().item()


# ---- BCO's running baseline ----------------------------------------------------------------


class TRLRunningMoments:
    """trl 0.19.1 ``RunningMoments`` (single process), re-written: Chan et al.'s merge."""

    def __init__(self) -> None:
        self.mean, self.var, self.count = 0.0, 1.0, 1e-24

    def update(self, xs: torch.Tensor) -> None:
        xs_count = xs.numel()
        xs_var, xs_mean = torch.var_mean(xs.double(), unbiased=False)
        delta = xs_mean.item() - self.mean
        tot_count = self.count + xs_count
        old_sum = self.var * self.count + delta**2 * self.count * xs_count / tot_count
        self.mean += delta * xs_count / tot_count
        self.var = (old_sum + xs_var.item() * xs_count) / tot_count
        self.count = tot_count


def test_reward_baseline_worked_example():
    baseline = RewardBaseline()
    assert baseline.value == 0.0
    # batch 1: rewards (0.1, -0.1, 0.4, 0.2): mean 0.15, count 4
    assert abs(baseline.update(t(0.1, -0.1, 0.4, 0.2)) - 0.15) < 1e-12
    # batch 2: rewards (0.9, 0.3): mean 0.6; new mean 0.15 + (0.6 - 0.15)*2/6 = 0.3
    # (= (0.6 + 1.2)/6, the mean of all six rewards)
    assert abs(baseline.update(t(0.9, 0.3)) - 0.3) < 1e-12
    assert baseline.state_dict() == {"mean": pytest.approx(0.3), "count": 6.0}


def test_reward_baseline_matches_trl_bco_trainer_and_resumes_exactly():
    gen = torch.Generator().manual_seed(3)
    ours, trl, beta = RewardBaseline(), TRLRunningMoments(), 0.2
    resumed = None
    for step in range(6):
        batch = [-torch.rand(5, generator=gen, dtype=torch.float64) * 30 for _ in range(4)]
        pc, pr, rc, rr = batch
        rewards = beta * torch.cat([pc - rc, pr - rr])  # (2B,), as BCOTrainer.bco_loss
        ours.update(rewards)
        trl.update(rewards)
        if step == 2:  # a checkpoint mid-run, loaded into a fresh object
            resumed = RewardBaseline()
            resumed.load_state_dict(dict(ours.state_dict()))
        elif resumed is not None:
            resumed.update(rewards)
        # BCOTrainer: -logsigmoid(r_w - delta) - logsigmoid(-(r_l - delta)), delta after update
        expected = -F.logsigmoid(beta * (pc - rc) - trl.mean) - F.logsigmoid(
            -(beta * (pr - rr) - trl.mean)
        )
        assert torch.allclose(bco_pair_loss(*batch, ours.value, beta=beta).losses, expected)
        assert abs(ours.value - trl.mean) < 1e-12
    assert resumed.state_dict() == ours.state_dict()


def test_reward_baseline_rejects_bad_input():
    baseline = RewardBaseline()
    with pytest.raises(ValueError, match="rewards"):
        baseline.update(torch.empty(0))
    with pytest.raises(ValueError, match="rewards"):
        baseline.update(t(0.1, math.nan))
    assert baseline.state_dict() == {"mean": 0.0, "count": 0.0}  # left untouched
    with pytest.raises(ValueError, match="count"):
        baseline.load_state_dict({"mean": 0.1})
    with pytest.raises(ValueError, match="count"):
        baseline.load_state_dict({"mean": 0.1, "count": -1.0})
    with pytest.raises(ValueError, match="mean"):
        baseline.load_state_dict({"mean": math.inf, "count": 2.0})


# ---- (b) gradcheck in float64 ----------------------------------------------------------------

B = 4

GRADCHECK = {
    "cdpo": lambda *x: cdpo_loss(*x, beta=0.3, smoothing=0.2),
    "hinge": lambda *x: hinge_loss(*x, beta=0.01),  # beta*|h| < 1: away from the kink
    "exo_pair": lambda *x: exo_pair_loss(*x, beta=0.3, smoothing=0.05),
    "nca_pair": lambda *x: nca_pair_loss(*x, beta=0.3),
    "bco_pair": lambda *x: bco_pair_loss(*x, 0.4, beta=0.3),
    "sppo_hard": lambda *x: sppo_hard_loss(*x, beta=0.3),
    "aot": lambda *x: aot_loss(*x, beta=0.3, smoothing=0.1),
    "aot_unpaired": lambda *x: aot_unpaired_loss(*x, beta=0.3, smoothing=0.1),
    "apo_zero": lambda *x: apo_zero_loss(*x, beta=0.3),
    "apo_down": lambda *x: apo_down_loss(*x, beta=0.3),
    "discopop": lambda *x: discopop_loss(*x, beta=0.3, tau=0.5),
    "sigmoid_norm": lambda *x: sigmoid_norm_loss(
        *x, torch.tensor([3, 7, 1, 12]), torch.tensor([5, 2, 9, 1]), beta=0.3
    ),
}


def random_logps(seed: int, n: int = 4, size: int = B, scale: float = 5.0) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return [-torch.rand(size, generator=gen, dtype=torch.float64) * scale for _ in range(n)]


@pytest.mark.parametrize("name", sorted(GRADCHECK))
def test_gradcheck(name):
    inputs = tuple(x.requires_grad_() for x in random_logps(sorted(GRADCHECK).index(name)))
    assert gradcheck(lambda *x: GRADCHECK[name](*x).losses, inputs, eps=1e-6, atol=1e-6)


def test_rewards_are_detached():
    inputs = tuple(x.requires_grad_() for x in random_logps(0))
    for name, fn in GRADCHECK.items():
        out = fn(*inputs)
        assert out.losses.requires_grad, name
        assert not out.chosen_rewards.requires_grad and not out.rejected_rewards.requires_grad


# ---- (d) equality with TRL 1.16's formulas on random inputs -----------------------------------


def trl_formula(loss_type: str, pc, pr, rc, rr, lengths, beta=0.1, ls=0.0, tau=0.05):
    """Per-sequence loss of trl 1.16.0 ``DPOTrainer._compute_loss`` (reverse_kl, no ld_alpha)."""
    cw, cl = pc - rc, pr - rr  # chosen_logratios, rejected_logratios
    d = cw - cl  # delta_score
    if loss_type == "hinge":
        return torch.relu(1 - beta * d)
    if loss_type == "exo_pair":
        qw, ql = torch.sigmoid(beta * d), torch.sigmoid(-beta * d)
        lqw, lql = F.logsigmoid(beta * d), F.logsigmoid(-beta * d)
        return qw * (lqw - math.log1p(-ls)) + ql * (lql - math.log(ls))
    if loss_type == "nca_pair":
        a, b = beta * cw, beta * cl
        return -F.logsigmoid(a) - 0.5 * F.logsigmoid(-a) - 0.5 * F.logsigmoid(-b)
    if loss_type == "bco_pair":
        return -F.logsigmoid(beta * cw) - F.logsigmoid(-beta * cl)
    if loss_type == "sppo_hard":
        return (cw - 0.5 / beta) ** 2 + (cl + 0.5 / beta) ** 2
    if loss_type in ("aot", "aot_unpaired"):
        if loss_type == "aot":
            delta = torch.sort(pc - pr, dim=0)[0] - torch.sort(rc - rr, dim=0)[0]
        else:
            delta = torch.sort(cw, dim=0)[0] - torch.sort(cl, dim=0)[0]
        return -F.logsigmoid(beta * delta) * (1 - ls) - F.logsigmoid(-beta * delta) * ls
    if loss_type == "apo_zero":
        return 1 - torch.sigmoid(beta * cw) + torch.sigmoid(beta * cl)
    if loss_type == "apo_down":
        return torch.sigmoid(beta * cw) + 1 - torch.sigmoid(beta * (cw - cl))
    if loss_type == "discopop":
        logits = d * beta
        m = torch.sigmoid(logits / tau)
        return -F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
    if loss_type == "sigmoid_norm":
        chosen_len, rejected_len = lengths  # completion_mask.sum(dim=1).clamp(min=1.0)
        return -F.logsigmoid(beta * (cw / chosen_len - cl / rejected_len))
    raise AssertionError(loss_type)


TRL_CASES = {
    # loss_type: (dpokit call, TRL config beyond beta)
    "hinge": (lambda x, beta, n: hinge_loss(*x, beta=beta), {}),
    "exo_pair": (lambda x, beta, n: exo_pair_loss(*x, beta=beta, smoothing=1e-3), {"ls": 1e-3}),
    "nca_pair": (lambda x, beta, n: nca_pair_loss(*x, beta=beta), {}),
    "bco_pair": (lambda x, beta, n: bco_pair_loss(*x, 0.0, beta=beta), {}),
    "sppo_hard": (lambda x, beta, n: sppo_hard_loss(*x, beta=beta), {}),
    "aot": (lambda x, beta, n: aot_loss(*x, beta=beta, smoothing=0.2), {"ls": 0.2}),
    "aot_unpaired": (
        lambda x, beta, n: aot_unpaired_loss(*x, beta=beta, smoothing=0.2),
        {"ls": 0.2},
    ),
    "apo_zero": (lambda x, beta, n: apo_zero_loss(*x, beta=beta), {}),
    "apo_down": (lambda x, beta, n: apo_down_loss(*x, beta=beta), {}),
    "discopop": (lambda x, beta, n: discopop_loss(*x, beta=beta, tau=0.05), {"tau": 0.05}),
    "sigmoid_norm": (lambda x, beta, n: sigmoid_norm_loss(*x, *n, beta=beta), {}),
}


@pytest.mark.parametrize("loss_type", sorted(TRL_CASES))
@pytest.mark.parametrize("beta", [0.1, 0.5])
def test_matches_trl_formula(loss_type, beta):
    ours, config = TRL_CASES[loss_type]
    x = random_logps(11, size=64, scale=60.0)
    gen = torch.Generator().manual_seed(5)
    lengths = tuple(torch.randint(1, 40, (64,), generator=gen).double() for _ in range(2))
    expected = trl_formula(loss_type, *x, lengths, beta=beta, **config)
    assert torch.allclose(ours(x, beta, lengths).losses, expected, rtol=1e-10, atol=1e-10)


def test_discopop_is_finite_where_the_literal_formula_is_nan():
    # z = beta*h = -100 in float32: exp(100) = inf, sigmoid(-2000) = 0, 0*inf = NaN in TRL's form;
    # here m*exp(-z) = exp(100 + log sigmoid(-2000)) = exp(-1900) = 0 and the loss is nls(-100)
    x = [torch.tensor([v], dtype=torch.float32) for v in (-1011.0, -11.0, -11.0, -11.0)]
    assert torch.isnan(trl_formula("discopop", *x, None)).all()
    out = discopop_loss(*x, beta=0.1)
    assert torch.isfinite(out.losses).all() and abs(out.losses.item() - 100.0) < 1e-4


# ---- (e) bad hyperparameters and inputs raise ValueError naming them ---------------------------

BAD = [
    (cdpo_loss, {"beta": 0.0}, "beta"),
    (cdpo_loss, {"smoothing": 0.5}, "smoothing"),
    (cdpo_loss, {"smoothing": -0.1}, "smoothing"),
    (hinge_loss, {"beta": -1.0}, "beta"),
    (exo_pair_loss, {"smoothing": 0.0}, "smoothing"),
    (exo_pair_loss, {"smoothing": 0.5}, "smoothing"),
    (exo_pair_loss, {"beta": math.nan}, "beta"),
    (nca_pair_loss, {"beta": 0.0}, "beta"),
    (sppo_hard_loss, {"beta": 0.0}, "beta"),
    (aot_loss, {"smoothing": 0.5}, "smoothing"),
    (aot_unpaired_loss, {"beta": 0.0}, "beta"),
    (apo_zero_loss, {"beta": 0.0}, "beta"),
    (apo_down_loss, {"beta": -0.1}, "beta"),
    (discopop_loss, {"tau": 0.0}, "tau"),
    (discopop_loss, {"beta": 0.0}, "beta"),
]


@pytest.mark.parametrize(("fn", "kwargs", "name"), BAD, ids=lambda v: getattr(v, "__name__", None))
def test_bad_hyperparameters_raise(fn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        fn(*example_e(), **kwargs)


def test_bad_inputs_raise():
    pc, pr, rc, rr = example_e()
    with pytest.raises(ValueError, match="beta"):
        bco_pair_loss(pc, pr, rc, rr, 0.0, beta=0.0)
    with pytest.raises(ValueError, match="reward_baseline"):
        bco_pair_loss(pc, pr, rc, rr, t(0.1, 0.2))
    with pytest.raises(ValueError, match="reward_baseline"):
        bco_pair_loss(pc, pr, rc, rr, math.inf)
    with pytest.raises(ValueError, match="chosen_lengths"):
        sigmoid_norm_loss(pc, pr, rc, rr, t(0.0), t(3.0))
    with pytest.raises(ValueError, match="beta"):
        sigmoid_norm_loss(pc, pr, rc, rr, t(2.0), t(3.0), beta=0.0)
    with pytest.raises(ValueError, match="shape"):
        aot_loss(pc.view(1, 1), pr.view(1, 1), rc.view(1, 1), rr.view(1, 1))
    with pytest.raises(ValueError, match="same shape"):
        nca_pair_loss(t(-1.0, -2.0), pr, rc, rr)
