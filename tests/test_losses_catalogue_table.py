"""The catalogue's rows in the method table: adapters, worked examples through `compute`, flags,
combined objectives (MPO), the reward-baseline hook and `dpokit methods -v`.

Worked values are those of docs/methods.md ("More objectives"), computed by hand there: Example E
is logp(y_w) = -10, logp(y_l) = -12, ref(y_w) = ref(y_l) = -11 (rho_w = +1, rho_l = -1, h = 2).
"""

from __future__ import annotations

import math

import pytest
import torch

from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.losses import (
    METHODS,
    LossInputs,
    aot_loss,
    aot_unpaired_loss,
    apo_down_loss,
    apo_zero_loss,
    bco_pair_loss,
    cdpo_loss,
    cpo_loss,
    discopop_loss,
    dpo_loss,
    exo_pair_loss,
    format_methods,
    get_method,
    hinge_loss,
    nca_pair_loss,
    orpo_loss,
    resolve_hyperparameters,
    sigmoid_norm_loss,
    sppo_hard_loss,
)
from dpokit.steps.baseline import RewardBaselineHook


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


PC, PR, RC, RR = t(-10.0, -12.0), t(-12.0, -10.0), t(-11.0, -11.0), t(-11.0, -11.0)
LC, LR = t(20.0, 5.0), t(15.0, 4.0)


def inputs(**overrides) -> LossInputs:
    values = dict(
        policy_chosen_logps=PC,
        policy_rejected_logps=PR,
        reference_chosen_logps=RC,
        reference_rejected_logps=RR,
        chosen_lengths=LC,
        rejected_lengths=LR,
        reward_baseline=0.05,
    )
    values.update(overrides)
    return LossInputs(**values)


def example_e(chosen_length=5.0, rejected_length=4.0, **extra) -> LossInputs:
    values = dict(
        policy_chosen_logps=t(-10.0),
        policy_rejected_logps=t(-12.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-11.0),
        chosen_lengths=t(chosen_length),
        rejected_lengths=t(rejected_length),
    )
    return inputs(**{**values, **extra})


# What each row's compute must equal: a direct call of its loss with the defaults.
DIRECT = {
    "cdpo": lambda: cdpo_loss(PC, PR, RC, RR, beta=0.1, smoothing=0.1),
    "hinge": lambda: hinge_loss(PC, PR, RC, RR, beta=0.1),
    "exo_pair": lambda: exo_pair_loss(PC, PR, RC, RR, beta=0.1, smoothing=1e-3),
    "nca_pair": lambda: nca_pair_loss(PC, PR, RC, RR, beta=0.1),
    "sppo_hard": lambda: sppo_hard_loss(PC, PR, RC, RR, beta=0.1),
    "apo_zero": lambda: apo_zero_loss(PC, PR, RC, RR, beta=0.1),
    "apo_down": lambda: apo_down_loss(PC, PR, RC, RR, beta=0.1),
    "discopop": lambda: discopop_loss(PC, PR, RC, RR, beta=0.1, tau=0.05),
    "bco_pair": lambda: bco_pair_loss(PC, PR, RC, RR, 0.05, beta=0.1),
    "aot": lambda: aot_loss(PC, PR, RC, RR, beta=0.1, smoothing=0.0),
    "aot_unpaired": lambda: aot_unpaired_loss(PC, PR, RC, RR, beta=0.1, smoothing=0.0),
    "sigmoid_norm": lambda: sigmoid_norm_loss(PC, PR, RC, RR, LC, LR, beta=0.1),
    "orpo": lambda: orpo_loss(PC / LC, PR / LR, beta=0.1),
    "cpo": lambda: cpo_loss(PC, PR, LC, LR, beta=0.1, alpha=1.0),
    "cpo_simpo": lambda: cpo_loss(PC, PR, LC, LR, beta=0.1, alpha=1.0, variant="simpo", gamma=0.5),
}


@pytest.mark.parametrize("name", list(DIRECT))
def test_compute_equals_direct_call(name):
    spec = METHODS[name]
    out = spec.compute(inputs(), resolve_hyperparameters(spec, {}))
    want = DIRECT[name]()
    torch.testing.assert_close(out.losses, want.losses, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.chosen_rewards, want.chosen_rewards, atol=1e-12, rtol=0)
    torch.testing.assert_close(out.rejected_rewards, want.rejected_rewards, atol=1e-12, rtol=0)


