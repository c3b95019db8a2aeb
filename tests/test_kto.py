"""KTO in `dpokit train`: unpaired data, the mismatched-pair baseline z0, weights, resume."""

from __future__ import annotations

import json
import logging
import random
import warnings

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit import train
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError, prepare_pairs
from dpokit.data.unpaired import mismatched_partners, prepare_unpaired
from dpokit.engine import Trainer
from dpokit.logprobs import CompletionScorer
from dpokit.losses import get_method, kto_kl_baseline, kto_loss
from dpokit.metrics import read_metrics
from dpokit.reference import choose_reference_mode
from dpokit.steps.kto import check_kto_config, mismatched_kl_baseline
from helpers import make_config

TOPICS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]


def write_unpaired(path, rows: int = 24, desirable_every: int = 2, seed: int = 0) -> str:
    """An easy set: desirable completions say 'yes ...', undesirable ones 'no ...'."""
    rng = random.Random(seed)
    with open(path, "w") as handle:
        for i in range(rows):
            topic = rng.choice(TOPICS)
            good = i % desirable_every == 0
            completion = f" yes, I like {topic}." if good else f" no, I do not like {topic}!"
            row = {"prompt": f"Human: Do you like {topic}? Assistant:", "completion": completion}
            handle.write(json.dumps({**row, "label": good}) + "\n")
    return str(path)


def write_pairs(path, rows: int = 8) -> str:
    with open(path, "w") as handle:
        for i in range(rows):
            topic = TOPICS[i % len(TOPICS)]
            row = {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


@pytest.fixture(scope="module")
def unpaired_file(tmp_path_factory):
    return write_unpaired(tmp_path_factory.mktemp("kto-data") / "unpaired.jsonl")


def kto_config(tiny_dir, data, tmp_path, **overrides) -> TrainConfig:
    return make_config(tiny_dir, data, tmp_path, **{"method": "kto", **overrides})


def score_rows(model, sequences: list[tuple[list[int], list[int]]]) -> torch.Tensor:
    """log pi(completion | prompt) of each (prompt, completion), one sequence at a time. (N,)"""
    scorer = CompletionScorer(model)
    out = []
    with torch.no_grad():
        for prompt, completion in sequences:
            ids = torch.tensor([prompt + completion])
            mask = torch.zeros_like(ids, dtype=torch.bool)
            mask[0, len(prompt) :] = True
            out.append(scorer(ids, torch.ones_like(ids), mask).logps[0])
    return torch.stack(out)


# ---- data ---------------------------------------------------------------------------------------


def test_paired_data_converts_to_one_desirable_and_one_undesirable_example(
    tiny_tokenizer, tmp_path, caplog
):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=8)
    pairs = prepare_pairs(data, tiny_tokenizer).dataset
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        examples = prepare_unpaired(data, tiny_tokenizer).dataset
    assert "converted 8 preference pairs" in caplog.text
    assert "8 desirable (prompt, chosen) and 8 undesirable (prompt, rejected)" in caplog.text
    assert len(examples) == 16
    assert examples["label"] == [True, False] * 8
    assert examples["index"] == list(range(16))
    for i, pair in enumerate(pairs):
        desirable, undesirable = examples[2 * i], examples[2 * i + 1]
        assert desirable["prompt_input_ids"] == undesirable["prompt_input_ids"]
        assert desirable["prompt_input_ids"] == pair["prompt_input_ids"]
        assert desirable["completion_input_ids"] == pair["chosen_input_ids"]
        assert undesirable["completion_input_ids"] == pair["rejected_input_ids"]
    # Every mismatched completion is another example's completion for ANOTHER prompt.
    by_completion = {}
    for row in examples:
        by_completion.setdefault(tuple(row["completion_input_ids"]), set()).add(
            tuple(row["prompt_input_ids"])
        )
    for row in examples:
        prompts = by_completion[tuple(row["kl_completion_input_ids"])]
        assert prompts and tuple(row["prompt_input_ids"]) not in prompts


