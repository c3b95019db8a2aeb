"""TRL's configuration names (dpokit.trl_names): TRL YAMLs run unchanged through `dpokit train`,
each TRL name lands on the dpokit key it means, and unknown keys are reported all at once."""

from __future__ import annotations

import json
import logging
import re
from pathlib import Path

import pytest
import transformers
import yaml
from datasets import Dataset, DatasetDict

from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.losses import METHODS
from dpokit.losses.options import F_DIVERGENCE_OPTIONS, PAIRWISE_OPTIONS
from dpokit.trl_names import ALIASES, LOSS_TYPES

PAIRS = [{"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"} for i in range(8)]
UNPAIRED = [
    {"prompt": f"Question {i}?", "completion": " yes" if i % 2 else " no", "label": bool(i % 2)}
    for i in range(8)
]
REPO = Path(__file__).resolve().parents[1]


def own(method_args: dict) -> dict:
    """A method's own hyperparameters, without the options every pairwise method takes."""
    options = set(PAIRWISE_OPTIONS) | set(F_DIVERGENCE_OPTIONS)
    return {k: v for k, v in method_args.items() if k not in options}


def write(path: Path, content) -> Path:
    if path.suffix == ".yaml":
        path.write_text(yaml.safe_dump(content, sort_keys=False))
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in content))
    return path


def resolved(out: Path) -> dict:
    return yaml.safe_load((out / "config.yaml").read_text())


# ---- acceptance: TRL-style YAMLs through `dpokit train --config` -----------------------------


def test_trl_dpo_yaml_runs_unchanged(tmp_path, tiny_dir):
    dataset = tmp_path / "prefs"
    DatasetDict(
        {"train": Dataset.from_list(PAIRS), "test": Dataset.from_list(PAIRS[:4])}
    ).save_to_disk(str(dataset))
    out = tmp_path / "run"
    trl_yaml = {  # TRL names only: ModelConfig + ScriptArguments + DPOConfig
        "model_name_or_path": str(tiny_dir),
        "dtype": "float32",
        "attn_implementation": "eager",
        "use_peft": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target_modules": ["q_proj", "v_proj"],
        "dataset_name": str(dataset),
        "dataset_train_split": "train",
        "dataset_test_split": "test",
        "loss_type": ["sigmoid"],
        "beta": 0.2,
        "learning_rate": 5e-4,
        "lr_scheduler_type": "cosine",
        "warmup_ratio": 0.1,
        "per_device_train_batch_size": 4,
        "per_device_eval_batch_size": 2,
        "gradient_accumulation_steps": 1,
        "num_train_epochs": 1,
        "max_steps": 2,
        "max_length": 64,
        "precompute_ref_log_probs": True,
        "gradient_checkpointing": True,
        "gradient_checkpointing_kwargs": {"use_reentrant": False},
        "bf16": False,
        "eval_strategy": "steps",
        "eval_steps": 2,
        "logging_steps": 1,
        "save_steps": 2,
        "save_strategy": "steps",
        "report_to": ["none"],
        "seed": 7,
        "dataset_num_proc": 1,
        "output_dir": str(out),
        "push_to_hub": False,
        "logging_first_step": True,
    }
    config = write(tmp_path / "dpo.yaml", trl_yaml)
    assert main(["train", "--config", str(config), "progress=false"]) == 0
    saved = resolved(out)
    expected = {
        "method": "dpo",
        "model": str(tiny_dir),
        "data": str(dataset),
        "data_split": "train",
        "eval_data": str(dataset),
        "eval_data_split": "test",
        "eval_batch_size": 2,
        "dtype": "float32",
        "attn_implementation": "eager",
        "trust_remote_code": False,  # never implied by another key
        "lora": True,
        "lora_r": 8,
        "lora_alpha": 16,
        "lora_dropout": 0.05,
        "lora_target_modules": "q_proj,v_proj",
        "learning_rate": 5e-4,
        "lr_scheduler": "cosine",
        "batch_size": 4,
        "num_epochs": 1.0,
        "max_steps": 2,
        "reference_mode": "precomputed",
        "gradient_checkpointing": True,
        "mixed_precision": "no",
        "eval_steps": 2,
        "save_steps": 2,
        "report_to": "none",
        "seed": 7,
        "num_proc": 1,
        "output_dir": str(out),
    }
    assert {key: saved[key] for key in expected} == expected
    assert own(saved["method_args"]) == {"beta": 0.2}  # + the pairwise options' defaults
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(line.get("split") == "eval" for line in lines)  # the test split was evaluated