# (method, hyperparameters, lengths (|y_w|, |y_l|), the hand-worked loss on Example E)
EXAMPLES = [
    ("cdpo", {}, (5, 4), 0.618139),  # 0.9 nls(0.2) + 0.1 nls(-0.2)
    ("hinge", {}, (5, 4), 0.8),  # max(0, 1 - 0.2)
    ("exo_pair", {}, (5, 4), 2.422015),
    ("nca_pair", {}, (5, 4), 1.338793),
    ("bco_pair", {"baseline": "zero"}, (5, 4), 1.288793),  # 2 nls(0.1)
    ("sppo_hard", {}, (5, 4), 32.0),  # (1 - 5)^2 + (-1 + 5)^2
    ("apo_zero", {}, (5, 4), 0.950042),
    ("apo_down", {}, (5, 4), 0.975145),
    ("discopop", {}, (5, 4), 0.814763),
    ("aot", {}, (5, 4), 0.598139),  # B = 1: DPO
    ("sigmoid_norm", {}, (20, 15), 0.687331),  # nls(0.1 * (1/20 + 1/15))
    ("cpo", {}, (8, 4), 1.848139),  # nls(0.2) + 10/8
    ("cpo_simpo", {"beta": 2.0}, (8, 4), 1.298587),  # nls(2 * 1.75 - 0.5) + 1.25
    ("cdpo", {"smoothing": 0.0}, (5, 4), 0.598139),  # smoothing 0 is DPO
]


@pytest.mark.parametrize(("name", "hp", "lengths", "expected"), EXAMPLES)
def test_worked_examples_through_the_table(name, hp, lengths, expected):
    out = get_method(name).compute(example_e(*lengths), hp)
    assert out.losses.item() == pytest.approx(expected, abs=1e-6)


def test_bco_reads_the_engine_baseline_unless_zero():
    # delta = 0.05: nls(0.05) + nls(0.15) = 0.668558 + 0.620859
    bco = get_method("bco_pair")
    assert bco.compute(example_e(), {}).losses.item() == pytest.approx(1.289417, abs=1e-6)
    with pytest.raises(ValueError, match="reward_baseline"):
        bco.compute(example_e(reward_baseline=None), {})
    assert bco.compute(example_e(reward_baseline=None), {"baseline": "zero"}).losses.item() == (
        pytest.approx(1.288793, abs=1e-6)
    )


def test_orpo_worked_example():
    # a(y_w) = -5/10 = -0.5, a(y_l) = -4/4 = -1: 0.5 + 0.1 * 0.320300
    e = example_e(10, 4, policy_chosen_logps=t(-5.0), policy_rejected_logps=t(-4.0))
    assert get_method("orpo").compute(e, {}).losses.item() == pytest.approx(0.532030, abs=1e-6)


@pytest.mark.parametrize("name", list(DIRECT))
def test_first_loss_at_policy_equal_reference(name):
    # policy == reference: the losses with a reference start where their docs say.
    same = inputs(policy_chosen_logps=RC, policy_rejected_logps=RR, reward_baseline=0.0)
    expected = {
        "hinge": 1.0,
        "exo_pair": -math.log(2) - (math.log(0.999) + math.log(0.001)) / 2,
        "nca_pair": 2 * math.log(2),
        "bco_pair": 2 * math.log(2),
        "sppo_hard": 50.0,
        "apo_zero": 1.0,
        "apo_down": 1.0,
        "discopop": (math.log(2) + 1) / 2,
        "orpo": None,
        "cpo": None,
        "cpo_simpo": None,
    }.get(name, math.log(2))
    if expected is None:  # reference-free: no invariant beyond ln 2 + NLL
        return
    out = get_method(name).compute(same, {}).losses
    torch.testing.assert_close(out, torch.full_like(out, expected), atol=1e-9, rtol=0)