def test_mismatched_partners_rotate_a_seeded_order_and_skip_same_prompts():
    # Distinct prompts: in the seeded order, each row takes the completion of the row before it.
    order = np.random.default_rng(3).permutation(6)
    partner = mismatched_partners(list("abcdef"), seed=3)
    assert [partner[order[k]] for k in range(6)] == [order[k - 1] for k in range(6)]
    # Repeated prompts are skipped: no mismatched pair is a real answer to its prompt.
    keys = ["a", "a", "b", "c", "c", "d"]
    partner = mismatched_partners(keys, seed=3)
    assert all(keys[p] != keys[i] for i, p in enumerate(partner))


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"prompt": "Q?", "completion": " yes", "label": "yes"}, "'label' must be true or false"),
        ({"prompt": "Q?", "completion": " ", "label": False}, "empty completion"),
        ({"prompt": "Q?", "completion": " no", "label": None}, "missing field 'label'"),
    ],
)
def test_bad_unpaired_rows_name_the_line(bad, message, tiny_tokenizer, tmp_path):
    ok = {"prompt": "Q?", "completion": " yes", "label": True}
    path = tmp_path / "bad.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in [ok, ok, bad, ok]))
    with pytest.raises(DataError, match=rf"bad.jsonl, line 3: .*{message}"):
        prepare_unpaired(str(path), tiny_tokenizer)


def test_batch_size_one_is_refused_before_any_model_loads(tmp_path):
    config = TrainConfig.from_dict(
        {"method": "kto", "model": "no/such/model", "data": "x.jsonl", "batch_size": 1}
    )
    with pytest.raises(ConfigError, match=r"batch_size=1 per process .* z0"):
        Trainer(config)  # raises before touching the (missing) model
    zero = kto_config("no/such/model", "x.jsonl", tmp_path, batch_size=1, kl_baseline="zero")
    check_kto_config(zero, get_method("kto"))  # z0 = 0 needs no mismatched pairs: allowed


def test_weight_balance_warning_suggests_weights(tiny_dir, tmp_path):
    data = write_unpaired(tmp_path / "skewed.jsonl", rows=12, desirable_every=4)  # 3 vs 9
    with pytest.warns(UserWarning, match=r"= 0\.333 is outside .*\[1, 4/3\].*desirable_weight=3 "):
        Trainer(kto_config(tiny_dir, data, tmp_path))
    balanced = kto_config(
        tiny_dir, data, tmp_path, desirable_weight=3.5, overwrite=True
    )  # 3.5*3/9 = 1.17
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message="KTO balance")
        Trainer(balanced)


# ---- the baseline z0 --------------------------------------------------------------------------


def test_z0_and_loss_equal_a_hand_computation(tiny_dir, other_model_dir, unpaired_file, tmp_path):
    config = kto_config(
        tiny_dir, unpaired_file, tmp_path, reference=str(other_model_dir), reference_mode="model"
    )
    trainer = Trainer(config)
    batch = next(iter(trainer.train_loader))
    with torch.no_grad():
        out = trainer.procedure.batch_loss(trainer._context("train"), batch)

    rows = [trainer.train_data.dataset[i] for i in batch["index"].tolist()]
    policy = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(other_model_dir))
    mismatched = [(r["prompt_input_ids"], r["kl_completion_input_ids"]) for r in rows]
    matched = [(r["prompt_input_ids"], r["completion_input_ids"]) for r in rows]
    logratios = score_rows(policy, mismatched) - score_rows(reference, mismatched)  # (B,)
    z0 = max(0.0, float(logratios.mean()))
    assert out.metrics["kl/mismatched"].item() == pytest.approx(float(logratios.mean()), abs=1e-4)
    assert out.metrics["kl_baseline"].item() == pytest.approx(z0, abs=1e-4)
    assert float(kto_kl_baseline(*[score_rows(m, mismatched) for m in (policy, reference)])) == (
        pytest.approx(z0, abs=1e-4)
    )
    desirable = torch.tensor([r["label"] for r in rows])
    expected = kto_loss(
        score_rows(policy, matched), score_rows(reference, matched), desirable, z0, beta=0.1
    )
    assert out.loss.item() == pytest.approx(expected.loss.item(), abs=1e-5)
    rho = score_rows(policy, matched) - score_rows(reference, matched)
    correct = torch.where(desirable, rho > z0, rho < z0)
    assert out.correct.tolist() == correct.tolist()
    assert out.metrics["rewards/desirable"].item() == pytest.approx(
        0.1 * float(rho[desirable].mean()), abs=1e-5
    )


