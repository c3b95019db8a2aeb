"""The method table: names, adapters, hyperparameter resolution and the `dpokit methods` listing."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import dpokit.losses.spin as spin_module
from dpokit.losses import (
    METHODS,
    Hyperparameter,
    LossInputs,
    MethodSpec,
    dpo_loss,
    dpop_loss,
    format_methods,
    get_method,
    ipo_loss,
    kto_loss,
    odpo_loss,
    odpo_offsets,
    rdpo_loss,
    resolve_hyperparameters,
    simpo_loss,
    slic_loss,
    spin_loss,
    tdpo_loss,
)
from dpokit.losses.options import F_DIVERGENCE_OPTIONS, PAIRWISE_OPTIONS

OPTION_KEYS = set(PAIRWISE_OPTIONS) | set(F_DIVERGENCE_OPTIONS)

NAMES = [
    "dpo",
    "dpop",
    "slic",
    "tdpo1",
    "tdpo2",
    "kto",
    "ipo",
    "spin",
    "segment_dpo",
    "stepwise_dpo",
    "simpo",
    "odpo",
    "rdpo",
]
# The rows of dpokit.losses.catalogue and combined (tested in test_losses_catalogue_table.py).
CATALOGUE_NAMES = [
    "cdpo",
    "hinge",
    "exo_pair",
    "nca_pair",
    "sppo_hard",
    "apo_zero",
    "apo_down",
    "discopop",
    "bco_pair",
    "aot",
    "aot_unpaired",
    "sigmoid_norm",
    "orpo",
    "cpo",
    "cpo_simpo",
    "combined",
]


def t(*values: float) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64)


# Example E (second row: the reverse pair), plus every optional input any method reads.
PC, PR, RC, RR = t(-10.0, -12.0), t(-12.0, -10.0), t(-11.0, -11.0), t(-11.0, -11.0)
LENGTHS_C, LENGTHS_R = t(20.0, 5.0), t(15.0, 4.0)
KL_C, KL_R = t(0.3, 0.5), t(0.5, 0.3)
SCORE_C, SCORE_R = t(0.9, 0.8), t(0.4, 0.1)
TARGET = t(-20.0, -30.0)
DESIRABLE = torch.tensor([True, False])


def full_inputs(**overrides) -> LossInputs:
    values = dict(
        policy_chosen_logps=PC,
        policy_rejected_logps=PR,
        chosen_lengths=LENGTHS_C,
        rejected_lengths=LENGTHS_R,
        reference_chosen_logps=RC,
        reference_rejected_logps=RR,
        chosen_seq_kl=KL_C,
        rejected_seq_kl=KL_R,
        score_chosen=SCORE_C,
        score_rejected=SCORE_R,
        policy_target_logps=TARGET,
        policy_logps=PC,
        reference_logps=RC,
        desirable=DESIRABLE,
        kl_baseline=0.4,
    )
    values.update(overrides)
    return LossInputs(**values)


# What each method's compute must equal, written as a direct call with the defaults.
DIRECT = {
    "dpo": lambda: dpo_loss(PC, PR, RC, RR, beta=0.1),
    "dpop": lambda: dpop_loss(PC, PR, RC, RR, beta=0.1, lam=50.0),
    "slic": lambda: slic_loss(PC, PR, PC, delta=1.0, lam=0.1),  # target="chosen": y_ref = y_w
    "tdpo1": lambda: tdpo_loss(PC, PR, RC, RR, KL_C, KL_R, beta=0.1, variant="tdpo1"),
    "tdpo2": lambda: tdpo_loss(PC, PR, RC, RR, KL_C, KL_R, beta=0.1, alpha=0.5),
    "kto": lambda: kto_loss(PC, RC, DESIRABLE, 0.4, beta=0.1),
    "ipo": lambda: ipo_loss(PC / LENGTHS_C, PR / LENGTHS_R, RC / LENGTHS_C, RR / LENGTHS_R),
    "spin": lambda: spin_loss(PC, PR, RC, RR, lam=0.1),
    "segment_dpo": lambda: dpo_loss(PC, PR, RC, RR, beta=0.1),
    "stepwise_dpo": lambda: dpo_loss(PC, PR, RC, RR, beta=0.1),
    "simpo": lambda: simpo_loss(PC / LENGTHS_C, PR / LENGTHS_R, beta=2.0, gamma=1.0),
    "odpo": lambda: odpo_loss(PC, PR, RC, RR, odpo_offsets(SCORE_C, SCORE_R), beta=0.1),
    "rdpo": lambda: rdpo_loss(PC, PR, RC, RR, beta=0.1, eps=0.1),
}


def test_every_method_is_in_the_table():
    assert list(METHODS) == NAMES + CATALOGUE_NAMES
    for name, spec in METHODS.items():
        assert isinstance(spec, MethodSpec) and spec.name == name
        assert get_method(name) is spec
        assert spec.title and spec.paper and spec.formula


@pytest.mark.parametrize("name", NAMES)
def test_compute_equals_direct_call(name):
    spec = METHODS[name]
    out = spec.compute(full_inputs(), resolve_hyperparameters(spec, {}))
    expected = DIRECT[name]()
    assert torch.allclose(out.losses, expected.losses, atol=1e-12)
    for field in ("chosen_rewards", "rejected_rewards", "rewards"):
        got, want = getattr(out, field), getattr(expected, field)
        assert (got is None) == (want is None)
        if got is not None:
            assert torch.allclose(got, want)


def test_compute_on_example_e_values():
    e = LossInputs(
        policy_chosen_logps=t(-10.0),
        policy_rejected_logps=t(-12.0),
        reference_chosen_logps=t(-11.0),
        reference_rejected_logps=t(-11.0),
        chosen_lengths=t(5.0),
        rejected_lengths=t(4.0),
    )
    # DPO E: 0.598139; IPO averaged with |y_w|=5, |y_l|=4: 20.7025; summed: 9.0
    assert get_method("dpo").compute(e, {}).losses.item() == pytest.approx(0.598139, abs=1e-6)
    ipo = get_method("ipo")
    assert ipo.compute(e, {}).losses.item() == pytest.approx(20.7025, abs=1e-6)
    assert ipo.compute(e, {"average": "false"}).losses.item() == pytest.approx(9.0, abs=1e-6)
    # rDPO with eps given as a CLI string
    rdpo = get_method("rdpo").compute(e, {"eps": "0.1"})
    assert rdpo.losses.item() == pytest.approx(0.573139, abs=1e-6)


def test_compute_fills_defaults_and_checks_values():
    spec = get_method("dpo")
    partial = spec.compute(full_inputs(), {"beta": "0.2"})
    assert torch.allclose(partial.losses, dpo_loss(PC, PR, RC, RR, beta=0.2).losses)
    with pytest.raises(ValueError, match="beta must be > 0"):
        spec.compute(full_inputs(), {"beta": 0})
    with pytest.raises(ValueError, match="unknown hyperparameter"):
        spec.compute(full_inputs(), {"lam": 1.0})


def test_slic_reference_sample_target_uses_policy_target_logps():
    spec = get_method("slic")
    out = spec.compute(full_inputs(), {"target": "reference_sample"})
    assert torch.allclose(out.losses, slic_loss(PC, PR, TARGET).losses)
    with pytest.raises(ValueError, match="policy_target_logps"):
        spec.compute(full_inputs(policy_target_logps=None), {"target": "reference_sample"})


def test_kto_zero_baseline_option():
    out = get_method("kto").compute(full_inputs(kl_baseline=None), {"kl_baseline": "zero"})
    assert torch.allclose(out.losses, kto_loss(PC, RC, DESIRABLE, 0.0).losses)


def test_odpo_ratio_form_through_the_table():
    out = get_method("odpo").compute(full_inputs(), {"form": "ratio", "alpha": 0.5})
    offsets = odpo_offsets(SCORE_C, SCORE_R, alpha=0.5, form="ratio")
    assert torch.allclose(out.losses, odpo_loss(PC, PR, RC, RR, offsets).losses)


MISSING = {
    "dpo": ({"reference_chosen_logps": None}, "reference_chosen_logps"),
    "tdpo2": ({"chosen_seq_kl": None, "rejected_seq_kl": None}, "chosen_seq_kl, rejected_seq_kl"),
    "odpo": ({"score_rejected": None}, "score_rejected"),
    "simpo": ({"chosen_lengths": None}, "chosen_lengths"),
    "ipo": ({"rejected_lengths": None}, "rejected_lengths"),
    "kto": ({"kl_baseline": None}, "kl_baseline"),
    "spin": ({"policy_rejected_logps": None}, "policy_rejected_logps"),
}


@pytest.mark.parametrize("name", sorted(MISSING))
def test_missing_input_is_named(name):
    overrides, missing = MISSING[name]
    with pytest.raises(ValueError, match=f"method {name} needs {missing}"):
        get_method(name).compute(full_inputs(**overrides), {})


def test_zero_lengths_are_refused():
    with pytest.raises(ValueError, match="lengths"):
        get_method("simpo").compute(full_inputs(chosen_lengths=t(0.0, 3.0)), {})


def test_spin_reuses_dpo_loss(monkeypatch):
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return dpo_loss(*args, **kwargs)

    monkeypatch.setattr(spin_module, "dpo_loss", spy)
    spin_module.spin_loss(PC, PR, RC, RR, lam=0.3)
    assert calls == [{"beta": 0.3}]


def test_dpo_variants_share_the_dpo_loss():
    for name in ("segment_dpo", "stepwise_dpo"):
        assert METHODS[name].loss is dpo_loss
    assert METHODS["spin"].loss is spin_loss


# ---- get_method ------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["sdpo", "SDPO", "sDPO", "s-dpo"])
def test_sdpo_is_ambiguous(name):
    with pytest.raises(ValueError, match="segment_dpo") as info:
        get_method(name)
    assert "stepwise_dpo" in str(info.value)


def test_get_method_normalises_names():
    assert get_method("Segment-DPO").name == "segment_dpo"
    assert get_method(" TDPO2 ").name == "tdpo2"
    assert get_method("slic-hf").name == "slic"


def test_get_method_unknown_lists_valid_names():
    with pytest.raises(ValueError, match="unknown method 'dpoo'") as info:
        get_method("dpoo")
    message = str(info.value)
    assert "Did you mean" in message
    assert all(name in message for name in NAMES)
    with pytest.raises(ValueError, match="tdpo2"):
        get_method("tdpo")


# ---- resolve_hyperparameters -----------------------------------------------------------------

DEFAULTS = {
    "dpo": {"beta": 0.1},
    "dpop": {"beta": 0.1, "lam": 50.0},
    "rdpo": {"beta": 0.1, "eps": 0.1},
    "ipo": {"tau": 0.1, "average": True},
    "odpo": {"beta": 0.1, "alpha": 1.0, "form": "difference", "kl_coef": 0.0},
    "tdpo1": {"beta": 0.1},
    "tdpo2": {"beta": 0.1, "alpha": 0.5},
    "simpo": {"beta": 2.0, "gamma": 1.0},
    "slic": {
        "delta": 1.0,
        "lam": 0.1,
        "target": "chosen",
        "temperature": 1.0,
        "max_new_tokens": 256,
        "generation_batch_size": 16,
    },
    "kto": {
        "beta": 0.1,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.0,
        "kl_baseline": "batch",
    },
    "spin": {
        "lam": 0.1,
        "iterations": 3,
        "keep_previous": False,
        "temperature": 1.0,
        "top_p": 1.0,
        "max_new_tokens": 256,
        "generation_batch_size": 16,
    },
    "segment_dpo": {"beta": 0.1},
    "stepwise_dpo": {"beta": 0.1, "chunks": 2, "order": "data"},
}


def own(resolved: dict) -> dict:
    """A method's own hyperparameters, without the options of dpokit.losses.options."""
    return {k: v for k, v in resolved.items() if k not in OPTION_KEYS}