def test_capability_flags():
    assert [n for n, s in METHODS.items() if s.baseline_rewards is not None] == ["bco_pair"]
    for name in ("orpo", "cpo", "cpo_simpo"):
        assert METHODS[name].reference == "none"
    assert METHODS["orpo"].averaged_logps and METHODS["cpo_simpo"].averaged_logps
    assert not METHODS["sigmoid_norm"].averaged_logps  # sums + lengths: the loss divides once
    for name in DIRECT:
        spec = METHODS[name]
        assert spec.data == "pairs" and spec.step == "pairwise" and spec.recipe is None
        assert spec.reference in ("none", "logps") and not spec.token_kl and not spec.scores
        assert spec.paper and spec.title and spec.formula


# ---- combined objectives ---------------------------------------------------------------------

MPO = {"losses": "dpo,bco_pair,sft", "loss_weights": "0.8,0.2,1.0"}


def test_mpo_worked_example_and_component_logs():
    # |y_w| = 5, delta = 0: 0.8 * 0.598139 + 0.2 * 1.288793 + 1.0 * 10/5 = 2.736270
    out = get_method("combined").compute(example_e(reward_baseline=0.0), MPO)
    assert out.losses.item() == pytest.approx(2.736270, abs=1e-6)
    assert out.metrics["loss/dpo"].item() == pytest.approx(0.598139, abs=1e-6)
    assert out.metrics["loss/bco_pair"].item() == pytest.approx(1.288793, abs=1e-6)
    assert out.metrics["loss/sft"].item() == pytest.approx(2.0, abs=1e-6)
    assert out.chosen_rewards.item() == pytest.approx(0.1)  # DPO's, the first component's


def test_combined_shares_hyperparameters_by_name():
    hp = {"losses": "dpo,cdpo", "beta": "0.3"}
    out = get_method("combined").compute(inputs(), hp)
    want = dpo_loss(PC, PR, RC, RR, beta=0.3).losses + cdpo_loss(PC, PR, RC, RR, beta=0.3).losses
    torch.testing.assert_close(out.losses, want, atol=1e-12, rtol=0)
    # unset: each component keeps its own default (cdpo's smoothing 0.1, exo's 1e-3)
    out = get_method("combined").compute(inputs(), {"losses": "cdpo,exo_pair"})
    want = cdpo_loss(PC, PR, RC, RR).losses + exo_pair_loss(PC, PR, RC, RR).losses
    torch.testing.assert_close(out.losses, want, atol=1e-12, rtol=0)


def test_combined_row_needs_follow_its_components():
    combined = get_method("combined")
    assert combined.reference == "logps"  # default: dpo,sft
    assert combined.bind({"losses": "cpo,sft"}).reference == "none"
    mpo = combined.bind(MPO)
    assert mpo.reference == "logps" and mpo.baseline_rewards is not None
    assert mpo.title == "Combined objective: 0.8 * dpo + 0.2 * bco_pair + 1 * sft"
    assert combined.bind({"losses": "dpo,tdpo2"}).reference == "online"
    assert combined.bind({"losses": "dpo,odpo"}).scores
    assert get_method("dpo").bind({"beta": 0.5}) is get_method("dpo")


@pytest.mark.parametrize(
    ("hp", "pattern"),
    [
        ({"losses": "dpo,kto"}, r"kto trains on 'unpaired' data with the 'kto' step"),
        ({"losses": "dpo,spin"}, r"spin is several runs \(recipe spin\)"),
        ({"losses": "stepwise_dpo"}, r"stepwise_dpo is several runs"),
        ({"losses": "dpo,slic"}, r"slic trains on 'pairs' data with the 'slic' step"),
        ({"losses": "segment_dpo"}, r"'multiturn_pairs'"),
        ({"losses": "dpo,foo"}, r"unknown component 'foo'"),
        ({"losses": "dpo,dpo"}, r"dpo given twice"),
        ({"losses": "dpo,combined"}, r"cannot contain 'combined'"),
        ({"losses": " , "}, r"at least one component"),
        ({"losses": "dpo,sft", "loss_weights": "1"}, r"1 value\(s\) for 2 losses"),
        ({"losses": "dpo,sft", "loss_weights": "1,-1"}, r"loss_weights\['sft'\] must be"),
        ({"losses": "dpo,sft", "tau": 0.2}, r"tau is set but no component"),
        ({"losses": "exo_pair", "smoothing": 0.0}, r"smoothing must be in \(0, 0.5\)"),
    ],
)
def test_combined_refuses_by_name(hp, pattern):
    with pytest.raises(ValueError, match=pattern):
        get_method("combined").bind(hp)


