"""TRL 1.16's loss fields, per loss type, single and in a list (dpokit.trl_losses).

The truth here is written from reading trl 1.16's ``DPOTrainer`` (``__init__``'s checks and
``_compute_loss``), ``DPOConfig``, ``KTOConfig`` and ``CPOConfig``, not from dpokit's table: which
loss types read each field, under which dpokit key, TRL's defaults and what TRL refuses. Every TRL
loss type x every field is checked alone and as a component of a list; a few configs are then
checked on given log-probs against TRL's loss, rewritten inline from its code.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml

from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.losses import LossInputs, get_method
from dpokit.trl_losses import LOSS_FIELDS

# TRL loss type -> dpokit method (sft alone is method combined with losses=sft).
METHOD = {
    "sigmoid": "dpo", "hinge": "hinge", "ipo": "ipo", "exo_pair": "exo_pair",
    "nca_pair": "nca_pair", "robust": "rdpo", "bco_pair": "bco_pair", "sppo_hard": "sppo_hard",
    "aot": "aot", "aot_unpaired": "aot_unpaired", "apo_zero": "apo_zero",
    "apo_down": "apo_down", "discopop": "discopop", "sft": "sft", "sigmoid_norm": "sigmoid_norm",
    "kto": "kto", "simpo": "cpo_simpo",
}  # fmt: skip
DPO_TYPES = [t for t in METHOD if t not in ("kto", "simpo")]
CPO_TYPES = ("sigmoid", "hinge", "ipo")  # CPOConfig's loss types that DPOConfig also has
F_TYPES = {"sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop"}


def _reads() -> dict[str, dict[str, str]]:
    """TRL field -> {loss type that reads it: dpokit key}, from TRL 1.16's _compute_loss."""
    beta = {t: "beta" for t in METHOD if t not in ("sft", "ipo")}
    return {
        "beta": {**beta, "ipo": "tau"},  # IPO's tau is TRL's beta (Eq. 17 comment)
        "label_smoothing": {
            "robust": "eps",
            "exo_pair": "smoothing",
            "aot": "smoothing",
            "aot_unpaired": "smoothing",
            "simpo": "label_smoothing",  # CPOConfig
        },
        "discopop_tau": {"discopop": "tau"},
        "f_divergence_type": dict.fromkeys(F_TYPES, "f_divergence_type"),
        "f_alpha_divergence_coef": dict.fromkeys(F_TYPES, "f_alpha_divergence_coef"),
        # every DPO loss type is weighted, sft included (TRL multiplies each per_sequence_loss)
        "use_weighting": {t: "use_weighting" for t in DPO_TYPES if not t.startswith("aot")},
        "ld_alpha": {t: "ld_alpha" for t in DPO_TYPES if t != "sft"},  # sft: plain log-probs
        "cpo_alpha": {"simpo": "alpha"},
        "simpo_gamma": {"simpo": "gamma"},
    }


READS = _reads()
# A value other than TRL's default for each field, and TRL's default.
VALUE = {
    "beta": 0.25, "label_smoothing": 0.2, "discopop_tau": 0.3, "f_divergence_type": "js_divergence",
    "f_alpha_divergence_coef": 0.3, "use_weighting": True, "ld_alpha": 0.5, "cpo_alpha": 0.7,
    "simpo_gamma": 0.4,
}  # fmt: skip
TRL_DEFAULT = {
    "beta": 0.1, "label_smoothing": 0.0, "discopop_tau": 0.05, "f_divergence_type": "reverse_kl",
    "f_alpha_divergence_coef": 0.5, "use_weighting": False, "ld_alpha": 1.0, "cpo_alpha": 1.0,
    "simpo_gamma": 0.5,
}  # fmt: skip
# What TRL 1.16 refuses: (field, loss type) -> the words of dpokit's message.
REFUSED = {
    **{("f_divergence_type", t): "allows an f-divergence only" for t in DPO_TYPES},
    ("use_weighting", "aot"): "refuses WPO weighting with aot",
    ("use_weighting", "aot_unpaired"): "refuses WPO weighting with aot",
}
for _t in [*F_TYPES, "sft"]:
    del REFUSED[("f_divergence_type", _t)]


def base(types: list[str]) -> dict:
    """The smallest config TRL accepts for ``types`` (exo_pair needs label_smoothing > 0)."""
    loss_type = types[0] if len(types) == 1 else types
    return {"loss_type": loss_type, **({"label_smoothing": 1e-3} if "exo_pair" in types else {})}


