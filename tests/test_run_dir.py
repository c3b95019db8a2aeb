"""The run directory belongs to one run (issue 11 section 2): a used directory is refused, a
failed start writes nothing, a resume continues only the run it was started as (or records the
override), pruning keeps to its own checkpoints, and metrics.jsonl never repeats a step."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import time

import pytest
import torch
from safetensors.torch import load_file

from dpokit import checkpoint as ckpt
from dpokit import train
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError
from dpokit.errors import PathError
from dpokit.metrics import read_metrics
from dpokit.rundir import OVERRIDES_FILE, RUN_FILE, differences
from multiproc import child_env, dpokit_command, run
from test_faults import assert_same_weights, config_for, pair_rows, train_steps, write_rows


@pytest.fixture()
def data(tmp_path):
    return write_rows(tmp_path / "pairs.jsonl", pair_rows(16))


def snapshot(run_dir) -> dict[str, bytes]:
    """Every file under ``run_dir`` and its bytes."""
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file()
    }


# ---- a used directory ---------------------------------------------------------------------------


def test_a_fresh_run_into_a_used_directory_is_refused_and_changes_nothing(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=2, save_steps=1))
    before = snapshot(run_dir)
    with pytest.raises(PathError, match=r"output_dir=.*run is not empty \(checkpoints, config"):
        train(config_for(tiny_dir, data, run_dir, max_steps=2, learning_rate=0.01))
    assert snapshot(run_dir) == before


def test_a_run_that_fails_before_it_starts_writes_nothing(tiny_dir, data, tmp_path):
    """overwrite=true, but the data is bad: the finished run's record and weights stay."""
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=2))
    before = snapshot(run_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "chosen": "y"}\n')  # no rejected
    with pytest.raises(DataError):
        train(config_for(tiny_dir, str(bad), run_dir, max_steps=2, overwrite=True))
    assert snapshot(run_dir) == before


def test_overwrite_clears_the_earlier_run_and_says_so(tiny_dir, data, tmp_path, caplog):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=4, save_steps=1, seed=7))
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        second = train(
            config_for(tiny_dir, data, run_dir, max_steps=2, overwrite=True, save_steps=None)
        )
    assert f"overwrite=true: removing the earlier run in {run_dir}" in caplog.text
    assert not (run_dir / "checkpoints").exists()  # the first run's step-1..4 are gone
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    clean = train(config_for(tiny_dir, data, tmp_path / "clean", max_steps=2))
    assert_same_weights(second.final_dir, clean.final_dir, atol=0.0)


def test_overwrite_never_clears_a_directory_no_run_made(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "notes.txt").write_text("keep me")
    with pytest.raises(PathError, match=r"holds files no dpokit run wrote \(notes.txt\)"):
        train(config_for(tiny_dir, data, run_dir, max_steps=1, overwrite=True))
    assert (run_dir / "notes.txt").read_text() == "keep me"
    with pytest.raises(ConfigError, match="overwrite=true clears the run that resume=true"):
        train(config_for(tiny_dir, data, tmp_path / "x", overwrite=True, resume=True))


def test_resume_key_takes_booleans_and_force():
    assert TrainConfig(resume=True).resume == "true"
    assert TrainConfig(resume=False).resume == "false"
    assert TrainConfig.load(overrides=["resume=force"]).resume == "force"
    assert TrainConfig.load(overrides=["resume=yes"]).resume == "true"  # YAML 1.1: a boolean
    with pytest.raises(ConfigError, match="resume='later' is not one of: false, true, force"):
        TrainConfig(resume="later")


# ---- resume checks what it continues ------------------------------------------------------------


def test_a_changed_config_resume_is_refused_with_the_keys_that_differ(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=2, save_steps=2))
    before = snapshot(run_dir)
    changed = config_for(
        tiny_dir, data, run_dir, max_steps=4, resume=True, learning_rate=0.01, seed=1, beta=0.5
    )
    with pytest.raises(ConfigError) as caught:
        train(changed)
    message = str(caught.value)
    assert "\n" not in message
    listed = message.split("other settings: ")[1].split("; ")[0]
    assert listed == "learning_rate 0.001 -> 0.01, method_args.beta 0.1 -> 0.5, seed 42 -> 1"
    assert message.startswith(f"resume: {run_dir / 'checkpoints' / 'step-2'} was trained with")
    assert snapshot(run_dir) == before  # nothing written

    other = write_rows(tmp_path / "other.jsonl", pair_rows(16, seed=1))
    with pytest.raises(ConfigError, match=r"other settings: train_data [0-9a-f]+ -> [0-9a-f]+;"):
        train(config_for(tiny_dir, other, run_dir, max_steps=4, resume=True))
    with pytest.raises(ConfigError, match=r"other settings: batch_size 2 -> 4;"):
        train(config_for(tiny_dir, data, run_dir, max_steps=4, resume=True, batch_size=4))