def test_combined_refusal_surfaces_at_config_time():
    with pytest.raises(ConfigError, match="kto trains on 'unpaired'"):
        TrainConfig.from_dict(
            {"model": "m", "data": "d", "method": "combined", "losses": "dpo,kto"}
        )
    config = TrainConfig.from_dict({"model": "m", "data": "d", "method": "combined", **MPO})
    assert config.method_args["losses"] == "dpo,bco_pair,sft"
    assert config.method_args["beta"] is None  # unset: each component's default


# ---- the reward baseline hook ------------------------------------------------------------------


def test_baseline_hook_updates_in_training_only():
    hook = RewardBaselineHook(get_method("bco_pair"), {"beta": 0.1, "baseline": "running"})
    train, evaluation = hook.for_split("train"), hook.for_split("eval")
    # rewards beta * cat(rho_w, rho_l) = 0.1 * (1, -1, -1, 1): mean 0
    assert train(inputs()) == pytest.approx(0.0)
    shifted = inputs(policy_chosen_logps=t(-9.0, -11.0))  # 0.1 * (2, 0, -1, 1): mean 0.05
    assert train(shifted) == pytest.approx(0.025)  # the mean of all eight rewards
    assert evaluation(shifted) == pytest.approx(0.025)  # read, not updated
    state = hook.checkpoint_state()["reward_baseline"]
    assert state == {"mean": pytest.approx(0.025, abs=1e-15), "count": 8.0}
    other = RewardBaselineHook(get_method("bco_pair"), {"beta": 0.1, "baseline": "running"})
    other.restore(hook.checkpoint_state())
    assert other.state.state_dict() == hook.state.state_dict()
    with pytest.raises(ValueError, match="no reward baseline state"):
        other.restore({"step": 3})


def test_baseline_hook_is_inert_for_other_methods_and_skips_nonfinite():
    hook = RewardBaselineHook(get_method("dpo"), {"beta": 0.1})
    assert hook.for_split("train") is None and hook.checkpoint_state() == {}
    hook.restore({})  # nothing to restore
    bco = RewardBaselineHook(get_method("bco_pair"), {"beta": 0.1, "baseline": "running"})
    assert bco.for_split("train")(inputs(policy_chosen_logps=t(float("nan"), -12.0))) == 0.0
    assert bco.state.count == 0.0
    zero = RewardBaselineHook(get_method("bco_pair"), {"beta": 0.1, "baseline": "zero"})
    assert zero.for_split("train")(inputs()) == 0.0 and zero.state.count == 0.0


# ---- dpokit methods -v ---------------------------------------------------------------------------


def test_methods_verbose_lists_every_method_with_hyperparameters_and_paper(capsys):
    assert main(["methods", "-v"]) == 0
    text = capsys.readouterr().out
    assert text.strip() == format_methods(verbose=True).strip()
    for spec in METHODS.values():
        assert f"\n{spec.name} " in text and spec.paper in text
        for name, hp in spec.hyperparameters.items():
            default = "unset" if hp.default is None else hp.default
            assert f"  {name} ({hp.describe()}, default {default}): " in text
    assert "smoothing (float in (0, 0.5), default 0.001)" in text  # exo_pair
    assert "discopop_tau" in text and "arXiv:2404.04656" in text
    assert "a running mean of the rewards" in text  # bco_pair's needs


def test_discopop_first_gradient_points_the_wrong_way_for_small_tau():
    # At policy == reference (z = beta*h = 0): dL/dz = (1 - ln 2) / (4 tau) - 3/4, positive for
    # tau < (1 - ln 2)/3 = 0.102284, so gradient descent first LOWERS the margin (the arena's
    # discopop run, tau = 0.05: reward accuracy 0). tau = 0.05: 0.784264.
    for tau, slope in ((0.05, 0.784264), (0.2, -0.366434)):
        chosen = torch.zeros(1, dtype=torch.float64, requires_grad=True)
        zero = torch.zeros(1, dtype=torch.float64)
        discopop_loss(chosen, zero, zero, zero, beta=1.0, tau=tau).losses.sum().backward()
        assert chosen.grad.item() == pytest.approx(slope, abs=1e-6)
        assert slope == pytest.approx((1 - math.log(2)) / (4 * tau) - 0.75, abs=1e-6)
