"""SLiC-HF with y_ref sampled from the reference model, and ODPO's optional KL term."""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit import train
from dpokit.config import TrainConfig
from dpokit.engine import Trainer
from dpokit.generation import generate_completions
from dpokit.logprobs import CompletionScorer
from dpokit.losses import LossInputs, get_method, odpo_loss, odpo_offsets, slic_loss
from dpokit.steps import slic as slic_step
from helpers import make_config as engine_config


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    topics = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]
    with open(path, "w") as handle:
        for i, topic in enumerate(topics):
            row = {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
                "score_chosen": 0.9 - 0.01 * i,
                "score_rejected": 0.1 + 0.02 * i,
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


def make_config(tiny_dir, data, tmp_path, **overrides) -> TrainConfig:
    return engine_config(tiny_dir, data, tmp_path, **{"max_steps": 2, **overrides})


def completion_logps(model, rows, column: str) -> torch.Tensor:
    """log pi(row[column] | row's prompt) of prepared rows, each scored on its own. (N,)"""
    scorer = CompletionScorer(model)
    out = []
    with torch.no_grad():
        for row in rows:
            prompt, completion = row["prompt_input_ids"], row[column]
            ids = torch.tensor([prompt + completion])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(prompt) :] = True
            out.append(scorer(ids, torch.ones_like(ids), mask).logps[0])
    return torch.stack(out)


# ---- ODPO's KL term -----------------------------------------------------------------------------


def test_odpo_kl_term_by_hand():
    one = lambda x: torch.tensor([x], dtype=torch.float64)  # noqa: E731
    inputs = LossInputs(
        policy_chosen_logps=one(-10.0),  # rho_w = +1
        policy_rejected_logps=one(-11.0),  # rho_l = 0
        reference_chosen_logps=one(-11.0),
        reference_rejected_logps=one(-11.0),
        score_chosen=one(0.9),
        score_rejected=one(0.4),
    )
    # Delta = log(0.9 - 0.4) = -0.693147; DPO part nls(0.1 * 1 + 0.693147) = 0.373230;
    # KL estimate (rho_w + rho_l) / 2 = 0.5, times kl_coef 0.2 = 0.1.
    odpo = get_method("odpo")
    plain = odpo.compute(inputs, {})
    assert plain.losses.item() == pytest.approx(math.log1p(math.exp(-0.793147)), abs=1e-6)
    assert plain.losses.item() == pytest.approx(0.373230, abs=1e-6)
    assert plain.metrics["kl/data"].item() == pytest.approx(0.5)
    with_kl = odpo.compute(inputs, {"kl_coef": 0.2})
    assert with_kl.losses.item() == pytest.approx(0.473230, abs=1e-6)
    # The term carries gradient to the policy: d/d logp(y_w) gains kl_coef / 2.
    policy_chosen = one(-10.0).requires_grad_()
    inputs.policy_chosen_logps = policy_chosen
    grads = []
    for coef in (0.0, 0.2):
        (grad,) = torch.autograd.grad(odpo.compute(inputs, {"kl_coef": coef}).loss, policy_chosen)
        grads.append(grad.item())
    assert grads[1] - grads[0] == pytest.approx(0.1, abs=1e-12)


def test_odpo_kl_term_in_the_training_step(tiny_dir, other_model_dir, pairs_file, tmp_path):
    config = make_config(
        tiny_dir,
        pairs_file,
        tmp_path,
        method="odpo",
        kl_coef=0.5,
        reference=str(other_model_dir),
        reference_mode="model",
    )
    trainer = Trainer(config)
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        out = trainer.procedure.batch_loss(trainer._context("train"), batch)
    rows = [trainer.train_data.dataset[i] for i in batch["index"].tolist()]
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(other_model_dir))
    pc, pr = (completion_logps(policy, rows, f"{s}_input_ids") for s in ("chosen", "rejected"))
    rc, rr = (completion_logps(reference, rows, f"{s}_input_ids") for s in ("chosen", "rejected"))
    offsets = odpo_offsets(batch["score_chosen"], batch["score_rejected"])
    kl = ((pc - rc) + (pr - rr)) / 2  # (B,)
    expected = odpo_loss(pc, pr, rc, rr, offsets).losses + 0.5 * kl
    assert out.loss.item() == pytest.approx(expected.mean().item(), abs=1e-5)
    assert out.metrics["kl/data"].item() == pytest.approx(kl.mean().item(), abs=1e-5)
    assert abs(kl.mean().item()) > 1e-2  # policy and reference differ: the term is not 0


# ---- SLiC's sampled y_ref -----------------------------------------------------------------------


SAMPLED = dict(method="slic", target="reference_sample", max_new_tokens=6, lam=0.5)


def test_slic_reference_samples_and_loss_equal_a_direct_computation(tiny_dir, pairs_file, tmp_path):
    trainer = Trainer(make_config(tiny_dir, pairs_file, tmp_path, **SAMPLED))
    dataset = trainer.train_data.dataset
    cache = tmp_path / "run" / "reference_samples" / "train.jsonl"
    assert cache.exists()
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    direct = generate_completions(
        model, tokenizer, dataset["prompt_input_ids"], max_new_tokens=6, seed=42
    )
    assert dataset["target_input_ids"] == direct
    assert len({tuple(t) for t in direct}) > 1  # real samples, not one repeated string

    batch = next(iter(trainer.train_loader))
    n = batch["index"].shape[0]
    assert batch["input_ids"].shape[0] == 3 * n  # chosen, rejected, target rows
    with torch.no_grad():
        out = trainer.procedure.batch_loss(trainer._context("train"), batch)
    rows = [dataset[i] for i in batch["index"].tolist()]
    chosen, rejected, target = (
        completion_logps(model, rows, f"{name}_input_ids")
        for name in ("chosen", "rejected", "target")
    )
    for row, i in zip(rows, range(2 * n, 3 * n), strict=True):  # the third block is prompt + y_ref
        length = len(row["prompt_input_ids"]) + len(row["target_input_ids"])
        assert batch["input_ids"][i, :length].tolist() == (
            row["prompt_input_ids"] + row["target_input_ids"]
        )
    expected = slic_loss(chosen, rejected, target, delta=1.0, lam=0.5)
    assert out.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)
    assert out.metrics["logps/target"].item() == pytest.approx(target.mean().item(), abs=1e-5)
    assert not torch.allclose(target, chosen)  # y_ref is not y_w here


def test_slic_samples_are_reused_on_resume_and_redrawn_when_settings_change(
    tiny_dir, pairs_file, tmp_path, monkeypatch
):
    first = train(make_config(tiny_dir, pairs_file, tmp_path, save_steps=2, **SAMPLED))
    cache = tmp_path / "run" / "reference_samples" / "train.jsonl"
    written = cache.read_text()

    def no_sampling(*args, **kwargs):
        raise AssertionError("sampled again")

    monkeypatch.setattr(slic_step, "draw_samples", no_sampling)
    resumed = train(
        make_config(tiny_dir, pairs_file, tmp_path, resume=True, **{**SAMPLED, "max_steps": 3})
    )
    assert first.global_step == 2 and resumed.global_step == 3
    assert cache.read_text() == written
    # a forced resume of the same run directory, past the step it finished at (3)
    changed = {**SAMPLED, "temperature": 0.7, "max_steps": 4}
    with pytest.raises(AssertionError, match="sampled again"):
        Trainer(make_config(tiny_dir, pairs_file, tmp_path, resume="force", **changed))
