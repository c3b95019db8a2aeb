"""SPIN end to end on a tiny real model: self-generated rejected answers, a reference that moves
with the iterations, ln 2 at the start of each iteration, resume, and the CLI."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

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
from dpokit.losses import get_method
from dpokit.reference import FrozenReference
from dpokit.steps import STEPS
from helpers import run_config

LN2 = math.log(2)
WORDS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]
NEW_TOKENS = 6


def write_sft(path) -> str:
    with open(path, "w") as handle:
        for word in WORDS:
            row = {
                "prompt": f"Human: Do you like {word}? Assistant:",
                "completion": f" yes, {word}.",
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


def make_config(model, data, out, **overrides) -> TrainConfig:
    values = dict(
        method="spin",
        iterations=2,
        temperature=0.0,  # greedy: the test can regenerate the same answers independently
        max_new_tokens=NEW_TOKENS,
        generation_batch_size=1,  # unpadded prompts, as the independent check generates them
    )
    values.update(overrides)
    return run_config(model, data, out, **values)


def weights(directory) -> dict[str, torch.Tensor]:
    return load_file(str(Path(directory) / "model.safetensors"))


def assert_same_weights(a: dict, b: dict, atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=atol, rtol=0)


def read_jsonl(path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def spin_run(tiny_dir, tmp_path_factory):
    """Two SPIN iterations with keep_previous, 2 optimizer steps each, checkpoints every step."""
    root = tmp_path_factory.mktemp("spin")
    with pytest.MonkeyPatch.context() as mp:  # module scope: keep the datasets cache private too
        import datasets

        mp.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        config = make_config(
            tiny_dir, write_sft(root / "sft.jsonl"), root / "run", keep_previous=True, save_steps=1
        )
        result = train(config)
    return config, result


def greedy_answers(model_dir, prompts: list[str]) -> list[str]:
    """Each prompt's greedy answer by plain ``generate``, one prompt at a time."""
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    answers = []
    for prompt in prompts:
        ids = torch.tensor([tokenizer(prompt, add_special_tokens=False)["input_ids"]])
        out = model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            do_sample=False,
            max_new_tokens=NEW_TOKENS,
            eos_token_id=tokenizer.eos_token_id,
            pad_token_id=tokenizer.pad_token_id,
        )
        answers.append(tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True))
    return answers


def test_rejected_answers_are_the_current_models_own(tiny_dir, spin_run):
    config, result = spin_run
    out = result.output_dir
    sft = read_jsonl(config.data)
    prompts = [row["prompt"] for row in sft]
    starts = {"iter-0": tiny_dir, "iter-1": out / "iter-0" / "final"}
    answers = {name: greedy_answers(model, prompts) for name, model in starts.items()}
    for name in starts:
        generations = read_jsonl(out / name / "generations.jsonl")
        assert [g["generated"] for g in generations] == answers[name]
        assert [g["real"] for g in generations] == [row["completion"] for row in sft]
    assert answers["iter-0"] != answers["iter-1"]  # iteration 1 sampled the trained model

    # Iteration 1 trains on its own pairs, then (keep_previous) on iteration 0's.
    pairs = read_jsonl(out / "iter-1" / "pairs.jsonl")
    assert [p["rejected"] for p in pairs] == answers["iter-1"] + answers["iter-0"]
    assert [p["chosen"] for p in pairs] == [row["completion"] for row in sft] * 2
    assert [p["prompt"] for p in pairs] == prompts * 2
    assert len(read_jsonl(out / "iter-0" / "pairs.jsonl")) == len(sft)


