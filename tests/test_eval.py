"""Evaluation: implicit-reward metrics by hand, win rate, log-probs, KL, and `dpokit eval`."""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.cli import main
from dpokit.data.sft import SFTCollator
from dpokit.evaluation import (
    completion_logps,
    evaluate,
    format_table,
    pair_metrics,
    sample,
    win_rate,
)
from dpokit.logprobs import full_logits_logps

PAIRS = [
    {"prompt": "Do you like apples?", "chosen": " yes, I like apples.", "rejected": " no."},
    {"prompt": "Hello there!", "chosen": " How are you doing today?", "rejected": " bad"},
    {"prompt": "What is the capital of France?", "chosen": " Paris.", "rejected": " no"},
]


def test_pair_metrics_by_hand():
    policy = torch.tensor([[-10.0, -12.0], [-5.0, -4.0], [-3.0, -3.0]])  # (N, 2) chosen, rejected
    reference = torch.tensor([[-11.0, -11.0], [-5.0, -5.0], [-3.0, -3.0]])
    metrics = pair_metrics(policy, reference)
    # ratios: (+1, -1), (0, +1), (0, 0) -> margins 2, -1, 0 -> accuracy (1 + 0 + 0.5) / 3
    assert metrics["reward_accuracy"] == pytest.approx(0.5)
    assert metrics["reward_margin"] == pytest.approx(1 / 3)
    assert metrics["chosen_logp_change"] == pytest.approx(1 / 3)
    assert metrics["rejected_logp_change"] == pytest.approx(0.0)


def test_win_rate_counts_ties_half():
    assert win_rate([1.0, 0.5, 0.0, 0.2], [0.0, 0.5, 1.0, 0.1]) == pytest.approx(2.5 / 4)
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_completion_logps_match_full_logits(tiny_model, tiny_tokenizer):
    prompts = [[5, 6, 7], [8]]
    completions = [[9, 10, 2], [11, 2]]
    logps = completion_logps(tiny_model, prompts, completions, tiny_tokenizer.pad_token_id)
    rows = [
        {"prompt_input_ids": p, "completion_input_ids": c, "index": i}
        for i, (p, c) in enumerate(zip(prompts, completions, strict=True))
    ]
    batch = SFTCollator(tiny_tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        naive = full_logits_logps(
            tiny_model, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
    assert logps.tolist() == pytest.approx(naive.tolist(), abs=1e-5)


def test_a_model_against_itself(tiny_model, tiny_tokenizer):
    """Policy == reference: KL 0, every implicit reward 0 (accuracy 1/2), win rate 1/2."""

    def judge(text, prompt=None):
        return float(len(text))

    prompts = ["I like", "Hello there!"]
    baseline = sample(
        tiny_model, tiny_tokenizer, prompts, per_prompt=2, judge=judge, seed=5, max_new_tokens=6
    )
    result = evaluate(
        tiny_model,
        tiny_tokenizer,
        reference=tiny_model,
        pairs=PAIRS,
        prompts=prompts,
        judge=judge,
        baseline=baseline,
        per_prompt=2,
        max_new_tokens=6,
        seed=5,
    )
    metrics = result.metrics
    assert metrics["kl"] == 0.0
    assert metrics["reward_accuracy"] == 0.5
    assert metrics["chosen_logp_change"] == 0.0
    assert metrics["win_rate"] == 0.5  # same model, same seed: identical samples, all ties
    assert metrics["judge_reward"] == pytest.approx(sum(baseline.rewards) / 4)
    assert result.samples.prompts == ["I like", "I like", "Hello there!", "Hello there!"]
    assert metrics["pairs"] == 3 and metrics["samples"] == 4


def test_kl_is_the_mean_log_ratio_on_the_policy_samples(tiny_dir, tiny_tokenizer):
    from transformers import AutoModelForCausalLM

    policy = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    reference = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    with torch.no_grad():
        policy.lm_head.weight.mul_(3.0)  # a sharper policy
    result = evaluate(
        policy,
        tiny_tokenizer,
        reference=reference,
        prompts=["I like"],
        per_prompt=4,
        max_new_tokens=5,
        seed=1,
    )
    samples = result.samples
    pad = tiny_tokenizer.pad_token_id
    ratio = completion_logps(policy, samples.prompt_input_ids, samples.completion_input_ids, pad)
    ratio -= completion_logps(
        reference, samples.prompt_input_ids, samples.completion_input_ids, pad
    )
    assert result.metrics["kl"] == pytest.approx(float(ratio.mean()), rel=1e-6)
    assert result.metrics["kl"] != 0.0


def test_pairs_need_a_reference(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="needs a reference"):
        evaluate(tiny_model, tiny_tokenizer, pairs=PAIRS)


def test_format_table():
    table = format_table({"a": {"x": 0.12345, "y": 2}, "b": {"x": float("nan")}}, ["x", "y"])
    assert table.splitlines() == [
        "| | x | y |",
        "|---|---|---|",
        "| a | 0.123 | 2 |",
        "| b | - | - |",
    ]


def test_cli_eval_with_the_built_in_task(tiny_dir, tmp_path, capsys):
    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(json.dumps(row) + "\n" for row in PAIRS))
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(tiny_dir), "--reference", str(tiny_dir), "--baseline",
            str(tiny_dir), "--pairs", str(pairs), "--task", "review", "--per-prompt", "1",
            "--max-new-tokens", "4", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["samples"] == 60  # the task's held-out prompts, one sample each
    assert metrics["kl"] == 0.0 and metrics["reward_accuracy"] == 0.5 and metrics["win_rate"] == 0.5
    assert -1.0 <= metrics["judge_reward"] <= 1.0
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert len(rows) == 60 and set(rows[0]) == {"prompt", "completion", "reward"}
    assert json.loads(capsys.readouterr().out) == metrics


def test_cli_eval_reads_prompt_files_and_names_bad_lines(tiny_dir, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text('{"prompt": "I like"}\n{"text": "x"}\n')
    assert main(["eval", "--model", str(tiny_dir), "--prompts", str(prompts)]) == 2
    assert f"{prompts}, line 2" in capsys.readouterr().err
    text = tmp_path / "prompts.txt"
    text.write_text("I like\nHello there!\n")
    argv = ["eval", "--model", str(tiny_dir), "--prompts", str(text), "--max-new-tokens", "3",
            "--per-prompt", "1"]  # fmt: skip
    assert main(argv) == 0
    assert json.loads(capsys.readouterr().out)["samples"] == 2
