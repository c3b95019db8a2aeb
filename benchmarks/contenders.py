"""The contenders: dpokit, TRL's DPOTrainer and a plain PyTorch loop, each one DPO training run.

Each ``run_*`` function trains ``steps`` optimizer steps of DPO (beta 0.1, AdamW, lr 1e-6 constant,
no warm-up, clipping at 1.0, fp32, no gradient checkpointing, data in file order) on the same
checkpoint and JSONL file, and returns what the benchmark reports: the wall time of the whole run
(load, tokenize, reference, train, save - the benchmark differences two step counts to get the
steady-state time per step) and the first optimizer step's loss and policy log-probs.

They run in their own subprocess (see bench_dpo.py), so imports and peak memory are their own.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

BETA = 0.1
LEARNING_RATE = 1e-6


def _step_seconds(stamps: list[float]) -> list[float]:
    """Durations of steps 2..N from the times each optimizer step ended (step 1 warms up)."""
    return [b - a for a, b in zip(stamps, stamps[1:], strict=False)]


def _first_step(history: list[dict]) -> dict:
    first = history[0]
    return {k: float(first[k]) for k in ("loss", "logps/chosen", "logps/rejected") if k in first}


# --------------------------------------------------------------------------------------------------
# dpokit


def dpokit_settings(work: dict, steps: int, scratch: Path) -> dict:
    """The dpokit config every benchmark run starts from (fp32, constant lr, no shuffling, a
    fresh reference cache in ``scratch``); a contender's overrides go on top."""
    return {
        "method": "dpo",
        "beta": BETA,
        "model": work["model"],
        "data": work["data"],
        "output_dir": str(scratch / "run"),
        "reference_cache_dir": str(scratch / "reference-cache"),  # fresh: computed every run
        "batch_size": work["batch_size"],
        "max_steps": steps,
        "learning_rate": LEARNING_RATE,
        "lr_scheduler": "constant",
        "warmup_ratio": 0.0,
        "max_length": work["max_length"],
        "max_prompt_length": work["max_length"] - 1,
        "shuffle": False,
        "progress": False,
        "mixed_precision": "no",
        "dtype": "float32",
    }


def run_dpokit(work: dict, steps: int, overrides: dict, scratch: Path) -> dict:
    """``dpokit.train`` with the engine's defaults, plus ``overrides`` (config key -> value)."""
    from dpokit.config import TrainConfig
    from dpokit.engine import Trainer

    values = dpokit_settings(work, steps, scratch)
    values.update(overrides)
    config = TrainConfig.from_dict(values)
    start = time.perf_counter()
    trainer = Trainer(config)
    stamps: list[float] = []
    optimizer_step = trainer.optimizer.step

    def timed_step(*args, **kwargs):  # the end of each optimizer step, for per-step times
        out = optimizer_step(*args, **kwargs)
        stamps.append(time.perf_counter())
        return out

    trainer.optimizer.step = timed_step
    result = trainer.train()
    seconds = time.perf_counter() - start
    padding = [r["padding_fraction"] for r in result.history if "padding_fraction" in r]
    return {
        "seconds": seconds,
        "step_seconds": _step_seconds(stamps),
        "first_step": _first_step(result.history),
        "padding_fraction": sum(padding) / len(padding) if padding else None,
    }


# --------------------------------------------------------------------------------------------------
# TRL


