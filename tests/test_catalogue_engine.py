"""The catalogue's methods in the engine: first losses, BCO's running baseline (updated in
training only, checkpointed, resume == uninterrupted) and a combined objective (MPO) logged per
component."""

from __future__ import annotations

import json
import math

import pytest
import torch

from dpokit import train
from dpokit.engine import Trainer
from dpokit.losses import RewardBaseline
from dpokit.metrics import read_metrics
from helpers import make_config
from test_engine import losses_of, write_pairs

MPO = {"losses": "dpo,bco_pair,sft", "loss_weights": "0.8,0.2,1.0"}


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


# First loss at policy == reference (the pre-computed reference is the starting policy).
FIRST = {
    "cdpo": math.log(2),
    "hinge": 1.0,
    "nca_pair": 2 * math.log(2),
    "sppo_hard": 50.0,
    "apo_down": 1.0,
    "discopop": (math.log(2) + 1) / 2,
    "aot": math.log(2),
    "sigmoid_norm": math.log(2),
    "bco_pair": 2 * math.log(2),  # all rewards are 0, so is their running mean
}


@pytest.mark.parametrize("method", list(FIRST))
def test_first_loss_is_the_equal_policy_loss(method, tiny_dir, pairs_file, tmp_path):
    result = train(make_config(tiny_dir, pairs_file, tmp_path, method=method, max_steps=1))
    assert losses_of(result.history)[0] == pytest.approx(FIRST[method], rel=1e-5)


def test_bco_baseline_is_the_mean_of_all_training_rewards(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir, pairs_file, tmp_path, method="bco_pair", max_steps=3, eval_fraction=0.25
    )
    trainer = Trainer(config)
    seen = []
    hook = trainer.reward_baseline
    original = hook.rewards_of

    def spy(inputs, hp):
        rewards = original(inputs, hp)
        seen.append(rewards.detach().double())
        return rewards

    hook.rewards_of = spy
    result = trainer.train()
    # 3 training micro-batches of 4 pairs update it; the final evaluation does not
    assert len(seen) == 3 and [r.numel() for r in seen] == [8, 8, 8]
    assert hook.state.count == 24
    assert hook.state.mean == pytest.approx(torch.cat(seen).mean().item(), abs=1e-12)
    logged = [r["reward_baseline"] for r in result.history if r["split"] == "train"]
    expected, baseline = [], RewardBaseline()
    for rewards in seen:
        expected.append(baseline.update(rewards))
    assert logged == pytest.approx(expected, abs=1e-6)  # the loss read the updated mean
    evaluation = [r for r in result.history if r["split"] == "eval"][-1]
    assert evaluation["reward_baseline"] == pytest.approx(expected[-1], abs=1e-6)


def test_bco_resumed_run_equals_uninterrupted(tiny_dir, pairs_file, tmp_path):
    common = dict(method="bco_pair", shuffle=True, learning_rate=5e-3)
    full = train(make_config(tiny_dir, pairs_file, tmp_path / "full", max_steps=6, **common))
    make = lambda **kw: make_config(  # noqa: E731
        tiny_dir, pairs_file, tmp_path / "split", save_steps=3, **common, **kw
    )
    train(make(max_steps=3))
    state = json.loads((tmp_path / "split/run/checkpoints/step-3/trainer_state.json").read_text())
    assert state["reward_baseline"]["count"] == 3 * 8
    resumed = train(make(max_steps=6, resume=True))
    full_rows = [r for r in full.history if r["split"] == "train"]
    resumed_rows = [r for r in resumed.history if r["split"] == "train"]
    assert [r["loss"] for r in resumed_rows] == pytest.approx(
        [r["loss"] for r in full_rows[3:]], rel=1e-6
    )
    assert [r["reward_baseline"] for r in resumed_rows] == pytest.approx(
        [r["reward_baseline"] for r in full_rows[3:]], abs=1e-7
    )
    assert resumed_rows[-1]["reward_baseline"] != pytest.approx(0.0, abs=1e-6)


def test_mpo_trains_and_logs_each_component(tiny_dir, pairs_file, tmp_path):
    config = make_config(tiny_dir, pairs_file, tmp_path, method="combined", max_steps=2, **MPO)
    trainer = Trainer(config)
    assert trainer.spec.reference == "logps" and trainer.reward_baseline.active
    result = trainer.train()
    first = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"][0]
    for name in ("dpo", "bco_pair", "sft"):
        assert f"loss/{name}" in first
    # the weighted sum of the logged components is the logged loss (means are linear)
    total = 0.8 * first["loss/dpo"] + 0.2 * first["loss/bco_pair"] + first["loss/sft"]
    assert first["loss"] == pytest.approx(total, rel=1e-6)
    assert first["loss/dpo"] == pytest.approx(math.log(2), rel=1e-5)
    assert first["loss/bco_pair"] == pytest.approx(2 * math.log(2), rel=1e-5)
    assert result.global_step == 2


def test_reference_free_combination_builds_no_reference(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir, pairs_file, tmp_path, method="combined", losses="orpo,sft", max_steps=1
    )
    trainer = Trainer(config)
    assert trainer.reference_mode == "none" and not trainer.reward_baseline.active
    row = losses_of(trainer.train().history)[0]
    assert math.isfinite(row)