def test_each_iteration_starts_at_ln2_against_the_model_it_starts_from(tiny_dir, spin_run):
    config, result = spin_run
    out = result.output_dir
    firsts = {}
    for record in result.history:
        firsts.setdefault(record["stage"], record["loss"])
    assert firsts == pytest.approx({"iter-0": LN2, "iter-1": LN2}, abs=1e-5)
    assert result.global_step == 4
    assert_same_weights(weights(result.final_dir), weights(out / "iter-1" / "final"))

    # Iteration 1, rebuilt from its saved config with a frozen reference: exactly iteration 0's
    # final weights (which differ from the starting model's).
    iter0 = weights(out / "iter-0" / "final")
    assert not torch.equal(iter0["lm_head.weight"], weights(tiny_dir)["lm_head.weight"])
    spin, pairs = get_method("spin"), STEPS["pairwise"]
    saved = out / "iter-1" / "config.yaml"
    probe = TrainConfig.load(saved, reference_mode="model", output_dir=str(out / "probe"))
    frozen = Trainer(probe, spec=spin, procedure=pairs).references["train"]
    assert_same_weights(dict(frozen.scorer.model.state_dict()), iter0)

    # The cached table iteration 1 trained against holds iteration 0's model's log-probs.
    cache = Path(config.reference_cache_dir)
    files = sorted(cache.iterdir())
    trainer = Trainer(
        TrainConfig.load(saved, output_dir=str(out / "probe2")), spec=spin, procedure=pairs
    )
    assert sorted(cache.iterdir()) == files  # a cache hit: the run's own table
    start = FrozenReference(CompletionScorer(AutoModelForCausalLM.from_pretrained(str(tiny_dir))))
    for batch in trainer.train_loader:
        table = trainer.references["train"].score(batch).logps
        torch.testing.assert_close(table, frozen.score(batch).logps, atol=1e-5, rtol=0)
        assert not torch.allclose(table, start.score(batch).logps, atol=1e-3)


def test_resume_skips_finished_iterations_and_continues_the_interrupted_one(spin_run, tmp_path):
    config, result = spin_run
    copy = tmp_path / "run"
    shutil.copytree(result.output_dir, copy)
    resume = TrainConfig.from_dict({**config.to_dict(), "output_dir": str(copy), "resume": True})

    # Everything finished: nothing is generated or trained again.
    done = train(resume)
    assert done.history == [] and done.global_step == 4

    # Killed after iteration 1's first optimizer step.
    for path in ("iter-1/stage.json", "iter-1/final", "iter-1/checkpoints/step-2", "final"):
        target = copy / path
        shutil.rmtree(target) if target.is_dir() else target.unlink()
    iter0_mtime = (copy / "iter-0" / "final" / "model.safetensors").stat().st_mtime_ns
    resumed = train(resume)
    assert [(r["stage"], r["step"]) for r in resumed.history] == [("iter-1", 2)]
    assert (copy / "iter-0" / "final" / "model.safetensors").stat().st_mtime_ns == iter0_mtime
    assert_same_weights(weights(resumed.final_dir), weights(result.final_dir), atol=1e-6)


def test_spin_through_the_cli_on_message_lists(tiny_dir, tmp_path, capsys):
    data = tmp_path / "chat.jsonl"
    with open(data, "w") as handle:
        for word in WORDS:
            messages = [
                {"role": "user", "content": f"Do you like {word}?"},
                {"role": "assistant", "content": f"Yes, {word}."},
            ]
            handle.write(json.dumps({"messages": messages}) + "\n")
    out = tmp_path / "run"
    argv = ["train", "--method", "spin", "--model", str(tiny_dir), "--data", str(data)]
    argv += ["--output-dir", str(out), "iterations=1", "max_steps=1", "max_new_tokens=4"]
    argv += ["lam=0.5", "progress=false", "max_length=64", "max_prompt_length=32"]
    assert main(argv) == 0
    assert "trained 1 steps" in capsys.readouterr().out
    assert (out / "final" / "model.safetensors").exists()
    assert "lam: 0.5" in (out / "iter-0" / "config.yaml").read_text()
    pairs = read_jsonl(out / "iter-0" / "pairs.jsonl")
    generated = [g["generated"] for g in read_jsonl(out / "iter-0" / "generations.jsonl")]
    assert pairs[0]["prompt"] == [{"role": "user", "content": "Do you like apples?"}]
    assert pairs[0]["chosen"] == [{"role": "assistant", "content": "Yes, apples."}]
    kept = [g for g in generated if g.strip()]
    assert [p["rejected"] for p in pairs] == [[{"role": "assistant", "content": g}] for g in kept]


def test_spin_needs_sft_rows_and_sets_its_own_reference(tiny_dir, tmp_path):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text(json.dumps({"prompt": "Q?", "chosen": " a", "rejected": " b"}) + "\n")
    with pytest.raises(DataError, match=r"pairs\.jsonl: cannot tell the data format"):
        train(make_config(tiny_dir, pairs, tmp_path / "a"))
    sft = write_sft(tmp_path / "sft.jsonl")
    with pytest.raises(ConfigError, match="drop reference="):
        train(make_config(tiny_dir, sft, tmp_path / "b", reference=str(tiny_dir)))
    with pytest.raises(ConfigError, match="use eval_fraction"):
        train(make_config(tiny_dir, sft, tmp_path / "c", eval_data=sft))