def cases():
    for field in VALUE:
        for loss_type in METHOD:
            yield field, loss_type


@pytest.mark.parametrize(("field", "loss_type"), list(cases()))
@pytest.mark.parametrize("form", ["single", "list"])
def test_each_field_reaches_each_loss_type(field, loss_type, form, caplog):
    if form == "list" and loss_type in ("kto", "simpo"):
        pytest.skip("KTOConfig's and CPOConfig's loss_type is one name")
    types = (
        [loss_type] if form == "single" else [loss_type, "sft" if loss_type != "sft" else "sigmoid"]
    )
    values = {**base(types), field: VALUE[field]}
    if form == "single" and field in ("cpo_alpha", "simpo_gamma") and loss_type in CPO_TYPES:
        # a CPOConfig field makes sigmoid CPO's loss; CPO's hinge and ipo are refused
        if loss_type != "sigmoid":
            with pytest.raises(ConfigError, match=f"CPOConfig's {loss_type} loss"):
                TrainConfig.from_dict(values)
            return
        assert TrainConfig.from_dict(values).method == "cpo"
        return
    refused = [REFUSED[(field, t)] for t in types if (field, t) in REFUSED]
    if refused:
        with pytest.raises(ConfigError, match=refused[0]):
            TrainConfig.from_dict(values)
        return
    with caplog.at_level(logging.WARNING):
        config = TrainConfig.from_dict(values)
    single = form == "single" and loss_type != "sft"
    assert config.method == (METHOD[loss_type] if single else "combined")
    if not single:
        assert config.method_args["losses"] == ",".join(METHOD[t] for t in types)
    readers = [t for t in types if t in READS[field]]
    for t in readers:
        assert config.method_args[READS[field][t]] == VALUE[field], (t, READS[field][t])
    if not readers:
        assert f"{field}={VALUE[field]} ignored: TRL 1.16 ignores it" in caplog.text
    # the field changes nothing else: the same config without it differs by the readers' keys
    without = TrainConfig.from_dict(base(types)).method_args
    changed = {k for k in without if without[k] != config.method_args[k]}
    assert changed == {READS[field][t] for t in readers}


@pytest.mark.parametrize("loss_type", list(METHOD))
def test_a_field_left_out_has_trl_s_default(loss_type):
    config = TrainConfig.from_dict(base([loss_type]))
    for field, readers in READS.items():
        if loss_type in readers and not (field == "label_smoothing" and loss_type == "exo_pair"):
            assert config.method_args[readers[loss_type]] == TRL_DEFAULT[field], field


def test_trl_defaults_that_differ_from_dpokit_s():
    # robust: TRL's label_smoothing 0.0 (plain DPO), not dpokit's eps 0.1; in a list too
    assert TrainConfig.from_dict({"loss_type": "robust"}).method_args["eps"] == 0.0
    assert TrainConfig.from_dict({"loss_type": ["robust", "sft"]}).method_args["eps"] == 0.0
    assert TrainConfig.from_dict({"method": "rdpo"}).method_args["eps"] == 0.1  # dpokit's own
    # bco_pair: no running baseline in TRL 1.x, alone and in a list (MPO)
    assert TrainConfig.from_dict({"loss_type": "bco_pair"}).method_args["baseline"] == "zero"
    mpo = TrainConfig.from_dict({"loss_type": ["sigmoid", "bco_pair", "sft"]})
    assert mpo.method_args["baseline"] == "zero"
    # exo_pair at TRL's default label_smoothing 0.0: TRL raises, so does dpokit
    with pytest.raises(ConfigError, match="requires label_smoothing > 0 with exo_pair"):
        TrainConfig.from_dict({"loss_type": ["exo_pair", "sft"]})
    # a dpokit key given beside the TRL loss_type wins over TRL's default, and clashes are named
    assert TrainConfig.from_dict({"loss_type": "robust", "eps": 0.2}).method_args["eps"] == 0.2
    with pytest.raises(ConfigError, match="label_smoothing=0.1 is eps for loss_type robust"):
        TrainConfig.from_dict({"loss_type": "robust", "label_smoothing": 0.1, "eps": 0.2})


