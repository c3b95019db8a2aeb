"""Every row (or token) of an optimizer step weighs the same, and metrics are pooled by counts
(issue 11 section 1).

The repro of the issue: 3 pairs, batch 4 x accumulation 1 / 2 x 2 / 1 x 4 gave step-3 losses
0.528684 / 0.534103 / 0.528707 when each micro-batch's mean was divided by the accumulation
count; they must agree to 1e-6. Two processes must equal one when the processes' micro-batches
hold different numbers of tokens. KTO's per-label metrics are means over the step's rows of that
label, equal to a direct computation.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit import train
from dpokit.config import TrainConfig
from dpokit.engine import Trainer
from dpokit.metrics import Difference, MetricAverager, Pooled, read_metrics
from dpokit.recipes.sft import run_sft
from helpers import train_config
from multiproc import child_env, free_port, run, torchrun_command

REPRO = dict(max_steps=3, shuffle=False, learning_rate=0.01, lr_scheduler="constant")
SPLITS = [(4, 1), (2, 2), (1, 4)]


def write_jsonl(path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def pair_rows() -> list[dict]:
    """3 pairs of different lengths (a short micro-batch is then visible in the loss)."""
    return [
        {"prompt": "Human: apples? Assistant:", "chosen": " yes.", "rejected": " no, never."},
        {
            "prompt": "Human: Do you like the fox? Assistant:",
            "chosen": " yes, I like the fox very much.",
            "rejected": " no.",
        },
        {"prompt": "Human: Paris? Assistant:", "chosen": " yes, Paris!", "rejected": " no way."},
    ]


def sft_rows() -> list[dict]:
    """SFT rows whose completions differ a lot in length (tokens, not rows, are the unit)."""
    answers = [" yes.", " yes, I like apples and bananas and cherries today.", " no.", " yes!"]
    answers += [" no, I do not like the dog, nor the fox, nor France.", " ok."]
    prompts = [f"Human: question {i}? Assistant:" for i in range(len(answers))]
    return [{"prompt": p, "completion": a} for p, a in zip(prompts, answers, strict=True)]


def final_weights(final_dir) -> dict[str, torch.Tensor]:
    model = AutoModelForCausalLM.from_pretrained(str(final_dir))
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def assert_same_runs(results) -> None:
    """Equal logged losses at every step (1e-6) and equal final weights."""
    losses = [[r["loss"] for r in result.history if r["split"] == "train"] for result in results]
    for other in losses[1:]:
        assert other == pytest.approx(losses[0], abs=1e-6, rel=0)
    weights = [final_weights(result.final_dir) for result in results]
    for other in weights[1:]:
        for name, value in weights[0].items():
            torch.testing.assert_close(other[name], value, rtol=0, atol=1e-5)  # Adam: noise x lr


def test_uneven_micro_batches_weigh_every_pair_the_same(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "pairs.jsonl", pair_rows())
    results = []
    for batch_size, steps in SPLITS:
        out = tmp_path / f"b{batch_size}"
        config = train_config(
            tiny_dir,
            data,
            out,
            tmp_path / "cache",
            batch_size=batch_size,
            gradient_accumulation_steps=steps,
            **REPRO,
        )
        results.append(train(config))
    assert len(results[0].history) == 3
    assert results[0].history[-1]["loss"] < math.log(2) - 0.01  # it trained
    assert_same_runs(results)


def test_sft_every_token_of_a_step_weighs_the_same(tiny_dir, tmp_path):
    """6 rows of very different lengths: batch 6 x 1 == 3 x 2 == 2 x 3 == 1 x 6 (per-token)."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    results = []
    for batch_size, steps in [(6, 1), (3, 2), (2, 3), (1, 6)]:
        out = tmp_path / f"b{batch_size}"
        config = train_config(
            tiny_dir,
            data,
            out,
            tmp_path / "cache",
            batch_size=batch_size,
            gradient_accumulation_steps=steps,
            **REPRO,
        )
        results.append(run_sft(config))
    assert_same_runs(results)


# ---- metrics pooled by counts -----------------------------------------------------------------


def test_metric_averager_pools_sums_and_counts():
    averager = MetricAverager()
    # micro-batch 1: 3 rows, one desirable; micro-batch 2: 1 row, desirable, no undesirable
    averager.add(
        {
            "loss": torch.tensor(1.0),
            "d": Pooled(torch.tensor(-90.0), torch.tensor(1)),
            "u": Pooled(torch.tensor(-6.0), torch.tensor(2)),
            "margin": Difference("d", "u"),
            "never": Pooled(torch.tensor(0.0), torch.tensor(0)),
        },
        count=3,
    )
    averager.add(
        {
            "loss": torch.tensor(3.0),
            "d": Pooled(torch.tensor(-10.0), torch.tensor(1)),
            "u": Pooled(torch.tensor(0.0), torch.tensor(0)),
            "margin": Difference("d", "u"),
            "never": Pooled(torch.tensor(0.0), torch.tensor(0)),
        },
        count=1,
    )
    record = averager.mean()
    assert record["loss"] == pytest.approx((1.0 * 3 + 3.0 * 1) / 4)  # by rows: 1.5, not 2
    assert record["d"] == pytest.approx(-50.0)  # (-90 - 10) / 2, not a mean of group means
    assert record["u"] == pytest.approx(-3.0)
    assert record["margin"] == pytest.approx(-47.0)
    assert "never" not in record  # no rows in the step: left out, not NaN
    assert averager.mean() == {}  # reset


