"""Generation throughput: dpokit's generate_completions against plain ``model.generate``.

    python benchmarks/bench_generation.py                 # Qwen2-0.5B width, 2 layers, 32k vocab
    python benchmarks/bench_generation.py --repeats 5 --prompts 96 --new-tokens 64
    python benchmarks/bench_generation.py --out benchmarks/results/generation.md

Both contenders generate from the same model (built from a config, random weights, fp32, eval
mode) for the same prompts (random token ids of mixed lengths, in one fixed shuffled order), with
the same batch size, KV cache on, and ``min_new_tokens = max_new_tokens``, so every row generates
exactly the same number of tokens and tokens/s compare like for like:

- ``dpokit``: :func:`dpokit.generation.generate_completions` (length-sorted batches, left
  padding, per-batch seeds, results in the caller's order);
- ``plain``: the prompts in the caller's order, ``batch_size`` at a time, left-padded, one
  ``model.generate(...)`` per batch with the same sampling settings (``do_sample``, temperature,
  top_p, top_k=0).

Each mode (greedy, sampling) alternates the contenders within a repeat and reverses the order
between repeats; the table gives medians over repeats of the wall time and of the process's CPU
time (less sensitive to other load on a shared machine), and speed-ups plain/dpokit of the medians.
Greedy rows also report how many prompts got the same tokens from both (float noise of different
padding can flip a near-tie). Not a test: numbers depend on the machine and its load.
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.generation import generate_completions

PAD, BOS, EOS = 0, 1, 2


def build_model(args) -> torch.nn.Module:
    """A Qwen2-family causal LM of ``args``' width and depth, random weights, eval mode."""
    config = AutoConfig.for_model(
        "qwen2",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.heads,
        num_key_value_heads=args.kv_heads,
        max_position_embeddings=4096,
        bos_token_id=BOS,
        eos_token_id=EOS,
        pad_token_id=PAD,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(config).eval()


def make_prompts(args) -> list[list[int]]:
    """``args.prompts`` prompts of lengths uniform in [min_len, max_len], BOS first."""
    rng = random.Random(0)
    return [
        [BOS]
        + [rng.randrange(3, args.vocab) for _ in range(rng.randint(args.min_len, args.max_len))]
        for _ in range(args.prompts)
    ]


def run_dpokit(model, prompts, args, do_sample: bool) -> list[list[int]]:
    tokenizer = SimpleNamespace(eos_token_id=EOS, pad_token_id=PAD, bos_token_id=BOS)
    return generate_completions(
        model,
        tokenizer,
        prompts,
        max_new_tokens=args.new_tokens,
        min_new_tokens=args.new_tokens,
        temperature=1.0,
        top_p=args.top_p,
        batch_size=args.batch_size,
        seed=0,
        do_sample=do_sample,
    )


def run_plain(model, prompts, args, do_sample: bool) -> list[list[int]]:
    """What a user writes: batches in the given order, left-padded, ``model.generate``."""
    out: list[list[int]] = []
    sampling = dict(temperature=1.0, top_p=args.top_p, top_k=0) if do_sample else {}
    with torch.no_grad():
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            width = max(len(p) for p in batch)
            input_ids = torch.tensor([[PAD] * (width - len(p)) + p for p in batch])
            attention_mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch])
            tokens = model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=args.new_tokens,
                min_new_tokens=args.new_tokens,
                do_sample=do_sample,
                use_cache=True,
                pad_token_id=PAD,
                eos_token_id=EOS,
                **sampling,
            )
            out.extend(tokens[:, width:].tolist())
    return out


CONTENDERS = {"dpokit": run_dpokit, "plain": run_plain}


def measure(model, prompts, args, do_sample: bool) -> dict:
    """Seconds per contender over ``args.repeats`` alternated repeats, and the last outputs."""
    seconds: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    cpu: dict[str, list[float]] = {name: [] for name in CONTENDERS}
    outputs: dict[str, list[list[int]]] = {}
    names = list(CONTENDERS)
    for repeat in range(args.repeats):
        for name in names if repeat % 2 == 0 else names[::-1]:
            begin, begin_cpu = time.perf_counter(), time.process_time()
            outputs[name] = CONTENDERS[name](model, prompts, args, do_sample)
            seconds[name].append(time.perf_counter() - begin)
            cpu[name].append(time.process_time() - begin_cpu)
            mode = "sample" if do_sample else "greedy"
            print(f"  {mode} {name}: {seconds[name][-1]:.2f} s wall, {cpu[name][-1]:.2f} s CPU")
    counts = {name: sum(len(o) for o in out) for name, out in outputs.items()}
    assert len(set(counts.values())) == 1, f"contenders generated different counts: {counts}"
    same = sum(a == b for a, b in zip(outputs["dpokit"], outputs["plain"], strict=True))
    return {"seconds": seconds, "cpu": cpu, "tokens": counts["dpokit"], "same": same}


def table(results: dict, args) -> str:
    """The Markdown report: shape line and one row per (mode, contender)."""
    lines = [
        f"Shape: Qwen2-style hidden {args.hidden}, {args.layers} layers, {args.heads} heads "
        f"({args.kv_heads} KV), vocab {args.vocab}, fp32, random weights; {args.prompts} "
        f"prompts of {args.min_len}-{args.max_len} tokens (shuffled), batch {args.batch_size}, "
        f"{args.new_tokens} new tokens per prompt, KV cache on. Machine: {platform.machine()}, "
        f"{torch.get_num_threads()} threads, torch {torch.__version__}. Medians of "
        f"{args.repeats} alternated repeats.",
        "",
        "| mode | contender | wall s | tokens/s | speed-up | CPU s | tokens/CPU s | CPU speed-up "
        "| wall runs (s) | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for mode, result in results.items():
        wall = {n: statistics.median(s) for n, s in result["seconds"].items()}
        cpu = {n: statistics.median(s) for n, s in result["cpu"].items()}
        for name in wall:
            runs = ", ".join(f"{s:.1f}" for s in result["seconds"][name])
            same = f"{result['same']}/{args.prompts}" if mode == "greedy" else "-"
            lines.append(
                f"| {mode} | {name} | {wall[name]:.2f} | {result['tokens'] / wall[name]:.0f} | "
                f"{wall['plain'] / wall[name]:.2f}x | {cpu[name]:.2f} | "
                f"{result['tokens'] / cpu[name]:.0f} | {cpu['plain'] / cpu[name]:.2f}x | {runs} "
                f"| {same} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for flag, default in [
        ("--hidden", 896), ("--intermediate", 4864), ("--layers", 2), ("--heads", 14),
        ("--kv-heads", 2), ("--vocab", 32000), ("--prompts", 48), ("--min-len", 8),
        ("--max-len", 384), ("--batch-size", 16), ("--new-tokens", 32), ("--repeats", 3),
    ]:  # fmt: skip
        parser.add_argument(flag, type=int, default=default)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--modes", default="greedy,sample")
    parser.add_argument("--out", type=Path, default=None, help="also write the table here")
    args = parser.parse_args(argv)
    model = build_model(args)
    prompts = make_prompts(args)
    warm = argparse.Namespace(**{**vars(args), "new_tokens": 2})
    for run in CONTENDERS.values():  # first-call costs (allocator, kernels) out of the timings
        run(model, prompts[: args.batch_size], warm, True)
    results = {}
    for mode in args.modes.split(","):
        results[mode] = measure(model, prompts, args, do_sample=mode == "sample")
    report = table(results, args)
    print(report)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