def test_trl_kto_yaml_runs_unchanged(tmp_path, tiny_dir):
    data = write(tmp_path / "unpaired.jsonl", UNPAIRED)
    out = tmp_path / "kto"
    trl_yaml = {  # ModelConfig + ScriptArguments + KTOConfig
        "model_name_or_path": str(tiny_dir),
        "dataset_name": str(data),
        "loss_type": "kto",
        "beta": 0.3,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.2,
        "learning_rate": 1e-3,
        "lr_scheduler_type": "constant",
        "per_device_train_batch_size": 4,
        "max_steps": 1,
        "max_length": 64,
        "fp16": False,
        "output_dir": str(out),
        "report_to": "none",
    }
    config = write(tmp_path / "kto.yaml", trl_yaml)
    assert main(["train", "--config", str(config), "progress=false"]) == 0
    saved = resolved(out)
    assert saved["method"] == "kto"
    assert saved["method_args"] == {
        "beta": 0.3,
        "desirable_weight": 1.0,
        "undesirable_weight": 1.2,
        "kl_baseline": "batch",
    }
    # transformers' "constant" schedule has no warmup: dpokit's constant with 0 warmup steps
    assert (saved["lr_scheduler"], saved["warmup_steps"]) == ("constant", 0)
    assert (saved["batch_size"], saved["max_steps"], saved["mixed_precision"]) == (4, 1, "no")


# ---- the model-loading keys reach every from_pretrained ---------------------------------------