def unpaired_rows() -> list[dict]:
    """6 rows labelled D,U,U,D,D,D; the first desirable completion much longer than the rest."""
    long = " yes, I like apples and bananas and cherries and the fox and the dog and Paris " * 3
    labels = [True, False, False, True, True, True]
    completions = [long, " no.", " no!", " yes.", " yes!", " ok."]
    return [
        {"prompt": f"Human: question {i}? Assistant:", "completion": c, "label": label}
        for i, (c, label) in enumerate(zip(completions, labels, strict=True))
    ]


@torch.no_grad()
def direct_logps(model_dir, dataset) -> torch.Tensor:
    """(N,) summed completion log-probs of every prepared row, from full logits."""
    model = AutoModelForCausalLM.from_pretrained(str(model_dir)).eval()
    out = []
    for row in dataset:
        prompt, completion = list(row["prompt_input_ids"]), list(row["completion_input_ids"])
        ids = torch.tensor([prompt + completion])
        logprobs = model(ids).logits[0, :-1].float().log_softmax(-1)  # (T-1, V)
        targets = ids[0, 1:]
        token = logprobs.gather(1, targets[:, None]).squeeze(1)[len(prompt) - 1 :]
        out.append(float(token.sum()))
    return torch.tensor(out, dtype=torch.float64)


def kto_config(tiny_dir, data, out, cache, batch_size, steps, max_steps=1) -> TrainConfig:
    return train_config(
        tiny_dir,
        data,
        out,
        cache,
        method="kto",
        batch_size=batch_size,
        gradient_accumulation_steps=steps,
        max_steps=max_steps,
        shuffle=False,
    )


def test_kto_group_metrics_are_pooled_over_micro_batches(tiny_dir, tmp_path):
    data = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows())
    records = {}
    for batch_size, steps in [(6, 1), (3, 2)]:
        config = kto_config(
            tiny_dir, data, tmp_path / f"b{batch_size}", tmp_path / "cache", batch_size, steps
        )
        trainer = Trainer(config)
        dataset = trainer.train_data.dataset
        records[batch_size] = trainer.train().history[0]
    logps = direct_logps(tiny_dir, dataset)  # the step-1 forward runs on the starting weights
    desirable = torch.tensor([bool(label) for label in dataset["label"]])
    assert desirable.tolist() == [True, False, False, True, True, True]
    expected = {
        "logps/desirable": float(logps[desirable].mean()),
        "logps/undesirable": float(logps[~desirable].mean()),
    }
    # The long first row makes a mean of the two micro-batches' group means far off.
    group_means = (logps[:1].mean() + logps[3:].mean()) / 2
    assert abs(float(group_means) - expected["logps/desirable"]) > 1.0
    for record in records.values():
        for name, value in expected.items():
            assert record[name] == pytest.approx(value, rel=1e-5, abs=1e-4), name
        assert record["rewards/margins"] == pytest.approx(
            record["rewards/desirable"] - record["rewards/undesirable"], abs=1e-9
        )


def test_a_metric_without_rows_in_a_step_is_left_out(tiny_dir, tmp_path):
    """Step 2 (rows D,D,D) has no undesirable example: no logps/undesirable, no NaN."""
    data = write_jsonl(tmp_path / "unpaired.jsonl", unpaired_rows())
    config = kto_config(tiny_dir, data, tmp_path / "run", tmp_path / "cache", 3, 1, max_steps=2)
    Trainer(config).train()
    step1, step2 = [r for r in read_metrics(tmp_path / "run") if r["split"] == "train"]
    assert "logps/undesirable" in step1 and "rewards/margins" in step1
    assert "logps/undesirable" not in step2 and "rewards/undesirable" not in step2
    assert "rewards/margins" not in step2 and "logps/desirable" in step2
    assert all(not (isinstance(v, float) and math.isnan(v)) for v in step2.values())


# ---- several processes ------------------------------------------------------------------------


def test_two_processes_equal_one_with_uneven_tokens_and_a_short_step(tiny_dir, tmp_path):
    """SFT on 6 rows of very different lengths: 2 processes x batch 1 x accumulation 2 (each
    process's micro-batches hold different token counts; the epoch's last step is one
    micro-batch per process) == 1 process x batch 4."""
    data = write_jsonl(tmp_path / "sft.jsonl", sft_rows())
    values = dict(
        model=str(tiny_dir),
        data=data,
        learning_rate=0.01,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_steps=3,
        shuffle=False,
        max_length=64,
        max_prompt_length=32,
        progress=False,
    )
    two_dir = tmp_path / "two"
    args = ["sft", "--model", str(tiny_dir), "--data", data, "--output-dir", str(two_dir)]
    args += [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in values.items()
             if k not in ("model", "data")]  # fmt: skip
    args += ["batch_size=1", "gradient_accumulation_steps=2"]
    run(torchrun_command(2, free_port(), args), child_env(tmp_path))
    one = run_sft(
        TrainConfig.from_dict(dict(values, output_dir=str(tmp_path / "one"), batch_size=4))
    )
    expected = [r["loss"] for r in one.history if r["split"] == "train"]
    two = [r["loss"] for r in read_metrics(two_dir) if r["split"] == "train"]
    assert two == pytest.approx(expected, abs=1e-5, rel=0)
    two_weights = final_weights(two_dir / "final")
    for name, value in final_weights(one.final_dir).items():
        torch.testing.assert_close(two_weights[name], value, rtol=0, atol=1e-5, msg=name)