@pytest.mark.parametrize("name", NAMES)
def test_defaults_match_methods_md(name):
    assert own(resolve_hyperparameters(get_method(name), {})) == DEFAULTS[name]
    assert own(resolve_hyperparameters(get_method(name), None)) == DEFAULTS[name]


def test_resolve_converts_strings():
    assert own(resolve_hyperparameters(get_method("dpo"), {"beta": "0.2"})) == {"beta": 0.2}
    ipo = own(resolve_hyperparameters(get_method("ipo"), {"tau": "1e-2", "average": "False"}))
    assert ipo == {"tau": 0.01, "average": False}
    assert resolve_hyperparameters(get_method("ipo"), {"average": "yes"})["average"] is True
    assert resolve_hyperparameters(get_method("stepwise_dpo"), {"chunks": "3"})["chunks"] == 3
    assert resolve_hyperparameters(get_method("stepwise_dpo"), {"chunks": 4.0})["chunks"] == 4
    odpo = resolve_hyperparameters(get_method("odpo"), {"form": "Ratio", "kl-coef": 1})
    assert odpo["form"] == "ratio" and odpo["kl_coef"] == 1.0
    assert isinstance(odpo["kl_coef"], float)


def test_resolve_rejects_unknown_keys_listing_valid_ones():
    with pytest.raises(ValueError, match=r"'betta'.*did you mean 'beta'.*valid: beta, lam"):
        resolve_hyperparameters(get_method("dpop"), {"betta": 0.2})
    # TDPO1 has no alpha (only TDPO2 weights its KL margin).
    with pytest.raises(ValueError, match=r"'alpha'.*method tdpo1.*valid: beta"):
        resolve_hyperparameters(get_method("tdpo1"), {"alpha": 0.5})