def run_trl(
    work: dict, steps: int, precompute: bool, scratch: Path, overrides: dict | None = None
) -> dict:
    """TRL's DPOTrainer: fp32, no gradient checkpointing, sequential sampling, same batch;
    ``overrides`` (DPOConfig field -> value) change any of these settings."""
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    captured: list[dict] = []
    stamps: list[float] = []

    class Capture(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs and "loss" in logs:
                captured.append(dict(logs))

        def on_step_end(self, args, state, control, **kwargs):
            stamps.append(time.perf_counter())

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(work["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    dataset = datasets.load_dataset(
        "json", data_files=work["data"], split="train", cache_dir=str(scratch / "hf")
    )
    settings = dict(
        output_dir=str(scratch / "run"),
        beta=BETA,
        per_device_train_batch_size=work["batch_size"],
        gradient_accumulation_steps=1,
        max_steps=steps,
        learning_rate=LEARNING_RATE,
        lr_scheduler_type="constant",
        warmup_steps=0,
        max_grad_norm=1.0,
        weight_decay=0.0,
        max_length=work["max_length"],
        bf16=False,
        fp16=False,
        gradient_checkpointing=False,
        precompute_ref_log_probs=precompute,
        train_sampling_strategy="sequential",
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        dataloader_num_workers=0,
        model_init_kwargs={"dtype": torch.float32},
        seed=42,
    )
    settings.update(overrides or {})
    args = DPOConfig(**settings)
    trainer = DPOTrainer(
        model=work["model"],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        callbacks=[Capture()],
    )
    trainer.train()
    trainer.save_model(str(scratch / "final"))  # as dpokit saves its final weights
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "step_seconds": _step_seconds(stamps),
        "first_step": _first_step(captured),
    }


# --------------------------------------------------------------------------------------------------
# A plain PyTorch loop


def run_plain(work: dict, steps: int, scratch: Path) -> dict:
    """What one writes by hand: two padded rows per pair, full logits, log_softmax, gather; the
    reference a frozen copy scored every step under no_grad."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(work["model"])
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with open(work["data"]) as handle:
        rows = [json.loads(line) for line in handle]

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    def batch_of(chunk):
        seqs = []
        for key in ("chosen", "rejected"):
            for row in chunk:
                prompt = encode(row["prompt"])
                seqs.append((prompt, encode(row[key]) + [tokenizer.eos_token_id]))
        length = max(len(p) + len(c) for p, c in seqs)
        ids = torch.full((len(seqs), length), pad)
        attention = torch.zeros(len(seqs), length, dtype=torch.long)
        completion = torch.zeros(len(seqs), length, dtype=torch.bool)
        for i, (p, c) in enumerate(seqs):
            ids[i, : len(p) + len(c)] = torch.tensor(p + c)
            attention[i, : len(p) + len(c)] = 1
            completion[i, len(p) : len(p) + len(c)] = True
        return ids, attention, completion

    def sequence_logps(model, ids, attention, completion):
        logits = model(input_ids=ids, attention_mask=attention).logits  # (2B, T, V)
        logp = F.log_softmax(logits[:, :-1].float(), dim=-1)
        token = logp.gather(2, ids[:, 1:, None]).squeeze(2)  # (2B, T-1)
        return (token * completion[:, 1:]).sum(dim=1)  # (2B,)

    policy = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32)
    reference = AutoModelForCausalLM.from_pretrained(work["model"], dtype=torch.float32).eval()
    reference.requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LEARNING_RATE, weight_decay=0.0)
    history, stamps = [], []
    size = work["batch_size"]
    for step in range(steps):
        chunk = rows[(step * size) % len(rows) :][:size]
        ids, attention, completion = batch_of(chunk)
        policy_logps = sequence_logps(policy, ids, attention, completion)
        with torch.no_grad():
            reference_logps = sequence_logps(reference, ids, attention, completion)
        chosen, rejected = policy_logps.chunk(2)
        ref_chosen, ref_rejected = reference_logps.chunk(2)
        margin = (chosen - ref_chosen) - (rejected - ref_rejected)
        loss = -F.logsigmoid(BETA * margin).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        stamps.append(time.perf_counter())
        history.append(
            {
                "loss": loss.item(),
                "logps/chosen": chosen.mean().item(),
                "logps/rejected": rejected.mean().item(),
            }
        )
    policy.save_pretrained(str(scratch / "final"))
    seconds = time.perf_counter() - start
    return {
        "seconds": seconds,
        "step_seconds": _step_seconds(stamps),
        "first_step": _first_step(history),
    }


# --------------------------------------------------------------------------------------------------


def run(name: str, work: dict, steps: int, overrides: dict) -> dict:
    """Run contender ``name`` in this process in a scratch directory of its own. ``overrides``
    are dpokit config keys for dpokit, DPOConfig fields for TRL (the plain loop takes none)."""
    with tempfile.TemporaryDirectory(prefix="dpokit-bench-") as tmp:
        scratch = Path(tmp)
        os.environ["HF_DATASETS_CACHE"] = str(scratch / "hf")  # no cache hits across runs
        os.environ["DPOKIT_CACHE"] = str(scratch / "dpokit")
        if name == "dpokit":
            return run_dpokit(work, steps, overrides, scratch)
        if name == "trl_precomputed":
            return run_trl(work, steps, True, scratch, overrides)
        if name == "trl_online":
            return run_trl(work, steps, False, scratch, overrides)
        if name == "plain":
            return run_plain(work, steps, scratch)
    raise ValueError(f"unknown contender {name!r}")
