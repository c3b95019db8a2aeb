"""Faults: a run killed at any moment resumes to the same weights; half-written checkpoints are
skipped; NaN/inf losses and gradients stop the run (or are skipped and counted); out-of-memory
says what to change; a bad configuration fails before anything loads."""

from __future__ import annotations

import dataclasses
import json
import logging
import random
import re
import shutil
import subprocess
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit import checkpoint as ckpt
from dpokit import train
from dpokit.cli import main
from dpokit.config import TrainConfig
from dpokit.engine import Trainer
from dpokit.faults import NonFiniteLossError, OutOfMemoryError
from dpokit.metrics import read_metrics
from multiproc import child_env, dpokit_command, run

TOPICS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]


def pair_rows(rows: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    out = []
    for _ in range(rows):
        topic = rng.choice(TOPICS)
        out.append(
            {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
            }
        )
    return out


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


SETTINGS = {
    "method": "dpo",
    "batch_size": 2,
    "learning_rate": 1e-3,
    "warmup_ratio": 0.0,
    "lr_scheduler": "constant",
    "max_length": 64,
    "max_prompt_length": 32,
    "progress": False,
    "shuffle": False,
}


def config_for(tiny_dir, data, run_dir, **overrides) -> TrainConfig:
    values = dict(SETTINGS, model=str(tiny_dir), data=data, output_dir=str(run_dir))
    values["reference_cache_dir"] = str(Path(run_dir).parent / "cache")
    return TrainConfig.from_dict({**values, **overrides})


def assert_same_weights(dir_a: Path, dir_b: Path, atol: float = 1e-6) -> None:
    a = load_file(str(dir_a / "model.safetensors"))
    b = load_file(str(dir_b / "model.safetensors"))
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0, msg=name)


def train_steps(path: Path) -> list[int]:
    if not path.exists():
        return []
    steps = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # the line being written right now
            continue
        if record.get("split") == "train":
            steps.append(record["step"])
    return steps


# ---- SIGKILL and resume -------------------------------------------------------------------------


def test_sigkill_mid_run_then_resume_equals_an_uninterrupted_run(tiny_dir, tmp_path):
    """``kill -9`` whenever step 3 has been logged (the process may be mid-step or mid-save),
    then ``--resume``: the final weights and the logged losses are the uninterrupted run's."""
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(32))
    run_dir = tmp_path / "killed"
    settings = dict(SETTINGS, max_steps=12, save_steps=1, shuffle=True)
    settings["reference_cache_dir"] = str(tmp_path / "cache")
    args = ["train", "--model", str(tiny_dir), "--data", data, "--output-dir", str(run_dir)]
    args += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in settings.items()]
    env = child_env(tmp_path)

    log = (tmp_path / "killed.log").open("w")
    proc = subprocess.Popen(dpokit_command(args), env=env, stdout=log, stderr=log)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.monotonic() + 180
    try:
        while len(train_steps(metrics)) < 3:
            assert proc.poll() is None, (tmp_path / "killed.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the run never reached step 3"
            time.sleep(0.005)
        proc.kill()  # SIGKILL: no handler, no cleanup
    finally:
        proc.kill()
        returncode = proc.wait(timeout=60)
        log.close()
    assert returncode == -9, "the run finished before it could be killed"
    assert not (run_dir / "final").exists()
    killed_at = max(train_steps(metrics))
    assert 3 <= killed_at < 12

    output = run(dpokit_command([*args, "--resume"]), env)
    assert "resumed from" in output
    full = train(config_for(tiny_dir, data, tmp_path / "full", max_steps=12, shuffle=True))
    assert_same_weights(run_dir / "final", full.final_dir)
    logged = [r["loss"] for r in read_metrics(run_dir) if r["split"] == "train"]
    expected = [r["loss"] for r in full.history if r["split"] == "train"]
    assert logged == pytest.approx(expected, rel=1e-6)  # one line per step, no duplicates


def test_half_written_checkpoints_are_skipped_with_a_message(tiny_dir, tmp_path, caplog):
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(24))
    make = lambda run_dir, **kw: config_for(tiny_dir, data, run_dir, shuffle=True, **kw)  # noqa: E731
    train(make(tmp_path / "run", max_steps=4, save_steps=2))
    root = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["step-2", "step-4"]
    # A save killed inside save_state (still a .tmp dir) and a step dir without its marker.
    shutil.copytree(root / "step-4", root / ".tmp-step-6")
    (root / ".tmp-step-6" / ckpt.MARKER).unlink()
    shutil.copytree(root / "step-4", root / "step-5")
    (root / "step-5" / ckpt.MARKER).unlink()
    (root / "step-5" / "model.safetensors").write_bytes(b"half a file")
    with (tmp_path / "run" / "metrics.jsonl").open("a") as metrics:
        metrics.write('{"step": 5, "split": "tr')  # the line a killed process was writing

    with caplog.at_level(logging.INFO):
        resumed = train(make(tmp_path / "run", max_steps=6, resume=True))
    assert ".tmp-step-6: a save that did not finish" in caplog.text
    assert "step-5: no COMPLETE marker" in caplog.text
    assert "step-4 (step 4)" in caplog.text
    assert [r["step"] for r in resumed.history] == [5, 6]
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3, 4, 5, 6]
    full = train(make(tmp_path / "full", max_steps=6))
    assert_same_weights(resumed.final_dir, full.final_dir)


