"""``dpokit demo``: the whole pipeline on the built-in task, in about a minute on a laptop CPU.

    task -> tokenizer + tiny model -> SFT -> on-policy samples, judged -> every data shape
         -> METHOD from the SFT model -> evaluation before and after -> table + PNG

Every stage writes into ``work_dir`` and is skipped when its output exists for the same settings
(``stage.json``), so the arena trains every method from one SFT model and one data set. Everything
is seeded: the same seed gives the same numbers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from dpokit import jsonl
from dpokit.config import TrainConfig
from dpokit.demo import builders
from dpokit.demo.settings import (
    DATA_FILES,
    DEFAULT_LEARNING_RATE,
    METHOD_SETTINGS,
    RUN_SETTINGS,
    DemoConfig,
)
from dpokit.demo.task import ReviewTask
from dpokit.evaluation import EvalResult, Samples, evaluate, format_table
from dpokit.losses import get_method
from dpokit.modeling import load_model, load_tokenizer
from dpokit.recipes import run
from dpokit.recipes.sft import run_sft
from dpokit.tiny import build_tiny_model, build_tiny_tokenizer

logger = logging.getLogger("dpokit")

# The tiny tokenizer's chat template renders a conversation in the task's own plain format
# ("Review of ...:" + " great good." + EOS, turn after turn), so single-turn chat data is the
# plain data and multi-turn sessions read like several reviews in a row.
DEMO_CHAT_TEMPLATE = (
    "{% for message in messages %}{{ message['content'] }}"
    "{% if message['role'] == 'assistant' %}{{ eos_token }}{% endif %}{% endfor %}"
)

COLUMNS = (
    "judge_reward",
    "win_rate",
    "kl",
    "reward_accuracy",
    "chosen_logp_change",
    "rejected_logp_change",
    "mean_length",
)


@dataclass
class Prepared:
    """What every method run starts from; ``seconds``: how long base model + SFT took."""

    task: ReviewTask
    work_dir: Path
    sft_dir: Path
    data_dir: Path
    seconds: float


@contextlib.contextmanager
def torch_threads(threads: int):
    """Run with ``threads`` intra-op CPU threads, then restore the caller's setting."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def run_demo(config: DemoConfig) -> dict:
    """Prepare (or reuse), train ``config.method``, evaluate before/after, write table and plot."""
    with torch_threads(config.threads):
        return _run_demo(config)


def _run_demo(config: DemoConfig) -> dict:
    start = time.perf_counter()
    prepared = prepare(config)
    baseline = baseline_eval(config, prepared)
    run = train_method(config, prepared, config.method)
    after = evaluate_run(config, prepared, run["final_dir"], baseline)
    out_dir = Path(run["output_dir"])
    rows = {"SFT (before)": baseline.metrics, f"{config.method} (after)": after.metrics}
    table = format_table(rows, COLUMNS)
    after.save(out_dir / "eval")
    (out_dir / "results.md").write_text(table + "\n")
    plot = plot_before_after(
        baseline, after, out_dir / "metrics.jsonl", out_dir / "demo.png", label=config.method
    )
    summary = {
        "method": config.method,
        "seed": config.seed,
        "before": baseline.metrics,
        "after": after.metrics,
        "train_seconds": run["seconds"],
        "total_seconds": time.perf_counter() - start,
        "plot": str(plot),
        "table": table,
        "final_dir": str(run["final_dir"]),
    }
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    return summary


# ---- stages -------------------------------------------------------------------------------------


def prepare(config: DemoConfig) -> Prepared:
    """Task, tokenizer, base model, SFT model and every data file; each stage is reused when it
    was already built with the same settings (``stage.json`` files)."""
    work_dir = Path(config.work_dir) / f"seed-{config.seed}"
    task = ReviewTask(seed=config.seed)
    sft_dir, data_dir = work_dir / "sft" / "final", work_dir / "data"
    if not _stage_done(work_dir / "sft", config.sft_key()):
        start = time.perf_counter()
        if work_dir.exists():
            shutil.rmtree(work_dir)  # built with other settings: start clean
        base_dir = build_base_model(config, task, work_dir / "base")
        run_sft_stage(config, task, base_dir, work_dir)
        _mark_done(work_dir / "sft", config.sft_key(), seconds=time.perf_counter() - start)
    else:
        logger.info("demo: reusing the SFT model in %s", sft_dir)
    if not _stage_done(data_dir, config.prepare_key()):
        for stale in ("sft-eval", "reference-cache"):
            shutil.rmtree(work_dir / stale, ignore_errors=True)
        build_data(config, task, sft_dir, data_dir)
        _mark_done(data_dir, config.prepare_key())
    sft_seconds = json.loads((work_dir / "sft" / "stage.json").read_text())["seconds"]
    return Prepared(task, work_dir, sft_dir, data_dir, sft_seconds)