def test_precomputed_reference_gives_the_online_step(
    tiny_dir, other_model_dir, unpaired_file, tmp_path
):
    steps = {}
    for mode in ("model", "precomputed"):
        config = kto_config(
            tiny_dir,
            unpaired_file,
            tmp_path,
            reference=str(other_model_dir),
            reference_mode=mode,
            overwrite=True,
        )
        trainer = Trainer(config)
        batch = next(iter(trainer.train_loader))
        with torch.no_grad():
            steps[mode] = trainer.procedure.batch_loss(trainer._context("train"), batch)
    for name in ("loss", "kl_baseline", "kl/mismatched", "rewards/desirable"):
        assert steps["precomputed"].metrics[name].item() == pytest.approx(
            steps["model"].metrics[name].item(), abs=1e-5
        ), name
    auto = kto_config(tiny_dir, unpaired_file, tmp_path)
    assert choose_reference_mode(auto, get_method("kto")) == "precomputed"


def test_z0_is_averaged_over_every_process():
    """Sums and counts are reduced: z0 is the mean over all processes' mismatched pairs."""
    policy = torch.tensor([-3.0, -5.0])
    reference = torch.tensor([-4.0, -4.0])  # this process: log-ratios +1, -1
    other = torch.tensor([2.0 + 0.5, 1.0], dtype=torch.float64)  # another: sum 2.5 over 1 pair

    class TwoProcesses:
        num_processes = 2

        def reduce(self, tensor, reduction):
            assert reduction == "sum"
            return tensor + other

    z0, unclamped = mismatched_kl_baseline(policy, reference, TwoProcesses())
    assert unclamped.item() == pytest.approx((1.0 - 1.0 + 2.5) / 3)
    assert z0.item() == pytest.approx(2.5 / 3) and not z0.requires_grad
    z0_single, _ = mismatched_kl_baseline(policy - 1.0, reference)  # mean -1: clamped at 0
    assert z0_single.item() == 0.0


# ---- training -----------------------------------------------------------------------------------


def test_desirable_rewards_rise_and_undesirable_fall(tiny_dir, unpaired_file, tmp_path):
    config = kto_config(
        tiny_dir, unpaired_file, tmp_path, max_steps=12, eval_fraction=0.25, eval_steps=12
    )
    result = train(config)
    first = result.history[0]
    evaluation = [r for r in result.history if r["split"] == "eval"][-1]
    assert first["loss"] == pytest.approx(0.5, abs=1e-4)  # policy == reference: sigmoid(0)
    assert abs(first["rewards/desirable"]) < 1e-3 and abs(first["rewards/undesirable"]) < 1e-3
    assert evaluation["rewards/desirable"] > 0.1
    assert evaluation["rewards/undesirable"] < -0.1
    assert evaluation["rewards/accuracies"] > 0.9
    logged = read_metrics(result.output_dir)[0]
    for key in ("loss", "kl_baseline", "rewards/desirable", "rewards/undesirable", "grad_norm"):
        assert key in logged, key


def test_resumed_run_equals_uninterrupted(tiny_dir, unpaired_file, tmp_path):
    full = train(kto_config(tiny_dir, unpaired_file, tmp_path / "full", max_steps=4, shuffle=True))

    def make(**kw):
        return kto_config(
            tiny_dir, unpaired_file, tmp_path / "split", shuffle=True, save_steps=2, **kw
        )

    train(make(max_steps=2))
    resumed = train(make(max_steps=4, resume=True))
    losses = [r["loss"] for r in full.history]
    assert [r["loss"] for r in resumed.history] == pytest.approx(losses[2:], rel=1e-6)
    baselines = [r["kl_baseline"] for r in full.history]
    assert [r["kl_baseline"] for r in resumed.history] == pytest.approx(
        baselines[2:], rel=1e-5, abs=1e-6
    )
    assert max(baselines[2:]) > 0  # the policy has moved: z0 is no longer 0


def test_kto_end_to_end_through_the_cli(tiny_dir, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=8)  # pairs: converted on the way
    out = tmp_path / "run"
    argv = ["train", "--method", "kto", "--model", str(tiny_dir), "--data", data]
    argv += ["--output-dir", str(out), "max_steps=2", "batch_size=4", "progress=false"]
    argv += [f"reference_cache_dir={tmp_path / 'cache'}", "max_length=64", "max_prompt_length=32"]
    argv += ["desirable_weight=1.2"]
    assert main(argv) == 0
    assert (out / "final" / "model.safetensors").exists()
    records = read_metrics(out)
    assert [r["step"] for r in records] == [1, 2]
    assert "desirable_weight: 1.2" in (out / "config.yaml").read_text()