def test_pruning_removes_the_marker_before_the_files(tmp_path, monkeypatch):
    """A run killed while deleting an old checkpoint must not leave it looking complete."""
    root = tmp_path / "checkpoints"
    for step in (1, 2, 3):
        (root / f"step-{step}").mkdir(parents=True)
        (root / f"step-{step}" / ckpt.MARKER).write_text("ok\n")
        (root / f"step-{step}" / "model.safetensors").write_text("weights")
    monkeypatch.setattr(ckpt.shutil, "rmtree", lambda *args, **kwargs: None)  # killed right here
    ckpt.prune(root, keep=2)
    assert ckpt.complete_checkpoints(root) == [root / "step-2", root / "step-3"]


# ---- NaN / inf ----------------------------------------------------------------------------------


def poison_loss(trainer, at_call: int) -> None:
    real_step = trainer.procedure.batch_loss
    calls = []

    def step(ctx, batch):
        out = real_step(ctx, batch)
        calls.append(1)
        if len(calls) == at_call:
            out.loss = out.loss * float("inf")
        return out

    trainer.procedure = dataclasses.replace(trainer.procedure, batch_loss=step)


def poison_gradient(trainer, at_call: int) -> None:
    """A NaN gradient from one backward, through a hook on the LM head weight."""
    head = trainer.accelerator.unwrap_model(trainer.policy).model.lm_head.weight
    calls = []

    def hook(grad):
        calls.append(1)
        return grad * float("nan") if len(calls) == at_call else grad

    head.register_hook(hook)


@pytest.mark.parametrize("what", ["loss", "gradient"])
def test_nonfinite_batch_is_skipped_counted_and_logged(what, tiny_dir, tmp_path, caplog):
    """Skipping batch 2 (rows 2, 3) gives exactly the run on the data without those rows."""
    rows = pair_rows(16)
    data = write_rows(tmp_path / "pairs.jsonl", rows)
    config = config_for(tiny_dir, data, tmp_path / "run", max_steps=4, nonfinite="skip")
    trainer = Trainer(config)
    {"loss": poison_loss, "gradient": poison_gradient}[what](trainer, at_call=2)
    with caplog.at_level(logging.WARNING, logger="dpokit"):
        result = trainer.train()
    assert f"{what} is NaN/inf at step 2 (epoch 0, batch 2, rows [2, 3]); skipping" in caplog.text
    assert result.skipped_batches == 1
    assert result.global_step == 4
    logged = read_metrics(tmp_path / "run")
    assert [r["skipped_batches"] for r in logged] == [0, 1, 1, 1]
    assert all(torch.isfinite(p).all() for p in trainer.policy.parameters())

    without = write_rows(tmp_path / "without.jsonl", rows[:2] + rows[4:])
    clean = train(config_for(tiny_dir, without, tmp_path / "clean", max_steps=4))
    assert_same_weights(result.final_dir, clean.final_dir)


