"""Stepwise DPO (sDPO) end to end on a tiny real model: chunks, moving reference, resume, CLI."""

from __future__ import annotations

import json
import math
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit import train
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError
from dpokit.engine import Trainer
from dpokit.logprobs import CompletionScorer
from dpokit.recipes.stepwise import plan_chunks
from dpokit.reference import FrozenReference
from helpers import run_config

LN2 = math.log(2)
WORDS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]


def write_pairs(
    path, rows: int = 16, steps: list | None = None, seed: int = 0, column: str = "step"
) -> str:
    """Pairs; with ``steps``, each row's chunk in ``column`` (``step``: the alias of ``chunk``)."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(rows):
            topic = rng.choice(WORDS)
            row = {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
            }
            if steps is not None:
                row[column] = steps[i]
            handle.write(json.dumps(row) + "\n")
    return str(path)


def make_config(model, data, out, **overrides) -> TrainConfig:
    return run_config(model, data, out, **{"method": "stepwise_dpo", **overrides})


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(directory / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


def first_losses(history) -> dict[str, float]:
    firsts = {}
    for record in history:
        if record["split"] == "train":
            firsts.setdefault(record["stage"], record["loss"])
    return firsts


@pytest.fixture(scope="module")
def two_steps(tiny_dir, tmp_path_factory):
    """steps=2 over 16 pairs, 2 optimizer steps per step, a checkpoint after every step."""
    root = tmp_path_factory.mktemp("stepwise")
    with pytest.MonkeyPatch.context() as mp:  # module scope: keep the datasets cache private too
        import datasets

        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        data = write_pairs(root / "pairs.jsonl")
        config = make_config(tiny_dir, data, root / "run", save_steps=1)
        result = train(config)
    return config, result


def test_one_step_is_plain_dpo(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl")
    dpo = train(make_config(tiny_dir, data, tmp_path / "dpo", method="dpo", max_steps=4))
    sdpo = train(make_config(tiny_dir, data, tmp_path / "sdpo", chunks=1, max_steps=4))
    train_losses = [
        [r["loss"] for r in res.history if r["split"] == "train"] for res in (dpo, sdpo)
    ]
    assert len(train_losses[1]) == 4
    assert train_losses[1] == pytest.approx(train_losses[0], rel=1e-6, abs=1e-7)
    assert sdpo.final_dir == tmp_path / "sdpo" / "final"
    assert_same_weights(weights(sdpo.final_dir), weights(dpo.final_dir), atol=1e-6)


def test_each_step_starts_from_and_is_referenced_by_the_previous_model(tiny_dir, two_steps):
    config, result = two_steps
    out = result.output_dir
    assert result.global_step == 4
    assert first_losses(result.history) == pytest.approx({"chunk-1": LN2, "chunk-2": LN2}, abs=1e-5)

    step1, step2 = weights(out / "chunk-1" / "final"), weights(out / "chunk-2" / "final")
    start = weights(tiny_dir)
    assert not torch.equal(step1["lm_head.weight"], start["lm_head.weight"])  # step 1 trained
    assert_same_weights(weights(out / "final"), step2)

    # The config step 2 ran with, rebuilt with a frozen-model reference: exactly step 1's weights.
    step2_config = out / "chunk-2" / "config.yaml"
    probe = TrainConfig.load(step2_config, reference_mode="model", output_dir=str(out / "probe"))
    frozen = Trainer(probe).references["train"]
    assert_same_weights(dict(frozen.scorer.model.state_dict()), step1)

    # The pre-computed table step 2 trained against (a cache hit) is step 1's model's scores.
    cache = sorted(Path(config.reference_cache_dir).iterdir())
    trainer = Trainer(TrainConfig.load(step2_config, output_dir=str(out / "probe2")))
    assert sorted(Path(config.reference_cache_dir).iterdir()) == cache  # nothing recomputed
    after_step1 = FrozenReference(CompletionScorer(frozen.scorer.model))
    initial = FrozenReference(CompletionScorer(AutoModelForCausalLM.from_pretrained(str(tiny_dir))))
    for batch in trainer.train_loader:
        table = trainer.references["train"].score(batch).logps
        torch.testing.assert_close(table, after_step1.score(batch).logps, atol=1e-5, rtol=0)
        assert not torch.allclose(table, initial.score(batch).logps, atol=1e-3)


def test_data_chunks_and_merged_metrics(two_steps):
    config, result = two_steps
    out = result.output_dir
    source = read_jsonl(config.data)
    chunks = [read_jsonl(out / f"chunk-{t}" / "data.jsonl") for t in (1, 2)]
    assert chunks == [source[:8], source[8:]]
    merged = read_jsonl(out / "metrics.jsonl")
    assert [(r["stage"], r["stage_step"], r["step"]) for r in merged] == [
        ("chunk-1", 1, 1),
        ("chunk-1", 2, 2),
        ("chunk-2", 1, 3),
        ("chunk-2", 2, 4),
    ]


def test_resume_inside_a_step_matches_the_uninterrupted_run(two_steps, tmp_path):
    config, result = two_steps
    copy = tmp_path / "run"
    shutil.copytree(result.output_dir, copy)
    # Killed after step 2's first optimizer step: no marker, no final, only checkpoint step-1.
    for path in ("chunk-2/stage.json", "chunk-2/final", "chunk-2/checkpoints/step-2", "final"):
        target = copy / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    step1_mtime = (copy / "chunk-1" / "final" / "model.safetensors").stat().st_mtime_ns
    values = {**config.to_dict(), "output_dir": str(copy), "resume": True}
    with pytest.raises(ConfigError, match=r"other settings: method_args.chunks 2 -> 3;"):
        train(TrainConfig.from_dict({**values, "chunks": 3}))
    resumed = train(TrainConfig.from_dict(values))
    assert [(r["stage"], r["step"]) for r in resumed.history] == [("chunk-2", 2)]
    assert resumed.global_step == 4
    logged = [r["step"] for r in read_jsonl(copy / "metrics.jsonl")]
    assert logged == [1, 2, 3, 4]
    assert (copy / "chunk-1" / "final" / "model.safetensors").stat().st_mtime_ns == step1_mtime
    assert_same_weights(weights(resumed.final_dir), weights(result.final_dir), atol=1e-6)


@pytest.mark.parametrize("column", ["chunk", "step"])
def test_step_column_defines_the_steps(tiny_dir, tmp_path, column):
    labels = [7, 0, 2, 7, 0, 2, 2, 0, 7, 0, 2, 7]
    data = write_pairs(tmp_path / "pairs.jsonl", rows=len(labels), steps=labels, column=column)
    result = train(make_config(tiny_dir, data, tmp_path / "run", max_steps=1))
    assert [r["stage"] for r in result.history] == ["chunk-1", "chunk-2", "chunk-3"]
    assert first_losses(result.history) == pytest.approx(
        {"chunk-1": LN2, "chunk-2": LN2, "chunk-3": LN2}, abs=1e-5
    )
    source = read_jsonl(data)
    for t, label in enumerate((0, 2, 7), start=1):
        rows = read_jsonl(tmp_path / "run" / f"chunk-{t}" / "data.jsonl")
        assert rows == [row for row in source if row[column] == label]


def sequence_logp(model, tokenizer, prompt: str, completion: str) -> float:
    """log p(completion + EOS | prompt), summed, by a plain full-logits forward."""
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    completion_ids = tokenizer(completion, add_special_tokens=False)["input_ids"]
    completion_ids = completion_ids + [tokenizer.eos_token_id]
    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logps = model(ids).logits[0, :-1].double().log_softmax(-1)  # (T-1, V)
    targets = ids[0, 1:]
    token_logps = logps.gather(-1, targets[:, None])[:, 0]
    return float(token_logps[len(prompt_ids) - 1 :].sum())


def test_easy_to_hard_orders_by_the_starting_models_margin(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=10, seed=3)
    config = make_config(tiny_dir, data, tmp_path / "run", chunks=2, order="easy_to_hard")
    plan = plan_chunks(config)
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir)).eval()
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    rows = read_jsonl(data)
    margins = np.array(
        [
            sequence_logp(model, tokenizer, r["prompt"], r["chosen"])
            - sequence_logp(model, tokenizer, r["prompt"], r["rejected"])
            for r in rows
        ]
    )
    np.testing.assert_allclose(plan.margins, margins, atol=1e-4)
    easiest = sorted(np.argsort(-np.array(plan.margins), kind="stable")[:5].tolist())
    assert plan.rows == [easiest, sorted(set(range(10)) - set(easiest))]
    assert min(margins[plan.rows[0]]) >= max(margins[plan.rows[1]])
    assert len(set(np.round(margins, 6))) > 2  # the order is not vacuous


def test_bad_step_values_and_contradicting_settings_are_clear_errors(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=4, steps=[1, 1, 1.5, 2])
    with pytest.raises(DataError, match=r"pairs\.jsonl, line 3: field 'step' must be an integer"):
        train(make_config(tiny_dir, data, tmp_path / "a"))
    data = write_pairs(tmp_path / "steps.jsonl", rows=4, steps=[1, 1, 2, 2])
    with pytest.raises(ConfigError, match="has a 'step' column.*order=easy_to_hard"):
        train(make_config(tiny_dir, data, tmp_path / "b", order="easy_to_hard"))
    with pytest.raises(ConfigError, match="chunks=5 but .* only 4 rows"):
        train(
            make_config(
                tiny_dir, write_pairs(tmp_path / "c.jsonl", rows=4), tmp_path / "c", chunks=5
            )
        )
    with pytest.raises(ConfigError, match="drop reference="):
        train(make_config(tiny_dir, data, tmp_path / "d", reference=str(tiny_dir)))


def test_stepwise_through_the_cli(tiny_dir, tmp_path, capsys):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=8)
    out = tmp_path / "run"
    argv = ["train", "--method", "stepwise_dpo", "--model", str(tiny_dir), "--data", data]
    argv += ["--output-dir", str(out), "chunks=2", "max_steps=1", "batch_size=4", "beta=0.2"]
    assert main(argv + ["progress=false", "max_length=64", "max_prompt_length=32"]) == 0
    assert "trained 2 steps" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").exists()
    assert "beta: 0.2" in (out / "chunk-2" / "config.yaml").read_text()
    assert [r["stage"] for r in read_jsonl(out / "metrics.jsonl")] == [
        "chunk-1",
        "chunk-2",
    ]


def test_lora_steps_chain_through_merged_weights(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=8)
    config = make_config(tiny_dir, data, tmp_path / "run", lora=True, lora_r=4, max_steps=1)
    result = train(config)
    out = result.output_dir
    assert first_losses(result.history) == pytest.approx({"chunk-1": LN2, "chunk-2": LN2}, abs=1e-5)
    step2 = TrainConfig.load(out / "chunk-2" / "config.yaml")
    assert step2.model == str(out / "chunk-1" / "final-merged") and step2.lora
    merged = weights(out / "chunk-2" / "final-merged")
    assert_same_weights(weights(out / "final"), merged)
    before = weights(out / "chunk-1" / "final-merged")
    assert any(not torch.equal(merged[name], before[name]) for name in merged)  # step 2 trained
