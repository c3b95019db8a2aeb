"""Run settings a TRL/transformers user expects to mean the same (tester findings F9, F17): the
warm-up ratio rounds up as transformers' ``get_warmup_steps`` does, ``warmup_steps`` below 1 is
a ratio (transformers 5), and ``report_to`` a tracker that is not installed is refused."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import TrainingArguments

from dpokit import config_checks, train
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.errors import EXIT_CONFIG
from dpokit.metrics import read_metrics
from dpokit.optim import build_scheduler, resolve_warmup
from test_cli_errors import error_line
from test_faults import config_for, pair_rows, write_rows

# ---- F9: warm-up --------------------------------------------------------------------------------


def test_warmup_ratio_rounds_up_by_hand():
    config = TrainConfig(warmup_ratio=0.1)
    assert resolve_warmup(config, 4) == 1  # 0.4 -> 1 (int() gave 0)
    assert resolve_warmup(config, 15) == 2  # 1.5 -> 2
    assert resolve_warmup(config, 10) == 1  # exactly 1
    assert resolve_warmup(TrainConfig(warmup_ratio=0.1, warmup_steps=3), 4) == 3


def test_warmup_equals_transformers_get_warmup_steps(tmp_path):
    ratio = TrainingArguments(output_dir=str(tmp_path), warmup_steps=0.1)
    ours = TrainConfig(warmup_ratio=0.1)
    for steps in range(1, 101):
        assert resolve_warmup(ours, steps) == ratio.get_warmup_steps(steps), steps


def test_warmup_steps_below_1_is_a_ratio():
    config = TrainConfig.load(overrides=["warmup_steps=0.1"])
    assert (config.warmup_steps, config.warmup_ratio) == (None, 0.1)
    assert resolve_warmup(config, 4) == 1
    assert TrainConfig.load(overrides=["warmup_steps=3"]).warmup_steps == 3
    with pytest.raises(ConfigError, match="warmup_steps must be int >= 0, got 2.5"):
        TrainConfig.load(overrides=["warmup_steps=2.5"])


def test_learning_rate_of_the_first_steps_with_one_warmup_step():
    """linear, peak 1e-3, 4 steps, 1 warm-up step: step 1 trains at 0, then 1, 2/3, 1/3 of the
    peak (transformers' linear schedule: s/w in warm-up, (n - s)/(n - w) after)."""
    config = TrainConfig(warmup_ratio=0.1, lr_scheduler="linear", learning_rate=1e-3)
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1e-3)
    scheduler = build_scheduler(config, optimizer, 4)
    used = []
    for _ in range(4):
        used.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert used == pytest.approx([0.0, 1e-3, 1e-3 * 2 / 3, 1e-3 / 3], abs=1e-12)


def test_a_run_logs_the_rounded_up_warmup(tiny_dir, tmp_path):
    """metrics.jsonl's lr is the schedule after each step (as transformers logs it): with one
    warm-up step of 4, 1e-3 * [1, 2/3, 1/3, 0]; int() rounding gave [3/4, 1/2, 1/4, 0]."""
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(8))
    settings = dict(max_steps=4, warmup_ratio=0.1, lr_scheduler="linear", save_steps=None)
    train(config_for(tiny_dir, data, tmp_path / "run", **settings))
    lrs = [r["lr"] for r in read_metrics(tmp_path / "run")]
    assert lrs == pytest.approx([1e-3, 1e-3 * 2 / 3, 1e-3 / 3, 0.0], abs=1e-12)
    assert math.ceil(0.1 * 4) == 1


# ---- F17: trackers ------------------------------------------------------------------------------


def installed(*packages):
    """A find_spec that sees only ``packages``."""
    return lambda name: object() if name in packages else None


@pytest.mark.parametrize(
    ("report_to", "packages", "message"),
    [
        ("wandb", (), "report_to=wandb: wandb is not installed, so nothing would be tracked: "
         "pip install wandb, or set report_to=none (metrics.jsonl is always written)"),
        ("tensorboard", ("wandb",), "report_to=tensorboard: tensorboard is not installed, so "
         "nothing would be tracked: pip install tensorboard, or set report_to=none "
         "(metrics.jsonl is always written)"),
        ("all", (), "report_to=all: none of tensorboard, wandb is installed, so nothing would be "
         "tracked: pip install tensorboard or pip install wandb, or set report_to=none "
         "(metrics.jsonl is always written)"),
    ],
)  # fmt: skip
def test_a_tracker_that_is_not_installed_is_refused(monkeypatch, report_to, packages, message):
    monkeypatch.setattr(config_checks.importlib.util, "find_spec", installed(*packages))
    assert TrainConfig(report_to=report_to).report_to == report_to  # a config may be written
    with pytest.raises(ConfigError) as caught:
        config_checks.check_tracker(report_to)
    assert str(caught.value) == message


@pytest.mark.parametrize(
    ("report_to", "packages"),
    [("wandb", ("wandb",)), ("tensorboard", ("tensorboardX",)), ("all", ("tensorboard",))],
)
def test_an_installed_tracker_is_accepted(monkeypatch, report_to, packages):
    monkeypatch.setattr(config_checks.importlib.util, "find_spec", installed(*packages))
    config_checks.check_tracker(report_to)  # no error


def test_the_cli_refuses_a_missing_tracker_before_anything_loads(
    monkeypatch, capsys, tmp_path, tiny_dir
):
    monkeypatch.setattr(config_checks.importlib.util, "find_spec", installed())
    argv = ["train", "--model", str(tiny_dir), "--data", str(tmp_path / "no.jsonl")]
    assert main([*argv, "report_to=wandb"]) == EXIT_CONFIG  # the missing data never looked at
    assert error_line(capsys).startswith("report_to=wandb: wandb is not installed")