def test_one_dpokit_key_two_trl_fields_in_a_list():
    # IPO's tau (beta) and DiscoPOP's tau (discopop_tau): one name in dpokit, set per component
    config = TrainConfig.from_dict({"loss_type": ["ipo", "discopop"], "beta": 0.25})
    assert config.method_args["component_args"] == "ipo.tau=0.25,discopop.tau=0.05"
    assert config.method_args["tau"] is None and config.method_args["beta"] == 0.25
    same = TrainConfig.from_dict(
        {"loss_type": ["ipo", "discopop"], "beta": 0.2, "discopop_tau": 0.2}
    )
    assert (same.method_args["tau"], same.method_args["component_args"]) == (0.2, "")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ("ipo.tau", r"'ipo.tau' is not component.key=value"),
        ("dpo.tau=0.1", r"'dpo' is not a component"),
        ("ipo.beta=0.1", r"ipo has no 'beta'; valid: tau, average"),
        ("ipo.ld_alpha=0.5", r"ld_alpha is one for the whole objective"),
        ("ipo.tau=-1", r"tau must be"),
    ],
)
def test_component_args_are_checked(args, message):
    hp = {"losses": "ipo,discopop", "component_args": args}
    with pytest.raises(ValueError, match=message):
        get_method("combined").bind(hp)


# ---- the loss on given log-probs, against TRL 1.16's formula rewritten inline ------------------

PC = torch.tensor([-12.0, -7.5, -20.0], dtype=torch.float64)
PR = torch.tensor([-14.0, -6.0, -21.0], dtype=torch.float64)
RC = torch.tensor([-12.5, -7.0, -19.0], dtype=torch.float64)
RR = torch.tensor([-13.0, -6.5, -22.5], dtype=torch.float64)
LC = torch.tensor([4, 6, 3])  # unequal: TRL's sft is a token mean over the batch
LR = torch.tensor([5, 3, 6])
SC = torch.tensor([-4.0, -3.0, -5.0], dtype=torch.float64)  # sum of log sum_v p_v^2
SR = torch.tensor([-5.0, -2.0, -6.5], dtype=torch.float64)


def inputs() -> LossInputs:
    return LossInputs(
        policy_chosen_logps=PC, policy_rejected_logps=PR, reference_chosen_logps=RC,
        reference_rejected_logps=RR, chosen_lengths=LC, rejected_lengths=LR,
        chosen_log_sum_sq=SC, rejected_log_sum_sq=SR, reward_baseline=0.0,
    )  # fmt: skip


def trl_loss(types, weights=None, *, beta=0.1, label_smoothing=0.0, discopop_tau=0.05,
             f_divergence_type="reverse_kl", use_weighting=False):  # fmt: skip
    """TRL 1.16 DPOTrainer._compute_loss from sequence log-probs (B pairs)."""
    chosen_logratios, rejected_logratios = PC - RC, PR - RR
    if f_divergence_type == "js_divergence":
        chosen_scores = math.log(2) + F.logsigmoid(chosen_logratios)
        rejected_scores = math.log(2) + F.logsigmoid(rejected_logratios)
    else:
        chosen_scores, rejected_scores = chosen_logratios, rejected_logratios
    delta_score = chosen_scores - rejected_scores
    loss = 0.0
    for loss_type, weight in zip(types, weights or [1.0] * len(types), strict=True):
        if loss_type == "sigmoid":
            per = -F.logsigmoid(beta * delta_score)
        elif loss_type == "hinge":
            per = torch.relu(1 - beta * delta_score)
        elif loss_type == "ipo":
            per = (chosen_scores / LC - rejected_scores / LR - 1 / (2 * beta)) ** 2
        elif loss_type == "robust":
            clean = -(1 - label_smoothing) * F.logsigmoid(beta * delta_score)
            flipped = -label_smoothing * F.logsigmoid(-beta * delta_score)
            per = (clean - flipped) / (1 - 2 * label_smoothing)
        elif loss_type == "bco_pair":
            per = -F.logsigmoid(beta * chosen_logratios) - F.logsigmoid(-beta * rejected_logratios)
        elif loss_type == "aot":
            delta = torch.sort(PC - PR)[0] - torch.sort(RC - RR)[0]
            per = (
                -F.logsigmoid(beta * delta) * (1 - label_smoothing)
                - F.logsigmoid(-beta * delta) * label_smoothing
            )
        elif loss_type == "discopop":
            logits = delta_score * beta
            m = torch.sigmoid(logits / discopop_tau)
            per = -F.logsigmoid(logits) * (1 - m) + torch.exp(-logits) * m
        elif loss_type == "sft":
            per = (-PC.sum() / LC.sum()).expand(3)
        if use_weighting:
            weights_ = torch.exp((PC - SC) / LC) * torch.exp((PR - SR) / LR)
            per = per * weights_
        loss = loss + per.mean() * weight
    return loss.item()