BAD_VALUES = [
    ("rdpo", "eps", "0.5", r"eps must be in \[0, 0\.5\)"),
    ("rdpo", "eps", -0.1, r"eps must be in \[0, 0\.5\)"),
    ("dpo", "beta", "abc", r"beta must be float > 0"),
    ("dpo", "beta", 0, r"beta must be > 0"),
    ("dpo", "beta", True, r"beta must be float"),
    ("dpo", "beta", "inf", r"beta must be a finite"),
    ("dpo", "beta", None, r"beta must be"),
    ("ipo", "tau", "0", r"tau must be > 0"),
    ("ipo", "average", "maybe", r"average must be bool"),
    ("stepwise_dpo", "chunks", "2.5", r"chunks must be int >= 1"),
    ("stepwise_dpo", "chunks", 0, r"chunks must be >= 1"),
    ("odpo", "form", "sum", r"form must be one of 'difference', 'ratio'"),
    ("odpo", "kl_coef", -1, r"kl_coef must be >= 0"),
    ("slic", "target", "rejected", r"target must be one of"),
    ("kto", "kl_baseline", "mean", r"kl_baseline must be one of 'batch', 'zero'"),
    ("kto", "desirable_weight", 0.0, r"desirable_weight must be > 0"),
    ("spin", "lam", "-1", r"lam must be > 0"),
    ("simpo", "gamma", -0.5, r"gamma must be >= 0"),
    ("dpop", "lam", "-5", r"lam must be >= 0"),
]


