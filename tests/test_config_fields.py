"""TrainConfig's field metadata and its one converter, shared with method hyperparameters."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from dpokit.config import GROUPS, ConfigError, TrainConfig
from dpokit.losses import Hyperparameter, format_methods
from dpokit.losses.hyperparameters import convert

FIELDS = dataclasses.fields(TrainConfig)
FLOAT_KEYS = [f.name for f in FIELDS if f.metadata["type"] is float]


def test_every_field_has_one_line_help_a_group_and_a_type():
    for f in FIELDS:
        assert f.metadata["help"] and "\n" not in f.metadata["help"], f.name
        assert f.metadata["group"] in GROUPS, f.name
        assert f.metadata["type"] in (bool, int, float, str, dict), f.name
    assert {f.metadata["group"] for f in FIELDS} == set(GROUPS)


def test_float_keys_are_the_ones_annotated_float():
    annotated = [f.name for f in FIELDS if f.type in ("float", "float | None")]
    assert annotated == FLOAT_KEYS and "learning_rate" in FLOAT_KEYS


@pytest.mark.parametrize("key", FLOAT_KEYS)
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", float("nan"), float("inf")])
def test_non_finite_floats_are_refused_for_every_float_key(key, value):
    with pytest.raises(ConfigError, match=f"{key} must be a finite float"):
        TrainConfig.from_dict({key: value})


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"adam_beta1": 1.0}, r"adam_beta1 must be in \[0, 1\), got 1\.0"),
        ({"weight_decay": -0.1}, r"weight_decay must be >= 0"),
        ({"lora_dropout": 1.0}, r"lora_dropout must be in \[0, 1\)"),
        ({"warmup_steps": -1}, r"warmup_steps must be >= 0"),
        ({"max_steps": 0}, r"max_steps must be >= 1"),
        ({"max_steps": 2.5}, r"max_steps must be int >= 1"),
        ({"shuffle": "maybe"}, r"shuffle must be bool"),
        ({"model": ["a", "b"]}, r"model must be str"),
        ({"batch_size": None}, r"'batch_size' needs a value"),
        ({"lr_scheduler": "step"}, r"lr_scheduler='step' is not one of: linear, cosine"),
    ],
)
def test_ranges_types_and_choices_come_from_the_metadata(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_config_keys_take_the_spellings_hyperparameters_take():
    config = TrainConfig.from_dict(
        {
            "max_steps": "1e3",  # YAML reads 1e3 as a string
            "save_steps": 4.0,
            "shuffle": "off",
            "lora": 1,
            "learning_rate": "5e-7",
            "optimizer": " RMSprop ",
            "seed": "12345678901234567890",  # beyond 2**53: no float rounding
            "model": Path("models") / "tiny",
            "warmup_steps": 0,
        }
    )
    assert (config.max_steps, config.save_steps) == (1000, 4)
    assert (config.shuffle, config.lora) == (False, True)
    assert config.learning_rate == 5e-7 and config.optimizer == "rmsprop"
    assert config.seed == 12345678901234567890 and config.model == str(Path("models/tiny"))
    assert config.warmup_steps == 0
    # The same strings through a method hyperparameter of the same type give the same values.
    steps = Hyperparameter(2, int, "", 1)
    assert steps.parse("steps", "1e3") == 1000 and steps.parse("steps", 4.0) == 4
    assert Hyperparameter(True, bool, "").parse("average", "off") is False


def test_direct_construction_and_replace_are_converted_and_checked():
    config = dataclasses.replace(TrainConfig(), output_dir=Path("out"), batch_size="8")
    assert config.output_dir == "out" and config.batch_size == 8
    with pytest.raises(ConfigError, match="num_epochs must be a finite float"):
        dataclasses.replace(config, num_epochs=float("nan"))


@pytest.mark.parametrize(
    ("value", "kind", "expected"),
    [
        ("0.25", float, 0.25),
        (3, float, 3.0),
        (True, float, None),
        ("3.0", int, 3),
        ("3.5", int, None),
        ("inf", int, None),
        (False, int, None),
        ("Yes", bool, True),
        (0, bool, False),
        (2, bool, None),
        (7, str, "7"),
        (None, str, None),
        ({"a": 1}, dict, {"a": 1}),
        ([1], dict, None),
    ],
)
def test_convert(value, kind, expected):
    assert convert(value, kind) == expected


def test_methods_listing_names_steps_and_recipes():
    blocks = format_methods().split("\n\n")[1:]  # one block per method, its name first
    needs = {b.split()[0]: next(x for x in b.splitlines() if "needs:" in x) for b in blocks}
    assert needs["kto"].endswith("data: unpaired; step: kto")
    assert needs["slic"].endswith("data: pairs; step: slic")
    assert needs["segment_dpo"].endswith("data: multiturn_pairs; step: segment")
    assert needs["spin"].endswith("data: sft; recipe: spin (iterations runs)")
    assert needs["stepwise_dpo"].endswith("data: pairs; recipe: stepwise (chunks runs)")
    assert needs["dpo"].endswith("data: pairs")