@pytest.mark.parametrize(
    ("values", "trl"),
    [
        ({"loss_type": ["ipo", "sigmoid"], "beta": 0.25}, {"beta": 0.25}),  # F1
        ({"loss_type": ["robust", "sft"], "label_smoothing": 0.2}, {"label_smoothing": 0.2}),
        ({"loss_type": "robust"}, {}),  # F5: TRL's label_smoothing 0.0 = plain DPO
        ({"loss_type": ["aot", "robust"], "label_smoothing": 0.2}, {"label_smoothing": 0.2}),
        ({"loss_type": ["discopop", "sft"], "discopop_tau": 0.3}, {"discopop_tau": 0.3}),  # F3
        ({"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}, {}),
        ({"loss_type": ["hinge", "ipo"], "f_divergence_type": "js_divergence"},
         {"f_divergence_type": "js_divergence"}),  # F7
        ({"loss_type": ["sigmoid", "sft"], "use_weighting": True}, {"use_weighting": True}),
        ({"loss_type": ["ipo", "discopop"], "beta": 0.25}, {"beta": 0.25}),
    ],
)  # fmt: skip
def test_first_loss_equals_trl_s_formula(values, trl):
    config = TrainConfig.from_dict(values)
    spec = get_method(config.method).bind(config.method_args)
    got = spec.compute(inputs(), config.method_args).losses.mean().item()
    types = values["loss_type"] if isinstance(values["loss_type"], list) else [values["loss_type"]]
    want = trl_loss(types, values.get("loss_weights"), **trl)
    assert got == pytest.approx(want, abs=1e-9)


# ---- refusals in dpokit's own names, and the unknown-key message ------------------------------


def test_wpo_is_refused_with_aot_in_dpokit_names_too():
    with pytest.raises(
        ConfigError, match="'use_weighting' is a hyperparameter of .*not of method aot"
    ):
        TrainConfig.from_dict({"method": "aot", "use_weighting": True})
    with pytest.raises(ConfigError, match="use_weighting=True applies to every component, and aot"):
        TrainConfig.from_dict({"method": "combined", "losses": "dpo,aot", "use_weighting": True})
    with pytest.raises(ConfigError, match="f_divergence_type='js_divergence' applies to every"):
        TrainConfig.from_dict(
            {"method": "combined", "losses": "hinge,nca_pair", "f_divergence_type": "js_divergence"}
        )


def test_a_key_of_another_method_is_told_apart_from_an_unknown_one():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict({"method": "nca_pair", "f_divergence_type": "js", "zzz": 1})
    message = str(info.value)
    assert "'f_divergence_type' is a hyperparameter of method(s) dpo, " in message
    assert "not of method nca_pair (f-DPO replaces the log-ratios" in message
    assert "unknown config key 'zzz'" in message
    assert "unknown config key 'f_divergence_type'" not in message


def test_docs_field_table_matches_the_table():
    page = (Path(__file__).resolve().parents[1] / "docs" / "trl.md").read_text()
    section = page[page.index("### The fields the losses read") :]
    for spec in LOSS_FIELDS:
        row = next(line for line in section.splitlines() if line.startswith(f"| `{spec.trl}` "))
        for key in set(spec.keys.values()):
            assert f"`{key}`" in row, (spec.trl, key)
        for loss_type in spec.refuses:
            assert loss_type in row.split("|")[4], (spec.trl, loss_type)


# ---- CPOConfig's loss types and fields ----------------------------------------------------------


def test_cpo_config_is_read_as_cpo_and_its_alphapo_alpha_is_refused():
    # CPOConfig's sigmoid (a CPO field present): CPO, label_smoothing and cpo_alpha its own
    config = TrainConfig.from_dict(
        {"loss_type": "sigmoid", "cpo_alpha": 0.5, "label_smoothing": 0.1}
    )
    assert (config.method, config.method_args) == (
        "cpo",
        {"beta": 0.1, "alpha": 0.5, "label_smoothing": 0.1, "nll_average": "tokens"},
    )
    # CPOConfig's alpha is AlphaPO's reward shape, never dpokit's alpha (the NLL weight)
    with pytest.raises(ConfigError, match="alpha is AlphaPO's reward shape"):
        TrainConfig.from_dict({"loss_type": "simpo", "alpha": 0.2})
    simpo = TrainConfig.from_dict({"loss_type": "simpo", "alpha": 0.0})  # TRL's default
    assert simpo.method_args["alpha"] == 1.0  # cpo_alpha's TRL default
    for loss_type in ("hinge", "ipo"):  # CPOConfig's reference-free hinge/IPO: not in dpokit
        with pytest.raises(ConfigError, match=f"CPOConfig's {loss_type} loss"):
            TrainConfig.from_dict({"loss_type": loss_type, "cpo_alpha": 0.5})


def test_method_cpo_does_not_silently_drop_a_cpo_ipo_loss_type(tmp_path):
    path = tmp_path / "cpo.yaml"
    path.write_text("loss_type: ipo\nbeta: 0.1\n")
    with pytest.raises(ConfigError, match="method=cpo replaces loss_type=ipo"):
        TrainConfig.load(path, ["method=cpo"])
    path.write_text("loss_type: sigmoid\nbeta: 0.1\n")
    assert TrainConfig.load(path, ["method=cpo"]).method == "cpo"  # the documented way


# ---- one setting, two spellings, one source -----------------------------------------------------


def test_two_spellings_in_one_source_are_refused_and_read_together(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 4\nper_device_train_batch_size: 2\n")
    with pytest.raises(ConfigError, match="batch_size=4 and per_device_train_batch_size=2 both"):
        TrainConfig.load(path)
    with pytest.raises(ConfigError, match="both set batch_size"):
        TrainConfig.load(None, ["batch_size=4", "per_device_train_batch_size=2"])
    assert TrainConfig.load(path, ["batch_size=3"]).batch_size == 3  # a later source wins
    path.write_text("max_steps: 1\nbeta: 0.1\nmax_steps: 2\n")  # PyYAML would keep the last
    with pytest.raises(ConfigError, match="line 3, column 1: invalid YAML: key 'max_steps' is giv"):
        TrainConfig.load(path)
    path.write_text("bf16: true\nfp16: false\n")  # read together: bf16
    assert TrainConfig.load(path).mixed_precision == "bf16"
    assert TrainConfig.load(path, ["fp16=true"]).mixed_precision == "fp16"


# ---- TrainingArguments keys of TRL recipes ------------------------------------------------------


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"ld_alpha": None}, {"method_args.ld_alpha": 1.0}),  # DPOConfig's default: off
        ({"train_sampling_strategy": "sequential"}, {"shuffle": False}),  # KTOConfig's default
        ({"train_sampling_strategy": "random"}, {"shuffle": True}),
        ({"disable_tqdm": True}, {"progress": False}),
        ({"adam_epsilon": 1e-8, "hub_strategy": "every_save", "tf32": None}, {"method": "dpo"}),
        ({"lr_scheduler_kwargs": {}, "save_only_model": False, "data_seed": None}, {}),
    ],
)
def test_recipe_keys_at_trl_s_defaults_are_accepted(values, expected):
    config = TrainConfig.from_dict(values)
    for key, want in expected.items():
        got = config.method_args[key.split(".")[1]] if "." in key else getattr(config, key)
        assert got == want, key


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"tf32": True}, r"TRL's tf32=True has no dpokit equivalent: dpokit leaves TF32"),
        ({"save_only_model": True}, r"checkpoints hold the optimizer state"),
        ({"train_sampling_strategy": "group_by_length"}, r"random \(shuffle\) or sequential"),
        ({"loss_weights": [1.0]}, r"'loss_weights' is a hyperparameter of method\(s\) combined"),
    ],
)
def test_recipe_keys_dpokit_cannot_honour_are_refused_by_name(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_loss_type_lists_as_trl_reads_them():
    with pytest.raises(ConfigError, match="an empty list"):
        TrainConfig.from_dict({"loss_type": []})
    # a loss type listed twice: TRL adds weight * mean(loss) per entry = one term, summed weights
    twice = TrainConfig.from_dict(
        {"loss_type": ["sigmoid", "sft", "sigmoid"], "loss_weights": [0.5, 1, 0.25]}
    )
    assert (twice.method_args["losses"], twice.method_args["loss_weights"]) == (
        "dpo,sft",
        "0.75,1.0",
    )
    assert (
        TrainConfig.from_dict({"loss_type": ["sigmoid", "sigmoid"]}).method_args["loss_weights"]
        == "2.0"
    )


def test_trl_style_config_has_no_prompt_bound_as_trl_1_16():
    # DPOConfig 1.16 bounds prompt + completion only (max_length 1024, as dpokit's default)
    config = TrainConfig.from_dict({"loss_type": ["sigmoid", "bco_pair", "sft"]})
    assert (config.max_prompt_length, config.max_length) == (None, 1024)
    assert TrainConfig.from_dict({"method": "dpo"}).max_prompt_length == 512  # dpokit's own
    older = TrainConfig.from_dict({"loss_type": "sigmoid", "max_completion_length": 100})
    assert (older.max_prompt_length, older.max_length) == (512, 612)  # TRL < 1.0's two bounds


def test_bf16_and_fp16_both_true_in_one_source_are_refused():
    with pytest.raises(ConfigError, match="bf16 and fp16 are both true"):
        TrainConfig.load(None, ["bf16=true", "fp16=true"])


# ---- end to end: a TRL YAML with a loss_type list through `dpokit train --config` ---------------


def test_trl_list_yaml_first_step_is_trl_s_loss(tmp_path, tiny_dir):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    out = tmp_path / "run"
    trl_yaml = {
        "model_name_or_path": str(tiny_dir),
        "dataset_name": str(data),
        "loss_type": ["ipo", "sigmoid", "robust"],
        "beta": 0.25,
        "label_smoothing": 0.2,
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "report_to": "none",
        "output_dir": str(out),
    }
    config = tmp_path / "trl.yaml"
    config.write_text(yaml.safe_dump(trl_yaml))
    assert main(["train", "--config", str(config), "progress=false"]) == 0
    args = yaml.safe_load((out / "config.yaml").read_text())["method_args"]
    assert (args["tau"], args["beta"], args["eps"]) == (0.25, 0.25, 0.2)
    first = json.loads((out / "metrics.jsonl").read_text().splitlines()[0])
    # policy == reference at step 1 (TRL's formulas at h = 0): IPO (0 - 1/(2*0.25))^2 = 4;
    # sigmoid ln 2; robust ((1 - 0.2) ln 2 - 0.2 ln 2) / (1 - 0.4) = ln 2
    assert first["loss/ipo"] == pytest.approx(4.0, abs=1e-5)
    assert first["loss/dpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["loss/rdpo"] == pytest.approx(math.log(2), abs=1e-5)
    assert first["loss"] == pytest.approx(4.0 + 2 * math.log(2), abs=1e-5)


def test_warmup_as_transformers_5_reads_it():
    # transformers 5 (TRL 1.16) has no warmup_ratio: warmup_steps in (0, 1) is the ratio
    config = TrainConfig.from_dict({"warmup_steps": 0.1, "lr_scheduler": "linear"})
    assert (config.warmup_steps, config.warmup_ratio) == (None, 0.1)
    assert TrainConfig.from_dict({"warmup_steps": 3}).warmup_steps == 3


def test_cpo_simpo_first_loss_equals_trl_s_cpo_trainer():
    # TRL 1.16 CPOTrainer, loss_type simpo: logits = avg_w - avg_l - gamma / beta,
    # loss = mean(nls(beta * logits)) + cpo_alpha * cross-entropy over the batch's chosen tokens
    config = TrainConfig.from_dict({"loss_type": "simpo", "beta": 2.0, "simpo_gamma": 0.6,
                                    "cpo_alpha": 0.5})  # fmt: skip
    got = get_method(config.method).compute(inputs(), config.method_args).losses.mean().item()
    logits = PC / LC - PR / LR - 0.6 / 2.0
    want = -F.logsigmoid(2.0 * logits).mean() + 0.5 * (-PC.sum() / LC.sum())
    assert got == pytest.approx(want.item(), abs=1e-9)


def test_an_nll_term_is_added_once_in_a_combined_objective():
    with pytest.raises(
        ConfigError, match=r"once per component \(dpo, ipo\): add it once as the sft"
    ):
        TrainConfig.from_dict({"loss_type": ["sigmoid", "ipo"], "rpo_alpha": 1.0})
    one = TrainConfig.from_dict({"loss_type": ["sigmoid", "sft"], "rpo_alpha": 0.5})
    assert one.method_args["nll_weight"] == 0.5  # one component adds it: allowed