def test_keys_that_cannot_change_the_past_may_change_on_resume(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    free = dict(logging_steps=2, save_total_limit=1, num_proc=1, report_to="none", progress=False)
    # memory knobs (what a user turns after an out-of-memory): the same math to float rounding
    free.update(gradient_checkpointing=True, logps_chunk_size=3, logps_saved_softmax_mb=0)
    free.update(decoder_pass_tokens=5, mlp_chunk_tokens=2)
    train(config_for(tiny_dir, data, run_dir, max_steps=2, save_steps=2))
    resumed = train(config_for(tiny_dir, data, run_dir, max_steps=4, resume=True, **free))
    assert resumed.global_step == 4
    assert not (run_dir / OVERRIDES_FILE).exists()
    assert TrainConfig.load(run_dir / "config.yaml").max_steps == 4  # config.yaml is current
    full = train(config_for(tiny_dir, data, tmp_path / "full", max_steps=4))
    assert_same_weights(resumed.final_dir, full.final_dir)


def test_extending_a_linear_schedule_is_refused_and_force_is_recorded(tiny_dir, data, tmp_path):
    """A linear schedule's lr at every step depends on its total: max_steps 2 -> 4 would give
    weights no uninterrupted run gives, so it is refused; resume=force continues and records it."""
    run_dir = tmp_path / "run"
    linear = dict(lr_scheduler="linear", warmup_steps=0)
    train(config_for(tiny_dir, data, run_dir, max_steps=2, save_steps=2, **linear))
    with pytest.raises(ConfigError, match=r"other settings: schedule_horizon 2 -> 4;"):
        train(config_for(tiny_dir, data, run_dir, max_steps=4, resume=True, **linear))
    forced = train(config_for(tiny_dir, data, run_dir, max_steps=4, resume="force", **linear))
    assert forced.global_step == 4
    lines = (run_dir / OVERRIDES_FILE).read_text().splitlines()
    assert len(lines) == 1
    record = json.loads(lines[0])
    assert record["changed"] == {"schedule_horizon": [2, 4]}
    assert record["checkpoint"] == "step-2" and record["time"]
    # warm-up resolved from a ratio changes with max_steps too: refused even when constant
    ratio = dict(lr_scheduler="constant", warmup_ratio=0.5)
    train(config_for(tiny_dir, data, tmp_path / "ratio", max_steps=2, save_steps=2, **ratio))
    with pytest.raises(ConfigError, match=r"other settings: warmup_steps 1 -> 2;"):
        train(config_for(tiny_dir, data, tmp_path / "ratio", max_steps=4, resume=True, **ratio))


def test_differences_lists_added_and_removed_keys():
    assert differences({"a": 1, "b": 2}, {"a": 1, "c": 3}) == {"b": [2, None], "c": [None, 3]}


# ---- checkpoints and metrics --------------------------------------------------------------------


def test_pruning_never_touches_another_runs_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    for step, run_id in ((1, "other"), (2, "mine"), (3, "mine"), (4, "mine")):
        path = root / f"step-{step}"
        path.mkdir(parents=True)
        (path / ckpt.MARKER).write_text("ok\n")
        (path / ckpt.STATE_FILE).write_text(json.dumps({"step": step, "run_id": run_id}))
    ckpt.prune(root, keep=1, run_id="mine")
    assert ckpt.complete_checkpoints(root) == [root / "step-1", root / "step-4"]


def test_a_run_killed_in_its_first_save_logs_each_step_once(tiny_dir, data, tmp_path):
    """Step 1 logged, its checkpoint half-written: the resume starts again and step 1 is in
    metrics.jsonl once, with the weights of an uninterrupted run."""
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=1, save_steps=1))
    root = run_dir / "checkpoints"
    (root / "step-1" / ckpt.MARKER).unlink()
    (root / "step-1").rename(root / ".tmp-step-1")
    shutil.rmtree(run_dir / "final")
    resumed = train(config_for(tiny_dir, data, run_dir, max_steps=2, save_steps=1, resume=True))
    assert [r["step"] for r in read_metrics(run_dir)] == [1, 2]
    full = train(config_for(tiny_dir, data, tmp_path / "full", max_steps=2))
    assert_same_weights(resumed.final_dir, full.final_dir)


