"""End-to-end behaviour of the training engine on a tiny real model loaded by path."""

from __future__ import annotations

import dataclasses
import json
import math
import random

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from dpokit import train
from dpokit.engine import Trainer
from dpokit.faults import NonFiniteLossError
from dpokit.logprobs import CompletionScorer, scorer_kwargs
from dpokit.losses import LossInputs, get_method
from dpokit.metrics import read_metrics
from dpokit.reference import FrozenReference
from dpokit.steps import Procedure
from helpers import make_config

PAIRWISE = ["dpo", "dpop", "slic", "ipo", "simpo", "odpo", "rdpo", "tdpo1", "tdpo2"]
REFERENCE_FREE = {"slic", "simpo"}


def write_pairs(path, rows: int = 32, seed: int = 0) -> str:
    """An easy preference set: the chosen answer is always 'yes ...', the rejected 'no ...'."""
    rng = random.Random(seed)
    words = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]
    with open(path, "w") as handle:
        for _ in range(rows):
            topic = rng.choice(words)
            row = {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
                "score_chosen": round(rng.uniform(0.6, 1.0), 3),
                "score_rejected": round(rng.uniform(0.0, 0.4), 3),
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl")


def losses_of(history, split="train"):
    return [r["loss"] for r in history if r["split"] == split]


def loss_at_equal_policy(method: str, hyperparameters: dict, batch_scores=None) -> float:
    """The loss the method gives when policy == reference on this data (h = 0, KL = 0)."""
    spec = get_method(method)
    zeros = torch.zeros(4, dtype=torch.float64)
    lengths = torch.full((4,), 5)
    inputs = LossInputs(
        policy_chosen_logps=zeros - 3.0,
        policy_rejected_logps=zeros - 3.0,
        chosen_lengths=lengths,
        rejected_lengths=lengths,
        reference_chosen_logps=zeros - 3.0,
        reference_rejected_logps=zeros - 3.0,
        chosen_seq_kl=zeros,
        rejected_seq_kl=zeros,
    )
    if batch_scores is not None:
        inputs.score_chosen, inputs.score_rejected = batch_scores
    return float(spec.compute(inputs, hyperparameters).losses.mean())


@pytest.mark.parametrize("method", ["dpo", "dpop", "rdpo", "tdpo1", "tdpo2", "ipo"])
def test_first_loss_is_the_equal_policy_loss(method, tiny_dir, pairs_file, tmp_path):
    config = make_config(tiny_dir, pairs_file, tmp_path, method=method, max_steps=1)
    result = train(config)
    first = losses_of(result.history)[0]
    expected = loss_at_equal_policy(method, config.method_args)
    if method != "ipo":
        assert expected == pytest.approx(math.log(2), abs=1e-12)
    assert first == pytest.approx(expected, rel=1e-5)


def test_odpo_first_loss_is_softplus_of_offset(tiny_dir, pairs_file, tmp_path):
    config = make_config(tiny_dir, pairs_file, tmp_path, method="odpo", max_steps=1)
    trainer = Trainer(config)
    first_batch = next(iter(trainer.train_loader))
    scores = (first_batch["score_chosen"].double(), first_batch["score_rejected"].double())
    result = trainer.train()
    expected = loss_at_equal_policy("odpo", config.method_args, scores)
    assert losses_of(result.history)[0] == pytest.approx(expected, rel=1e-5)
    assert expected < math.log(2)  # a positive score gap makes the offset help from the start


@pytest.mark.parametrize("method", PAIRWISE)
def test_every_pairwise_method_learns_the_easy_set(method, tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir,
        pairs_file,
        tmp_path,
        method=method,
        max_steps=16,
        eval_fraction=0.25,
        eval_steps=16,
    )
    result = train(config)
    train_rows = [r for r in result.history if r["split"] == "train"]
    evaluation = [r for r in result.history if r["split"] == "eval"][-1]
    assert evaluation["rewards/accuracies"] > 0.9, evaluation
    first_margin = train_rows[0]["rewards/margins"]
    assert evaluation["rewards/margins"] > first_margin + 0.05
    assert (result.final_dir / "config.json").exists()
    reloaded = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    assert (
        reloaded.config.vocab_size
        == AutoModelForCausalLM.from_pretrained(str(tiny_dir)).config.vocab_size
    )


def test_reference_free_methods_load_no_reference(tiny_dir, pairs_file, tmp_path):
    for method in REFERENCE_FREE:
        trainer = Trainer(
            make_config(tiny_dir, pairs_file, tmp_path, method=method, overwrite=True)
        )
        assert trainer.reference_mode == "none"
        assert trainer.references == {"train": None, "eval": None}


def test_precomputed_reference_equals_online_and_cache_invalidates(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir, pairs_file, tmp_path, reference_mode="precomputed", overwrite=True
    )
    trainer = Trainer(config)
    assert trainer.reference_mode == "precomputed"
    table = trainer.references["train"]
    online = FrozenReference(CompletionScorer(AutoModelForCausalLM.from_pretrained(str(tiny_dir))))
    for batch in trainer.train_loader:
        expected = online.score(batch).logps
        got = table.score(batch).logps
        torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=0)
    cache_files = sorted((tmp_path / "cache").glob("*.safetensors"))
    assert len(cache_files) == 1

    # Same model and data: a cache hit (no new file; same numbers).
    again = Trainer(config).references["train"]
    torch.testing.assert_close(again.logps, table.logps)
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 1

    # A changed dataset invalidates it ...
    other_data = write_pairs(tmp_path / "other.jsonl", rows=24, seed=1)
    Trainer(dataclasses.replace(config, data=other_data))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 2

    # ... and so does a changed reference model.
    changed = tmp_path / "changed-model"
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        model.lm_head.weight.mul_(1.5)
    model.save_pretrained(changed)
    trainer.tokenizer.save_pretrained(changed)
    Trainer(dataclasses.replace(config, model=str(changed)))
    assert len(list((tmp_path / "cache").glob("*.safetensors"))) == 3


