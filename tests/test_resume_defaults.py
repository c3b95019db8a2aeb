"""A resume is never silent (tester finding F11): checkpoints by default every 500 steps (as
transformers) and at the last step; a finished run is refused with how to continue it; a run
with no checkpoint says it starts at step 0; ``resume=force`` there does not claim to continue."""

from __future__ import annotations

import json
import logging
import shutil

import pytest
from transformers import TrainingArguments

from dpokit import checkpoint as ckpt
from dpokit import train
from dpokit.config import ConfigError, TrainConfig
from dpokit.metrics import read_metrics
from dpokit.rundir import OVERRIDES_FILE, RUN_FILE
from test_faults import assert_same_weights, config_for, pair_rows, write_rows


@pytest.fixture()
def data(tmp_path):
    return write_rows(tmp_path / "pairs.jsonl", pair_rows(16))


def test_save_steps_defaults_to_transformers_value():
    assert TrainConfig().save_steps == 500
    assert TrainingArguments.__dataclass_fields__["save_steps"].default == 500
    assert TrainConfig.load(overrides=["save_steps=none"]).save_steps is None


def test_the_last_step_is_checkpointed_and_its_run_marked_finished(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=3))  # default save_steps: 500
    root = run_dir / "checkpoints"
    assert ckpt.complete_checkpoints(root) == [root / "step-3"]
    assert json.loads((run_dir / RUN_FILE).read_text())["finished_step"] == 3
    assert ckpt.save_due(500, 500, 900) and ckpt.save_due(3, 500, 3)
    assert not ckpt.save_due(499, 500, 900) and not ckpt.save_due(3, None, 3)


def test_resume_of_a_finished_run_is_refused_and_raising_max_steps_continues_it(
    tiny_dir, data, tmp_path
):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=3, warmup_steps=0))
    with pytest.raises(ConfigError) as caught:
        train(config_for(tiny_dir, data, run_dir, max_steps=3, warmup_steps=0, resume="true"))
    assert str(caught.value) == (
        f"resume: the run in {run_dir} finished at step 3 (this command's max_steps: 3; its "
        f"model is in "
        f"{run_dir / 'final'}): nothing to resume; to train further, resume with max_steps "
        "above 3 (it continues from step-3; a linear or cosine schedule also needs resume=force)"
    )
    # max_steps 5, constant schedule: starts at step 4 and ends where an uninterrupted run does
    longer = train(config_for(tiny_dir, data, run_dir, max_steps=5, warmup_steps=0, resume=True))
    assert [r["step"] for r in longer.history] == [4, 5]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3, 4, 5]
    whole = train(config_for(tiny_dir, data, tmp_path / "whole", max_steps=5, warmup_steps=0))
    assert_same_weights(longer.final_dir, whole.final_dir, atol=0.0)


def test_a_finished_run_without_checkpoints_says_so(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=2, save_steps=None))
    assert not (run_dir / "checkpoints").exists()
    with pytest.raises(ConfigError) as caught:
        train(config_for(tiny_dir, data, run_dir, max_steps=4, resume="true"))
    assert str(caught.value) == (
        f"resume: the run in {run_dir} finished at step 2 and kept no checkpoint to continue "
        "from (checkpoints are saved every save_steps and at the last step): start a new run "
        f"from {run_dir / 'final'} in another output_dir"
    )


def killed_before_its_first_save(tiny_dir, data, run_dir) -> None:
    """A run's directory as ``kill -9`` before its first checkpoint leaves it: run.json, a
    partial log, no checkpoint, no final model."""
    train(config_for(tiny_dir, data, run_dir, max_steps=3, save_steps=None, beta=0.1))
    record = json.loads((run_dir / RUN_FILE).read_text())
    del record["finished_step"]
    (run_dir / RUN_FILE).write_text(json.dumps(record))
    shutil.rmtree(run_dir / "final")


def test_resume_with_no_checkpoint_warns_and_starts_at_step_0(tiny_dir, data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    killed_before_its_first_save(tiny_dir, data, run_dir)
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        again = train(config_for(tiny_dir, data, run_dir, max_steps=3, resume="true"))
    assert (
        f"resume: {run_dir} holds no checkpoint (the run stopped before its first save, "
        "save_steps=500): starting again from step 0" in caplog.messages
    )
    assert [r["step"] for r in again.history] == [1, 2, 3]
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2, 3]


def test_resume_force_with_no_checkpoint_does_not_claim_to_continue(
    tiny_dir, data, tmp_path, caplog
):
    run_dir = tmp_path / "run"
    killed_before_its_first_save(tiny_dir, data, run_dir)
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        again = train(config_for(tiny_dir, data, run_dir, max_steps=3, beta=0.3, resume="force"))
    assert (
        f"resume: {run_dir} holds no checkpoint (the run stopped before its first save, "
        "save_steps=500): starting again from step 0 with method_args.beta 0.1 -> 0.3 "
        "(resume=force)" in caplog.messages
    )
    assert "continuing" not in caplog.text
    assert not (run_dir / OVERRIDES_FILE).exists()  # nothing was continued, nothing mixed
    assert [r["step"] for r in again.history] == [1, 2, 3]
    fresh = train(config_for(tiny_dir, data, tmp_path / "fresh", max_steps=3, beta=0.3))
    assert_same_weights(again.final_dir, fresh.final_dir, atol=0.0)


def test_resume_into_an_empty_directory_says_it_starts_a_new_run(tiny_dir, data, tmp_path, caplog):
    run_dir = tmp_path / "nothing-here"
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        result = train(config_for(tiny_dir, data, run_dir, max_steps=1, resume="true"))
    assert f"resume: no run in {run_dir} to continue: starting a new run at step 0" in (
        caplog.messages
    )
    assert result.global_step == 1