def _stage_done(stage_dir: Path, key: str) -> bool:
    marker = stage_dir / "stage.json"
    return marker.exists() and json.loads(marker.read_text()).get("key") == key


def _mark_done(stage_dir: Path, key: str, seconds: float | None = None) -> None:
    (stage_dir / "stage.json").write_text(json.dumps({"key": key, "seconds": seconds}) + "\n")


def build_base_model(config: DemoConfig, task: ReviewTask, out_dir: Path) -> Path:
    """A BPE tokenizer trained on the task's text and a randomly initialised tiny causal LM."""
    tokenizer = build_tiny_tokenizer(
        task.corpus(), out_dir, vocab_size=config.vocab_size, chat_template=DEMO_CHAT_TEMPLATE
    )
    build_tiny_model(
        tokenizer,
        out_dir,
        arch=config.arch,
        hidden_size=config.hidden_size,
        num_layers=config.num_layers,
        max_positions=256,
        seed=config.seed,
    )
    return out_dir


def run_sft_stage(config: DemoConfig, task: ReviewTask, base_dir: Path, work_dir: Path) -> Path:
    """Fine-tune the base model on the task's mixed-quality reviews; returns the SFT model dir."""
    data = builders.write_jsonl(work_dir / "sft-data" / "sft.jsonl", task.sft_rows(config.sft_rows))
    sft_config = TrainConfig.from_dict(
        dict(
            model=str(base_dir),
            data=str(data),
            output_dir=str(work_dir / "sft"),
            learning_rate=config.sft_learning_rate,
            max_steps=config.sft_steps,
            batch_size=config.sft_batch_size,
            lr_scheduler="cosine",
            warmup_ratio=0.05,
            max_length=64,
            max_prompt_length=32,
            seed=config.seed,
            progress=config.progress,
        )
    )
    return run_sft(sft_config).final_dir


def build_data(config: DemoConfig, task: ReviewTask, sft_dir: Path, data_dir: Path) -> None:
    """Sample the SFT model k times per prompt, judge, and write every data shape."""
    tokenizer = load_tokenizer(str(sft_dir))
    model = load_model(str(sft_dir), torch.float32)
    rng = random.Random(config.seed)
    prompts = [rng.choice(task.train_prompts) for _ in range(config.pair_prompts)]
    k = config.samples_per_prompt
    label = "sampling pairs" if config.progress else None
    groups = builders.sample_groups(
        model, tokenizer, task, prompts, k, seed=config.seed + 1, progress=label
    )
    pairs = builders.pair_rows(groups, chunks=config.chunks)
    eval_groups = builders.sample_groups(
        model, tokenizer, task, task.eval_prompts, k, seed=config.seed + 2, progress=label
    )
    files = {
        "pairs.jsonl": pairs,
        "eval_pairs.jsonl": builders.pair_rows(eval_groups, chunks=1),
        "unpaired.jsonl": builders.unpaired_rows(groups),
        "noisy_pairs.jsonl": builders.noisy_rows(pairs, config.flip_fraction, config.seed),
        "spin_sft.jsonl": task.expert_rows(config.pair_prompts),
        "sessions.jsonl": builders.session_rows(groups, config.seed),
    }
    for name, rows in files.items():
        builders.write_jsonl(data_dir / name, rows)
    logger.info(
        "demo data: %d pairs from %d prompts x %d samples (%d without a preference)",
        len(pairs),
        len(groups),
        k,
        len(groups) - len(pairs),
    )


def baseline_eval(config: DemoConfig, prepared: Prepared) -> EvalResult:
    """The SFT model's own evaluation (cached): its samples are every method's baseline."""
    out_dir = prepared.work_dir / "sft-eval"
    key = f"{config.prepare_key()}|{config.eval_per_prompt}"
    if (out_dir / "result.json").exists():
        saved = json.loads((out_dir / "result.json").read_text())
        if saved["key"] == key:
            return EvalResult(saved["metrics"], Samples(**saved["samples"]))
    sft = load_model(str(prepared.sft_dir), torch.float32)
    result = evaluate_model(config, prepared, sft, baseline=None)
    out_dir.mkdir(parents=True, exist_ok=True)
    payload = {"key": key, "metrics": result.metrics, "samples": dataclasses.asdict(result.samples)}
    (out_dir / "result.json").write_text(json.dumps(payload) + "\n")
    result.save(out_dir)
    return result