def test_resume_without_a_checkpoint_refuses_another_runs_record(tiny_dir, data, tmp_path):
    run_dir = tmp_path / "run"
    train(config_for(tiny_dir, data, run_dir, max_steps=1, save_steps=None))
    shutil.rmtree(run_dir / "final")  # killed before its first checkpoint: run.json only
    assert json.loads((run_dir / RUN_FILE).read_text())["fingerprint"]["learning_rate"] == 1e-3
    with pytest.raises(ConfigError, match=r"other settings: learning_rate 0.001 -> 0.002;"):
        train(config_for(tiny_dir, data, run_dir, max_steps=1, resume=True, learning_rate=2e-3))


# ---- the fault test: a reused directory, a killed second run, its resume -------------------------


def test_reused_directory_killed_second_run_resumes_to_the_second_runs_weights(tiny_dir, tmp_path):
    """Run A finishes in DIR; run B (other data, lr, seed) replaces it (overwrite=true), is
    killed with SIGKILL after step 3 and resumed: DIR/final is an uninterrupted run B's."""
    run_dir = tmp_path / "run"
    data_a = write_rows(tmp_path / "a.jsonl", pair_rows(32, seed=0))
    data_b = write_rows(tmp_path / "b.jsonl", pair_rows(32, seed=1))
    first = train(config_for(tiny_dir, data_a, run_dir, max_steps=6, save_steps=1, seed=3))
    weights_a = load_file(str(first.final_dir / "model.safetensors"))

    settings = {"max_steps": 12, "save_steps": 1, "shuffle": "true", "learning_rate": 2e-3}
    settings |= {"method": "dpo", "batch_size": 2, "warmup_ratio": 0.0, "lr_scheduler": "constant"}
    settings |= {"max_length": 64, "max_prompt_length": 32, "progress": "false"}
    settings["reference_cache_dir"] = str(tmp_path / "cache")
    args = ["train", "--model", str(tiny_dir), "--data", data_b, "--output-dir", str(run_dir)]
    args += [f"{k}={v}" for k, v in settings.items()]
    env = child_env(tmp_path)
    log_path = tmp_path / "b.log"
    with log_path.open("w") as log:
        proc = subprocess.Popen(
            dpokit_command([*args, "overwrite=true"]), env=env, stdout=log, stderr=log
        )
        deadline = time.monotonic() + 180
        try:
            # run A logged steps 1..6; B's own log starts empty after the overwrite
            while not (run_dir / RUN_FILE).exists() or _b_steps(run_dir, first) < 3:
                assert proc.poll() is None, log_path.read_text()[-3000:]
                assert time.monotonic() < deadline, "run B never reached step 3"
                time.sleep(0.005)
            proc.kill()
        finally:
            proc.kill()
            returncode = proc.wait(timeout=60)
    assert returncode == -9, "run B finished before it could be killed"
    assert "overwrite=true: removing the earlier run" in log_path.read_text()
    assert not (run_dir / "final").exists()

    output = run(dpokit_command([*args, "--resume"]), env)
    assert "resumed from" in output
    steps = [r["step"] for r in read_metrics(run_dir) if r["split"] == "train"]
    assert steps == list(range(1, 13))
    values = {k: v for k, v in settings.items() if k != "reference_cache_dir"}
    full = train(config_for(tiny_dir, data_b, tmp_path / "full", **{**values, "shuffle": True}))
    assert_same_weights(run_dir / "final", full.final_dir)
    weights_b = load_file(str(run_dir / "final" / "model.safetensors"))
    assert any(not torch.equal(weights_a[name], weights_b[name]) for name in weights_a)


def _b_steps(run_dir, first) -> int:
    """Train steps run B has logged (0 while the file is still run A's)."""
    try:
        record = json.loads((run_dir / RUN_FILE).read_text())
    except (OSError, ValueError):  # removed, or being written, right now
        return 0
    if record["fingerprint"]["learning_rate"] != 2e-3:
        return 0
    return len(train_steps(run_dir / "metrics.jsonl"))


# ---- SPIN / stepwise: OUTPUT follows the same rules ----------------------------------------------


@pytest.mark.parametrize("method", ["stepwise_dpo", "spin"])
def test_a_recipe_refuses_a_used_output_before_reading_anything(method, tiny_dir, data, tmp_path):
    out = tmp_path / "out"
    (out / "iter-0").mkdir(parents=True)
    (out / "config.yaml").write_text("method: dpo\n")
    before = snapshot(out)
    with pytest.raises(PathError, match=r"output_dir=.*out is not empty \(config.yaml, iter-0\)"):
        train(config_for(tiny_dir, data, out, method=method, max_steps=1))
    assert snapshot(out) == before
    (out / "config.yaml").unlink()
    with pytest.raises(PathError, match="holds files no dpokit run wrote"):
        train(config_for(tiny_dir, data, out, method=method, max_steps=1, overwrite=True))
    assert (out / "iter-0").is_dir()
