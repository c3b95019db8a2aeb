"""Config errors are caught before anything loads, with the valid choices named."""

from __future__ import annotations

import pytest

from dpokit.config import ConfigError, TrainConfig
from dpokit.losses.options import F_DIVERGENCE_OPTIONS, PAIRWISE_OPTIONS

OPTION_DEFAULTS = {name: hp.default for name, hp in PAIRWISE_OPTIONS.items()}
F_DEFAULTS = {name: hp.default for name, hp in F_DIVERGENCE_OPTIONS.items()}


def test_yaml_then_keywords_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("method: dpop\nmodel: m\nbeta: 0.3\nlam: 5\nbatch_size: 2\n")
    config = TrainConfig.load(path, ["beta=0.2", "learning_rate=5e-7"], batch_size=8)
    assert config.method == "dpop"
    assert config.method_args == {"beta": 0.2, "lam": 5.0, **OPTION_DEFAULTS}
    assert config.batch_size == 8
    assert config.learning_rate == pytest.approx(5e-7)


def test_defaults_come_from_the_method_table():
    assert TrainConfig(method="simpo").method_args == {"beta": 2.0, "gamma": 1.0}
    rdpo = {"beta": 0.1, "eps": 0.1, **OPTION_DEFAULTS, **F_DEFAULTS}
    assert TrainConfig(method="rdpo").method_args == rdpo


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learning_rat": 1e-6}, r"unknown config key 'learning_rat'.*Did you mean learning_rate"),
        ({"batch_size": "four"}, r"batch_size.*must be int"),
        ({"method": "dpoo"}, r"dpoo.*dpo"),
        ({"method": "sdpo"}, r"segment_dpo.*stepwise_dpo|stepwise_dpo.*segment_dpo"),
        ({"method": "rdpo", "eps": 0.7}, r"eps"),
        ({"method": "ipo", "tau": 0}, r"tau"),
        ({"optimizer": "sgd"}, r"optimizer='sgd' is not one of: adamw, rmsprop"),
        ({"max_prompt_length": 600, "max_length": 512}, r"max_prompt_length"),
        ({"method": "tdpo2", "reference_mode": "precomputed"}, r"full token distributions"),
        ({"reference_mode": "adapter"}, r"lora=true"),
        (
            {"method": "dpo", "gamma": 1.0},
            r"'gamma' is a hyperparameter of method\(s\) simpo.*not of method dpo",
        ),
    ],
)
def test_bad_config_raises_with_choices(values, message):
    with pytest.raises(ConfigError, match=message):
        TrainConfig.from_dict(values)


def test_override_syntax_error():
    with pytest.raises(ConfigError, match="key=value"):
        TrainConfig.load(None, ["beta"])


def test_saved_config_round_trips(tmp_path):
    config = TrainConfig.from_dict({"method": "odpo", "alpha": 0.5, "model": "m", "data": "d"})
    config.save(tmp_path / "c.yaml")
    again = TrainConfig.load(tmp_path / "c.yaml")
    assert again == config


def test_yaml_booleans_become_the_choice_they_spell():
    # YAML reads `no` as False: mixed_precision's choice "no" must still be reachable.
    config = TrainConfig.load(None, ["mixed_precision=no", "resume=true"])
    assert (config.mixed_precision, config.resume) == ("no", "true")
    with pytest.raises(ConfigError, match="optimizer must be str, got False"):
        TrainConfig.load(None, ["optimizer=no"])  # no boolean choice: refused, not guessed