def test_model_loading_keys_reach_model_reference_and_tokenizer(tmp_path, tiny_dir, monkeypatch):
    calls = []
    for cls in (transformers.AutoModelForCausalLM, transformers.AutoTokenizer):
        original = cls.from_pretrained.__func__

        def spy(klass, *args, _original=original, _name=cls.__name__, **kwargs):
            calls.append(
                (_name, kwargs.get("trust_remote_code"), kwargs.get("attn_implementation"))
            )
            return _original(klass, *args, **kwargs)

        monkeypatch.setattr(cls, "from_pretrained", classmethod(spy))
    data = write(tmp_path / "prefs.jsonl", PAIRS)
    out = tmp_path / "run"
    argv = ["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out)]
    argv += ["trust_remote_code=true", "attn_implementation=eager", "reference_mode=model"]
    argv += ["max_steps=1", "max_length=64", "max_prompt_length=32", "progress=false"]
    assert main(argv) == 0
    models = [c for c in calls if c[0] == "AutoModelForCausalLM"]
    tokenizers = [c for c in calls if c[0] == "AutoTokenizer"]
    assert len(models) == 2  # the policy and the frozen reference
    assert set(models) == {("AutoModelForCausalLM", True, "eager")}
    assert tokenizers and all(c[1] is True for c in tokenizers)
    saved = resolved(out)
    assert (saved["trust_remote_code"], saved["attn_implementation"]) == (True, "eager")


def test_trust_remote_code_is_off_by_default_and_never_implied():
    config = TrainConfig.from_dict({"attn_implementation": "sdpa", "model_init_kwargs": {}})
    assert config.trust_remote_code is False
    with pytest.raises(ConfigError, match="trust_remote_code at the top level"):
        TrainConfig.from_dict({"model_init_kwargs": {"trust_remote_code": True}})
    lifted = TrainConfig.from_dict(
        {"model_init_kwargs": {"torch_dtype": "bfloat16", "revision": "x"}}
    )
    assert (lifted.dtype, lifted.model_init_kwargs) == ("bfloat16", {"revision": "x"})


# ---- names -> keys ----------------------------------------------------------------------------


@pytest.mark.parametrize("loss_type", sorted(LOSS_TYPES))
def test_every_loss_type_maps_to_its_method(loss_type):
    method, note = LOSS_TYPES[loss_type]
    if method is None:
        with pytest.raises(ConfigError, match=f"TRL's loss_type='{loss_type}'.*no dpokit equiv"):
            TrainConfig.from_dict({"loss_type": loss_type})
        return
    target = "combined" if method == "sft" else method
    if target not in METHODS:
        pytest.skip(f"method {target} is not in the table on this branch yet")
    # TRL 1.16 refuses exo_pair at its default label_smoothing 0.0
    extra = {"label_smoothing": 1e-3} if loss_type == "exo_pair" else {}
    config = TrainConfig.from_dict({"loss_type": loss_type, **extra})
    assert config.method == target


@pytest.mark.parametrize(
    ("loss_type", "method", "key"),
    [("robust", "rdpo", "eps"), ("exo_pair", "exo_pair", "smoothing"), ("aot", "aot", "smoothing")],
)
def test_label_smoothing_keeps_trl_meaning(loss_type, method, key):
    if method not in METHODS:
        pytest.skip(f"method {method} is not in the table on this branch yet")
    config = TrainConfig.from_dict({"loss_type": loss_type, "label_smoothing": 0.2})
    assert (config.method, config.method_args[key]) == (method, 0.2)


def test_label_smoothing_under_sigmoid_is_ignored_with_a_warning_not_cdpo(caplog):
    with caplog.at_level(logging.WARNING):
        config = TrainConfig.from_dict({"loss_type": "sigmoid", "label_smoothing": 0.1})
    assert (config.method, own(config.method_args)) == ("dpo", {"beta": 0.1})
    assert "TRL 1.16 ignores it under loss_type sigmoid" in caplog.text
    assert "cdpo" in caplog.text


def test_loss_type_list_is_combined():
    if "combined" not in METHODS:
        pytest.skip("method combined is not in the table on this branch yet")
    config = TrainConfig.from_dict(
        {"loss_type": ["sigmoid", "bco_pair", "sft"], "loss_weights": [0.8, 0.2, 1.0]}
    )
    assert config.method == "combined"
    assert config.method_args["losses"] == "dpo,bco_pair,sft"
    assert config.method_args["loss_weights"] == "0.8,0.2,1.0"


@pytest.mark.parametrize(("method", "key"), [("ipo", "tau"), ("spin", "lam")])
def test_beta_is_ipo_tau_and_spin_lam(method, key):
    config = TrainConfig.from_dict({"method": method, "beta": 0.25})
    assert config.method_args[key] == 0.25
    assert "beta" not in config.method_args
    with pytest.raises(ConfigError, match=f"beta=0.25 is {key} for {method}"):
        TrainConfig.from_dict({"method": method, "beta": 0.25, key: 0.5})
    trl = TrainConfig.from_dict({"loss_type": "ipo", "beta": 0.3})  # TRL's IPO: beta is tau
    assert (trl.method, trl.method_args["tau"]) == ("ipo", 0.3)


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ({"bf16": True}, {"mixed_precision": "bf16"}),
        ({"fp16": True, "bf16": False}, {"mixed_precision": "fp16"}),
        ({"report_to": ["tensorboard", "wandb"]}, {"report_to": "all"}),
        ({"report_to": "wandb"}, {"report_to": "wandb"}),
        ({"lr_scheduler_type": "constant_with_warmup"}, {"lr_scheduler": "constant"}),
        ({"max_steps": -1}, {"max_steps": None}),
        ({"resume_from_checkpoint": True}, {"resume": "true"}),
        ({"optim": "adamw_torch_fused"}, {"optimizer": "adamw"}),
        ({"padding_free": True}, {"packing": "padding_free"}),
        ({"precompute_ref_log_probs": False}, {"reference_mode": "auto"}),
        ({"max_prompt_length": 100, "max_completion_length": 50}, {"max_length": 150}),
        ({"torch_dtype": "bfloat16"}, {"dtype": "bfloat16"}),
        ({"dataset_test_split": "test", "dataset_name": "d"}, {"eval_data": None}),  # eval: no
    ],
)
def test_trl_values_translate(values, expected):
    config = TrainConfig.from_dict(values)
    assert {key: getattr(config, key) for key in expected} == expected


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"bf16": True, "fp16": True}, r"bf16 and fp16 are both true"),
        ({"logging_steps": 0.1}, r"TRL's logging_steps=0.1: a share of the training steps"),
        ({"resume_from_checkpoint": "ckpt/step-5"}, r"a checkpoint path .*resume=true"),
        ({"eval_strategy": "epoch"}, r"evaluates every eval_steps"),
        ({"loss_type": "apo_zero_unpaired"}, r"no dpokit equivalent: dpokit has no unpaired APO"),
        ({"push_to_hub": True}, r"TRL's push_to_hub=True has no dpokit equivalent"),
        ({"use_dora": True}, r"TRL's use_dora=True has no dpokit equivalent"),
        ({"deepspeed": "ds.json"}, r"TRL's deepspeed has no dpokit equivalent: launch with acc"),
        (
            {"model_name_or_path": "a", "model": "b"},
            r"model_name_or_path='a' and model='b' both set model",
        ),
    ],
)
def test_trl_names_without_dpokit_meaning_are_refused_by_name(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_unknown_keys_reported_all_at_once_with_hints():
    with pytest.raises(ConfigError) as info:
        TrainConfig.from_dict(
            {"lerning_rate": 1e-6, "per_device_batch_size": 2, "push_to_hub": True, "zzz": 1}
        )
    message = str(info.value)
    assert "3 unknown config keys" in message
    assert "'lerning_rate' (did you mean learning_rate" in message
    assert "per_device_train_batch_size (TRL: batch_size)" in message
    assert "'zzz'" in message
    assert "TRL's push_to_hub=True has no dpokit equivalent" in message
    assert "Valid keys" not in message and len(message) < 600  # no dump of every key


def test_command_line_wins_over_yaml_under_either_name(tmp_path):
    config = write(
        tmp_path / "run.yaml",
        {"model_name_or_path": "a", "per_device_train_batch_size": 8, "bf16": True},
    )
    loaded = TrainConfig.load(config, ["batch_size=2", "mixed_precision=fp16"], model="b", data="d")
    assert (loaded.model, loaded.batch_size, loaded.mixed_precision) == ("b", 2, "fp16")
    trl_on_cli = TrainConfig.load(None, ["per_device_train_batch_size=3", "loss_type=robust"])
    assert (trl_on_cli.batch_size, trl_on_cli.method) == (3, "rdpo")


def test_docs_table_matches_the_alias_table():
    page = (REPO / "docs" / "trl.md").read_text()
    for alias in ALIASES:
        row = re.search(rf"^\| `{alias.trl}` \| (.*?) \|", page, re.MULTILINE)
        assert row, f"docs/trl.md has no row for {alias.trl}"
        assert alias.target.split(" ")[0] in row.group(1), alias.trl
    for loss_type, (method, _) in LOSS_TYPES.items():
        row = re.search(rf"^\| `{loss_type}` \| (.*?) \|", page, re.MULTILINE)
        assert row and (method or "refused") in row.group(1), loss_type


# ---- dpokit train --help ----------------------------------------------------------------------


def _help(capsys, *argv) -> str:
    with pytest.raises(SystemExit) as exit_info:
        main(["train", *argv, "--help"])
    assert exit_info.value.code == 0
    return capsys.readouterr().out


def test_train_help_shows_every_key_grouped_with_type_default_and_description(capsys):
    import dataclasses

    from dpokit.config import GROUPS

    text = _help(capsys)
    assert "inverse temperature of the implicit reward" in text  # beta (the default method's)
    assert "the reference: auto (none for reference-free methods" in text  # reference_mode
    positions = [text.index(f"\n{group}:\n") for group in GROUPS]
    assert positions == sorted(positions)
    for f in dataclasses.fields(TrainConfig):
        if f.name == "method_args":
            continue
        section = text[positions[GROUPS.index(f.metadata["group"])] :]
        assert f"  {f.name}=" in section and f.metadata["help"] in section, f.name
    line = next(row for row in text.splitlines() if row.startswith("  learning_rate="))
    assert line.split() == ["learning_rate=1e-06", "float", ">", "0", "peak", "learning", "rate"]


def test_train_help_with_a_method_shows_its_hyperparameters(capsys):
    text = _help(capsys, "--method", "ipo")
    assert "method ipo" in text and "  tau=0.1" in text
    assert "regularization strength" in text
    assert "beta=... is read as tau (TRL's name)" in text


# ---- progress bars and the data summary --------------------------------------------------------


@pytest.mark.parametrize("progress", [True, False])
def test_reference_precompute_and_weight_hashing_show_bars(tmp_path, tiny_dir, capfd, progress):
    import shutil

    model = shutil.copytree(tiny_dir, tmp_path / "model")  # a new path: its hash is not memoised
    data = write(tmp_path / "prefs.jsonl", PAIRS)
    argv = [
        "train",
        "--model",
        str(model),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    argv += ["max_steps=1", "max_length=64", "max_prompt_length=32", f"progress={progress}"]
    argv += ["reference_mode=precomputed"]
    assert main(argv) == 0
    err = capfd.readouterr().err
    assert ("reference log-probs:" in err) is progress
    assert ("hashing model.safetensors" in err) is progress


def test_data_summary_is_logged_once(tmp_path, tiny_dir, caplog):
    data = write(tmp_path / "prefs.jsonl", PAIRS)
    argv = [
        "train",
        "--model",
        str(tiny_dir),
        "--data",
        str(data),
        "--output-dir",
        str(tmp_path / "run"),
    ]
    argv += ["max_steps=1", "max_length=64", "max_prompt_length=32", "progress=false"]
    with caplog.at_level(logging.INFO):
        assert main(argv) == 0
    summaries = [r for r in caplog.records if r.levelno >= logging.INFO and "kept 8" in r.message]
    assert len(summaries) == 1, [r.message for r in summaries]