def evaluate_model(config, prepared: Prepared, model, baseline: Samples | None) -> EvalResult:
    """Evaluate ``model`` on the held-out prompts and pairs against the SFT model (reward
    accuracy, log-prob changes, judge reward, win rate vs ``baseline``'s samples, KL)."""
    tokenizer = load_tokenizer(str(prepared.sft_dir))
    reference = load_model(str(prepared.sft_dir), torch.float32)
    result = evaluate(
        model,
        tokenizer,
        reference=reference,
        pairs=str(prepared.data_dir / "eval_pairs.jsonl"),
        prompts=prepared.task.eval_prompts,
        judge=prepared.task.judge,
        baseline=baseline,
        per_prompt=config.eval_per_prompt,
        max_new_tokens=config.max_new_tokens,
        seed=config.seed + 3,
        progress="evaluating" if config.progress else None,
    )
    if baseline is None:
        result.metrics["win_rate"] = 0.5  # against itself, with the same seeds: all ties
    return result


def evaluate_run(config, prepared: Prepared, final_dir, baseline: EvalResult) -> EvalResult:
    """:func:`evaluate_model` of the model saved in ``final_dir``."""
    model = load_model(str(final_dir), torch.float32)
    return evaluate_model(config, prepared, model, baseline.samples)


def method_config(config: DemoConfig, prepared: Prepared, method: str, output_dir: Path):
    """The TrainConfig of one method run from the SFT model.

    Precedence: demo defaults < RUN_SETTINGS < METHOD_SETTINGS (unless ``tuned=False``) < an
    explicit ``learning_rate`` < ``method_args`` (``key=value`` on the command line). Recipe
    methods (chains of runs) split the ``steps`` budget over their runs (``spec.stage_count``).
    """
    spec = get_method(method)
    data_file = config.train_data or DATA_FILES[spec.data]
    values = dict(
        method=method,
        model=str(prepared.sft_dir),
        data=str(prepared.data_dir / data_file),
        output_dir=str(output_dir),
        reference_cache_dir=str(prepared.work_dir / "reference-cache"),
        learning_rate=DEFAULT_LEARNING_RATE,
        max_steps=config.steps,
        batch_size=config.batch_size,
        lr_scheduler="linear",
        warmup_ratio=0.1,
        max_length=96,
        max_prompt_length=64,
        seed=config.seed,
        progress=config.progress,
    )
    values.update(RUN_SETTINGS.get(method, {}))
    if config.tuned:
        values.update(METHOD_SETTINGS.get(method, {}))
    if config.learning_rate is not None:
        values["learning_rate"] = config.learning_rate
    values.update(config.method_args)
    train_config = TrainConfig.from_dict(values)
    if spec.stage_count is not None and "max_steps" not in config.method_args:
        # Same optimizer-step budget for every method: a chain of runs splits it over its stages.
        count = train_config.method_args[spec.stage_count]
        train_config.max_steps = max(1, train_config.max_steps // count)
    return train_config


def train_method(config: DemoConfig, prepared: Prepared, method: str, name: str | None = None):
    """Train ``method`` from the SFT model; returns its output and final dirs and wall time."""
    output_dir = prepared.work_dir / "runs" / (name or method)
    if output_dir.exists():
        shutil.rmtree(output_dir)
    train_config = method_config(config, prepared, method, output_dir)
    start = time.perf_counter()
    result = run(train_config)
    return {
        "output_dir": output_dir,
        "final_dir": result.final_dir,
        "seconds": time.perf_counter() - start,
    }


# ---- the plot -----------------------------------------------------------------------------------


def plot_before_after(
    before: EvalResult, after: EvalResult, metrics_file: Path, out: Path, label: str = "after"
) -> Path:
    """Judge-reward histograms of the samples before and after, and the training loss curve."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    bins = [i / 10 for i in range(-10, 11)]
    left.hist(before.samples.rewards, bins=bins, alpha=0.6, label="SFT (before)")
    left.hist(after.samples.rewards, bins=bins, alpha=0.6, label=f"{label} (after)")
    left.set_xlabel("judge reward of held-out samples (-1 to 1)")
    left.set_ylabel("samples (count)")
    left.set_title(
        # the table's format: 3 decimals, win_rate as a share
        f"judge_reward {before.metrics['judge_reward']:.3f} -> "
        f"{after.metrics['judge_reward']:.3f}, win_rate {after.metrics['win_rate']:.3f}"
    )
    left.legend()
    if metrics_file.exists():
        records = jsonl.read(metrics_file, partial_tail=True)
        train = [r for r in records if r.get("split", "train") == "train" and "loss" in r]
        points = [(r.get("step", i), r["loss"]) for i, r in enumerate(train)]
        if points:
            right.plot(*zip(*points, strict=True))
    right.set_xlabel("optimizer step")
    right.set_ylabel("loss (per example, mean over batch)")
    right.set_title(f"{label} training loss")
    right.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
