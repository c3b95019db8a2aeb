"""``eval_steps`` without held-out data is a config error (issue 11), not a TypeError mid-run.

Policy: a user who sets ``eval_steps`` expects evaluations; silently skipping them (or a warning
lost in the log) would leave them with a run that never evaluated. So the config is refused
before anything loads, in one line naming ``eval_steps`` and the two ways to give eval data
(``eval_data``/``--eval-data``, ``eval_fraction``); exit code 2 from the command line.
"""

from __future__ import annotations

import json

import pytest

from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.engine import Trainer
from dpokit.errors import EXIT_CONFIG
from helpers import make_config

BASE = {"model": "m", "data": "d.jsonl"}


def test_eval_steps_without_eval_data_is_refused_naming_the_keys():
    with pytest.raises(ConfigError) as err:
        TrainConfig.from_dict({**BASE, "eval_steps": 5})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("eval_steps=5 evaluates on held-out data, but the run has none")
    for key in ("eval_data=FILE", "--eval-data", "eval_fraction=0.1", "unset eval_steps"):
        assert key in message


@pytest.mark.parametrize("given", [{"eval_data": "e.jsonl"}, {"eval_fraction": 0.2}, {}])
def test_eval_steps_with_eval_data_or_without_eval_steps_is_accepted(given):
    steps = {"eval_steps": 5} if given else {}
    config = TrainConfig.from_dict({**BASE, **given, **steps})
    assert config.eval_steps == (5 if given else None)


def test_the_command_line_exits_with_the_config_code_and_one_line(capsys):
    code = main(["train", "--model", "m", "--data", "d.jsonl", "eval_steps=2"])
    assert code == EXIT_CONFIG
    err = capsys.readouterr().err
    assert "Traceback" not in err
    [line] = [x for x in err.splitlines() if x.startswith("dpokit: error: ")]
    assert "eval_steps=2" in line and "eval_fraction" in line


def test_evaluate_without_eval_data_is_a_config_error(tiny_dir, tmp_path):
    """The Python API: ``Trainer.evaluate()`` on a run with no held-out split says so."""
    data = tmp_path / "pairs.jsonl"
    row = {"prompt": "Human: apples? Assistant:", "chosen": " yes.", "rejected": " no."}
    data.write_text(json.dumps(row) + "\n")
    trainer = Trainer(make_config(tiny_dir, str(data), tmp_path))
    with pytest.raises(ConfigError, match=r"^evaluate\(\) evaluates on held-out data"):
        trainer.evaluate(0)