def test_resumed_run_equals_uninterrupted(tiny_dir, pairs_file, tmp_path):
    full = train(make_config(tiny_dir, pairs_file, tmp_path / "full", max_steps=6, shuffle=True))
    make = lambda **kw: make_config(  # noqa: E731
        tiny_dir, pairs_file, tmp_path / "split", shuffle=True, save_steps=3, **kw
    )
    train(make(max_steps=3))
    resumed = train(make(max_steps=6, resume=True))
    assert resumed.global_step == 6
    full_losses = losses_of(full.history)
    assert losses_of(resumed.history) == pytest.approx(full_losses[3:], rel=1e-6)
    logged = [r["loss"] for r in read_metrics(tmp_path / "split" / "run") if r["split"] == "train"]
    assert logged == pytest.approx(full_losses, rel=1e-6)
    a = load_file(str(full.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=0)


def test_gradient_accumulation_matches_full_batch(tiny_dir, pairs_file, tmp_path):
    big = train(make_config(tiny_dir, pairs_file, tmp_path / "big", batch_size=8, max_steps=2))
    small = train(
        make_config(
            tiny_dir,
            pairs_file,
            tmp_path / "small",
            batch_size=2,
            gradient_accumulation_steps=4,
            max_steps=2,
        )
    )
    assert losses_of(small.history) == pytest.approx(losses_of(big.history), rel=1e-5)
    a = load_file(str(big.final_dir / "model.safetensors"))
    b = load_file(str(small.final_dir / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-5, rtol=1e-5)


def test_lora_trains_only_adapters_and_adapter_off_is_the_base(tiny_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir,
        pairs_file,
        tmp_path,
        lora=True,
        lora_r=4,
        reference_mode="adapter",
        max_steps=3,
        lora_target_modules="q_proj,v_proj",
        merge_lora=True,
    )
    trainer = Trainer(config)
    before = {n: p.detach().clone() for n, p in trainer.policy.named_parameters()}
    trainer.train()
    changed = {n for n, p in trainer.policy.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all("lora_" in n for n in changed)

    base = FrozenReference(CompletionScorer(AutoModelForCausalLM.from_pretrained(str(tiny_dir))))
    adapter_off = trainer.references["train"]
    batch = next(iter(trainer.train_loader))
    torch.testing.assert_close(adapter_off.score(batch).logps, base.score(batch).logps)
    # scorer_kwargs: the batch's layout (packed rows under the default packing=auto)
    inputs = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    policy_logps = trainer.policy(*inputs, **scorer_kwargs(batch)).logps
    assert not torch.allclose(policy_logps, base.score(batch).logps)
    assert (trainer.output_dir / "final" / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(str(trainer.output_dir / "final-merged"))
    merged_logps = CompletionScorer(merged)(*inputs, **scorer_kwargs(batch)).logps
    torch.testing.assert_close(merged_logps, policy_logps.detach(), atol=1e-5, rtol=1e-5)


def test_nonfinite_loss_stops_with_step_named_and_checkpoint_kept(tiny_dir, pairs_file, tmp_path):
    config = make_config(tiny_dir, pairs_file, tmp_path, max_steps=5)
    trainer = Trainer(config)
    real_step = trainer.procedure.batch_loss
    calls = []

    def poisoned(ctx, batch):
        out = real_step(ctx, batch)
        calls.append(1)
        if len(calls) == 3:
            out.loss = out.loss * float("nan")
        return out

    trainer.procedure = Procedure(trainer.procedure.prepare, trainer.procedure.collator, poisoned)
    with pytest.raises(NonFiniteLossError, match=r"step 3 .*rows \[8, 9, 10, 11\]"):
        trainer.train()
    saved = trainer.output_dir / "checkpoints" / "step-2"
    assert (saved / "COMPLETE").exists()
    assert json.loads((saved / "trainer_state.json").read_text())["step"] == 2


def test_metrics_file_and_plots(tiny_dir, pairs_file, tmp_path):
    from dpokit.plot import plot_run

    result = train(make_config(tiny_dir, pairs_file, tmp_path, method="tdpo2", max_steps=3))
    records = read_metrics(result.output_dir)
    assert [r["step"] for r in records] == [1, 2, 3]
    for key in (
        "loss",
        "rewards/chosen",
        "rewards/rejected",
        "rewards/margins",
        "rewards/accuracies",
        "logps/chosen",
        "kl/chosen",
        "grad_norm",
        "lr",
        "tokens_per_second",
    ):
        assert key in records[0], key
    written = plot_run(result.output_dir)
    assert {p.name for p in written} >= {"loss.png", "rewards.png", "accuracies.png", "kl.png"}
    assert (result.output_dir / "config.yaml").exists()