@pytest.mark.parametrize(("name", "key", "value", "pattern"), BAD_VALUES)
def test_resolve_rejects_bad_values(name, key, value, pattern):
    with pytest.raises(ValueError, match=pattern):
        resolve_hyperparameters(get_method(name), {key: value})


# ---- spec fields -----------------------------------------------------------------------------


def test_spec_fields():
    assert METHODS["simpo"].averaged_logps and METHODS["simpo"].reference == "none"
    assert METHODS["slic"].reference == "none"
    assert not METHODS["ipo"].averaged_logps  # IPO's averaging is its `average` hyperparameter
    for name in ("tdpo1", "tdpo2"):
        assert METHODS[name].reference == "online" and METHODS[name].token_kl
    assert METHODS["odpo"].scores
    assert [name for name, spec in METHODS.items() if spec.scores] == ["odpo"]
    assert METHODS["kto"].data == "unpaired" and METHODS["kto"].step == "kto"
    assert METHODS["spin"].data == "sft" and METHODS["spin"].recipe == "spin"
    assert METHODS["spin"].step == "pairwise" and METHODS["spin"].stage_count == "iterations"
    assert METHODS["segment_dpo"].data == "multiturn_pairs"
    assert METHODS["segment_dpo"].step == "segment"
    assert METHODS["stepwise_dpo"].data == "pairs"
    assert METHODS["stepwise_dpo"].recipe == "stepwise"
    assert METHODS["stepwise_dpo"].stage_count == "chunks"
    assert METHODS["slic"].step == "slic"
    assert METHODS["dpo"].recipe is None and METHODS["dpo"].step == "pairwise"
    assert METHODS["dpo"].stage_count is None
    # A method variant is bound in the table: no loss receives a method name.
    assert METHODS["tdpo1"].loss.func is tdpo_loss
    assert METHODS["tdpo1"].loss.keywords == {"variant": "tdpo1"}
    assert METHODS["tdpo2"].loss.keywords == {"variant": "tdpo2"}
    for spec in METHODS.values():
        assert spec.reference in ("none", "logps", "online")
        assert all(isinstance(hp, Hyperparameter) for hp in spec.hyperparameters.values())


def test_table_is_immutable():
    with pytest.raises(TypeError):
        METHODS["new"] = METHODS["dpo"]  # type: ignore[index]
    with pytest.raises(TypeError):
        METHODS["dpo"].hyperparameters["beta"] = None  # type: ignore[index]
    with pytest.raises(dataclasses.FrozenInstanceError):
        METHODS["dpo"].name = "x"  # type: ignore[misc]


# ---- format_methods --------------------------------------------------------------------------


def test_format_methods_mentions_every_method():
    text = format_methods()
    for spec in METHODS.values():
        assert spec.name in text and spec.formula in text and spec.title in text
    assert "beta=0.1, lam=50.0" in text  # DPOP defaults
    assert "full-vocabulary" in text  # TDPO needs


def test_format_methods_verbose_adds_papers_and_ranges():
    text = format_methods(verbose=True)
    for spec in METHODS.values():
        assert spec.paper in text
    assert "eps (float in [0, 0.5)" in text
    assert len(text) > len(format_methods())
