"""Evaluating a policy: implicit-reward accuracy, log-prob drift, samples, judge reward, KL.

All numbers come from real forward passes of saved models (any causal LM loaded by path):

- **reward accuracy** on held-out pairs: the fraction with r(y_w) > r(y_l), where
  r(y) = logp_pi(y) - logp_ref(y) is the implicit reward (up to the method's beta, which does not
  change the sign);
- **chosen / rejected log-prob change**: mean over held-out pairs of logp_pi(y) - logp_ref(y) for
  the chosen (rejected) answers -- DPO may let the chosen one fall (what DPOP fixes);
- **samples** on held-out prompts, and with a judge (a function of the text) their **mean reward**
  and the **win rate** against a baseline's samples on the same prompts (ties count half);
- **KL(pi || pi_ref)** estimated on the policy's own samples:
  mean_y~pi [ logp_pi(y) - logp_ref(y) ], log-probs summed over completion tokens.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dpokit.data import DataConfig, PairCollator, prepare_pairs
from dpokit.data.sft import SFTCollator
from dpokit.generation import generate_completions
from dpokit.logprobs import CompletionScorer
from dpokit.modeling import load_model, load_tokenizer
from dpokit.reference import eval_mode

logger = logging.getLogger("dpokit")


@torch.no_grad()
def _score(model, batches) -> list[torch.Tensor]:
    """Summed completion log-probs of each collated batch, in eval mode. [(N_b,) fp32, ...]"""
    scorer = model if isinstance(model, CompletionScorer) else CompletionScorer(model)
    device = next(scorer.parameters()).device
    out = []
    with eval_mode(scorer):
        for batch in batches:
            score = scorer(
                batch["input_ids"].to(device),
                batch["attention_mask"].to(device),
                batch["completion_mask"].to(device),
            )
            out.append(score.logps.float().cpu())
    return out


def completion_logps(
    model,
    prompt_input_ids: Sequence[Sequence[int]],
    completion_input_ids: Sequence[Sequence[int]],
    pad_token_id: int,
    batch_size: int = 32,
) -> torch.Tensor:
    """Summed log-prob of each completion given its prompt. Returns (N,) fp32."""
    rows = [
        {"prompt_input_ids": p, "completion_input_ids": c, "index": i}
        for i, (p, c) in enumerate(zip(prompt_input_ids, completion_input_ids, strict=True))
    ]
    collate = SFTCollator(pad_token_id)
    batches = (collate(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size))
    out = _score(model, batches)
    return torch.cat(out) if out else torch.zeros(0)


def pair_logps(model, prepared, pad_token_id: int, batch_size: int = 32) -> torch.Tensor:
    """(N, 2) summed log-probs of (chosen, rejected) for every row of prepared pairs."""
    dataset, collate = prepared.dataset, PairCollator(pad_token_id)
    batches = (
        collate([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))])
        for i in range(0, len(dataset), batch_size)
    )
    # Each batch scores B chosen rows, then B rejected rows: (2B,) -> (B, 2).
    return torch.cat([logps.view(2, -1).T for logps in _score(model, batches)])


def pair_metrics(policy_logps: torch.Tensor, reference_logps: torch.Tensor) -> dict[str, float]:
    """From (N, 2) policy and reference log-probs of (chosen, rejected):

    reward_accuracy = mean[ r_w > r_l ],  r = logp_pi - logp_ref (ties count half)
    chosen_logp_change = mean[ logp_pi(y_w) - logp_ref(y_w) ], rejected likewise
    reward_margin = mean[ r_w - r_l ]
    """
    ratios = policy_logps - reference_logps  # (N, 2)
    margin = ratios[:, 0] - ratios[:, 1]  # (N,)
    accuracy = (margin > 0).float() + 0.5 * (margin == 0).float()
    return {
        "reward_accuracy": float(accuracy.mean()),
        "reward_margin": float(margin.mean()),
        "chosen_logp_change": float(ratios[:, 0].mean()),
        "rejected_logp_change": float(ratios[:, 1].mean()),
    }


def win_rate(rewards: Sequence[float], baseline_rewards: Sequence[float]) -> float:
    """Fraction of positions where reward > baseline (same prompt, same position); ties half."""
    if len(rewards) != len(baseline_rewards) or not rewards:
        raise ValueError("win_rate needs two equally long, non-empty lists of rewards")
    wins = sum(
        1.0 if a > b else 0.5 if a == b else 0.0
        for a, b in zip(rewards, baseline_rewards, strict=True)
    )
    return wins / len(rewards)


@dataclass
class Samples:
    """Completions of one model on a list of prompts (each prompt repeated ``per_prompt`` times)."""

    prompts: list[str]
    prompt_input_ids: list[list[int]]
    completion_input_ids: list[list[int]]
    texts: list[str]
    rewards: list[float] | None = None

    def to_rows(self) -> list[dict]:
        """One ``{"prompt", "completion"[, "reward"]}`` dict per sample."""
        rows = [
            {"prompt": p, "completion": t} for p, t in zip(self.prompts, self.texts, strict=True)
        ]
        for row, reward in zip(rows, self.rewards or [], strict=False):
            row["reward"] = reward
        return rows


def sample(
    model,
    tokenizer,
    prompts: Sequence[str],
    *,
    per_prompt: int = 1,
    judge: Callable[[str, str], float] | None = None,
    max_new_tokens: int = 24,
    temperature: float = 1.0,
    batch_size: int = 64,
    seed: int = 0,
    progress: str | None = None,
) -> Samples:
    """Sample ``per_prompt`` completions per prompt (prompt-major order) and judge them."""
    from dpokit.generation import encode_prompts

    repeated = [p for p in prompts for _ in range(per_prompt)]
    prompt_ids = encode_prompts(tokenizer, repeated)
    completions = generate_completions(
        model,
        tokenizer,
        prompt_ids,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
    )
    texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
    rewards = (
        [judge(t, p) for t, p in zip(texts, repeated, strict=True)] if judge is not None else None
    )
    return Samples(repeated, prompt_ids, completions, texts, rewards)


def sample_kl(model, reference, samples: Samples, pad_token_id: int) -> float:
    """KL(pi || pi_ref) ~= mean over the policy's samples of logp_pi(y) - logp_ref(y).

    Samples cut at ``max_new_tokens`` are scored as they are (the estimate is of the truncated
    distribution's KL, which is what both models were compared on).
    """
    policy = completion_logps(
        model, samples.prompt_input_ids, samples.completion_input_ids, pad_token_id
    )
    ref = completion_logps(
        reference, samples.prompt_input_ids, samples.completion_input_ids, pad_token_id
    )
    return float((policy - ref).mean())


@dataclass
class EvalResult:
    """What :func:`evaluate` returns: scalar ``metrics`` and the ``samples`` they came from."""

    metrics: dict[str, float] = field(default_factory=dict)
    samples: Samples | None = None

    def save(self, out_dir: str | Path) -> None:
        """``out_dir/metrics.json`` and, with samples, ``out_dir/samples.jsonl``."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(self.metrics, indent=2) + "\n")
        if self.samples is not None:
            with (out_dir / "samples.jsonl").open("w") as handle:
                for row in self.samples.to_rows():
                    handle.write(json.dumps(row) + "\n")


def evaluate(
    model,
    tokenizer,
    *,
    reference=None,
    pairs=None,
    prompts: Sequence[str] | None = None,
    judge: Callable[[str, str], float] | None = None,
    baseline: Samples | None = None,
    per_prompt: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    max_length: int = 256,
    progress: str | None = None,
) -> EvalResult:
    """Everything that applies given what is passed.

    ``pairs`` (a file or rows of held-out preference pairs) + ``reference``: reward accuracy,
    margin, chosen/rejected log-prob change. ``prompts``: samples; + ``judge``: mean judge reward;
    + ``baseline`` (another model's judged samples on the same prompts, same ``per_prompt``): win
    rate; + ``reference``: KL(pi || pi_ref) on the samples. ``model``/``reference``: loaded models.
    """
    pad_id = (
        tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    )
    result = EvalResult()
    metrics = result.metrics
    if pairs is not None:
        if reference is None:
            raise ValueError("reward accuracy on pairs needs a reference model (--reference)")
        config = DataConfig(max_length=max_length, max_prompt_length=max_length // 2)
        prepared = prepare_pairs(pairs, tokenizer, config)
        metrics.update(
            pair_metrics(
                pair_logps(model, prepared, pad_id), pair_logps(reference, prepared, pad_id)
            )
        )
        metrics["pairs"] = len(prepared)
    if prompts is not None:
        samples = sample(
            model,
            tokenizer,
            prompts,
            per_prompt=per_prompt,
            judge=judge,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress=progress,
        )
        result.samples = samples
        metrics["samples"] = len(samples.texts)
        metrics["mean_length"] = sum(len(c) for c in samples.completion_input_ids) / len(
            samples.texts
        )
        if samples.rewards is not None:
            metrics["judge_reward"] = sum(samples.rewards) / len(samples.rewards)
            if baseline is not None:
                if baseline.prompts != samples.prompts:
                    raise ValueError("the baseline's samples are on other prompts")
                metrics["win_rate"] = win_rate(samples.rewards, baseline.rewards)
        if reference is not None:
            metrics["kl"] = sample_kl(model, reference, samples, pad_id)
    return result


def evaluate_paths(
    model_path: str,
    *,
    reference_path: str | None = None,
    baseline_path: str | None = None,
    pairs=None,
    prompts: Sequence[str] | None = None,
    judge=None,
    per_prompt: int = 1,
    max_new_tokens: int = 24,
    seed: int = 0,
    progress: bool = True,
) -> EvalResult:
    """:func:`evaluate` on models loaded by path (``dpokit eval``); ``progress``: bars while the
    baseline and the model sample."""
    tokenizer = load_tokenizer(model_path)
    model = load_model(model_path, torch.float32)
    reference = load_model(reference_path, torch.float32) if reference_path else None
    baseline = None
    if baseline_path and prompts is not None and judge is not None:
        baseline_model = load_model(baseline_path, torch.float32)
        baseline = sample(
            baseline_model,
            tokenizer,
            prompts,
            per_prompt=per_prompt,
            judge=judge,
            max_new_tokens=max_new_tokens,
            seed=seed,
            progress="sampling (baseline)" if progress else None,
        )
    return evaluate(
        model,
        tokenizer,
        reference=reference,
        pairs=pairs,
        prompts=prompts,
        judge=judge,
        baseline=baseline,
        per_prompt=per_prompt,
        max_new_tokens=max_new_tokens,
        seed=seed,
        progress="sampling" if progress else None,
    )


def format_table(rows: dict[str, dict[str, float]], columns: Sequence[str]) -> str:
    """A Markdown table: one row per entry of ``rows``, the given metric columns."""
    header = "| | " + " | ".join(columns) + " |"
    lines = [header, "|---" * (len(columns) + 1) + "|"]
    for name, values in rows.items():
        cells = [_fmt(values.get(c)) for c in columns]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if isinstance(value, float):
        return f"{value:.3f}"
    return str(value)