def test_nonfinite_gradient_stops_with_step_named_and_checkpoint_kept(tiny_dir, tmp_path):
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(16))
    trainer = Trainer(config_for(tiny_dir, data, tmp_path / "run", max_steps=4))
    poison_gradient(trainer, at_call=3)
    with pytest.raises(NonFiniteLossError, match=r"gradient is NaN/inf at step 3 .*rows \[4, 5\]"):
        trainer.train()
    saved = tmp_path / "run" / "checkpoints" / "step-2"
    assert (saved / ckpt.MARKER).exists()
    assert json.loads((saved / ckpt.STATE_FILE).read_text())["step"] == 2


# ---- out of memory -----------------------------------------------------------------------------


def test_out_of_memory_names_the_batch_and_what_helps(tiny_dir, tmp_path):
    error = torch.cuda.OutOfMemoryError  # torch.OutOfMemoryError on torch >= 2.5 (same class)
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(16))
    config = config_for(tiny_dir, data, tmp_path / "run", max_steps=3, reference_mode="model")
    trainer = Trainer(config)
    real_step = trainer.procedure.batch_loss
    shapes = []

    def step(ctx, batch):
        shapes.append(tuple(batch["input_ids"].shape))
        if len(shapes) == 2:
            raise error("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_step(ctx, batch)

    trainer.procedure = dataclasses.replace(trainer.procedure, batch_loss=step)
    with pytest.raises(OutOfMemoryError) as caught:
        trainer.train()
    message = str(caught.value)
    rows, length = shapes[-1]  # 2 pairs: 4 rows, or 2 when each shares its prompt (packing)
    assert message.startswith(
        f"out of memory at step 2: a micro-batch of {rows} rows x {length} tokens "
        f"(batch_size=2 per process, max_length=64)"
    )
    for advice in (
        "batch_size=1 gradient_accumulation_steps=2",
        "gradient_checkpointing=true",
        "reference_mode=precomputed",
        "lora=true",
    ):
        assert advice in message
    assert isinstance(caught.value.__cause__, error)


# ---- configuration errors: caught before any tokenizer or model loads ---------------------------


@pytest.fixture()
def nothing_loads(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a model or tokenizer was loaded before the config was checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["learning_rat=1e-6"], r"unknown config key 'learning_rat'\. Did you mean learning_rate"),
        (["batch_size=four"], r"config key batch_size must be int >= 1, got 'four'"),
        (["--method", "dpoo"], r"dpoo.*dpo"),
        (["beta=-1"], r"beta"),
        (["optimizer=sgd"], r"optimizer='sgd' is not one of: adamw, rmsprop"),
        (["max_length=64", "max_prompt_length=64"], r"max_prompt_length \(64\) must be <"),
        (["--chat-template", "no/such/template.jinja"], r"no/such/template.jinja.*no such file"),
        (["nonfinite=ignore"], r"nonfinite='ignore' is not one of: stop, skip"),
    ],
)
def test_bad_config_fails_before_anything_loads(
    overrides, message, nothing_loads, tmp_path, capsys
):
    out = tmp_path / "run"
    argv = ["train", "--model", "no/such/model", "--data", "no/such/data.jsonl"]
    argv += ["--output-dir", str(out), *overrides]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1].startswith("dpokit: error: ")
    assert "Traceback" not in err
    assert re.search(message, err), err
    assert not out.exists()
