"""The steps of benchmarks/gpu_check.py that need torch, each run in a subprocess of its own.

    python benchmarks/gpu_check_steps.py STEP --mode gpu|cpu --work DIR --result FILE

``env`` reports versions and the accelerator, ``model`` builds the checkpoint and the pairs every
later step reads, ``logps`` compares the padding-free and two-row log-probs on one batch. Each
writes a JSON object to ``--result``; gpu_check.py runs them under a time limit (a step that hangs
is killed, not waited for) and turns their numbers into pass/fail checks.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# Qwen2.5-0.5B's published shape, from https://huggingface.co/Qwen/Qwen2.5-0.5B/blob/main/config.json
# (0.49B parameters; head_dim 896 / 14 = 64; sliding window off, so every layer attends fully).
QWEN25_05B = dict(
    hidden_size=896,
    intermediate_size=4864,
    num_hidden_layers=24,
    num_attention_heads=14,
    num_key_value_heads=2,
    vocab_size=151936,
    max_position_embeddings=32768,
    rope_theta=1_000_000.0,
    rms_norm_eps=1e-6,
    tie_word_embeddings=True,
    use_sliding_window=False,
    max_window_layers=24,
    hidden_act="silu",
)
# The CPU stand-in: the same family, head_dim and ratios, 2 layers, the tokenizer's vocabulary.
CPU_SHAPE = dict(
    QWEN25_05B, hidden_size=128, intermediate_size=688, num_hidden_layers=2, num_attention_heads=2,
    num_key_value_heads=1, vocab_size=None,
)  # fmt: skip

# Tokens of the pairs (the benchmark's "issue" shape on the GPU; shorter answers on a CPU).
PAIR_SHAPES = {
    "gpu": {"prompt_tokens": (6, 14), "completion_tokens": (140, 200)},
    "cpu": {"prompt_tokens": (6, 14), "completion_tokens": (24, 48)},
}
TOKENIZER_VOCAB = 8192
PACKAGES = ("torch", "transformers", "accelerate", "datasets", "peft", "trl", "liger-kernel",
            "flash-attn", "flash-attn-3", "flash-attn-4", "triton", "dpokit")  # fmt: skip


def version(package: str) -> str:
    """The installed distribution's version, or "not installed"."""
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _flash_smoke_test(implementation: str) -> None:
    """A 2-layer Qwen2 with ``implementation`` on the GPU: one bf16 forward over two sequences
    packed in one row (position ids restart), the way dpokit's padding_free calls it; raises
    what the kernel raises. An installed kernel that cannot run here is then not chosen."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config

    config = Qwen2Config(**dict(CPU_SHAPE, vocab_size=64, use_sliding_window=False))
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=implementation)
        ids = torch.randint(0, 64, (1, 12))
        positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 3, 4, 5, 6]])
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        logits = model(input_ids=ids, position_ids=positions).logits
    if not torch.isfinite(logits).all():
        raise RuntimeError(f"{implementation}: non-finite logits")


def flash_attention() -> tuple[str | None, dict]:
    """The first flash-attention implementation (2, else 3, else 4) that is installed and runs
    here, and why each other one was not taken."""
    import torch
    from transformers.utils import import_utils

    if not torch.cuda.is_available():
        return None, {"all": "no CUDA"}
    why = {}
    for version_number in (2, 3, 4):
        name = f"flash_attention_{version_number}"
        available = getattr(import_utils, f"is_flash_attn_{version_number}_available", None)
        if available is None or not available():
            why[name] = "not installed"
            continue
        try:
            _flash_smoke_test(name)
        except Exception as error:  # any failure of an optional kernel: report it, use another
            why[name] = f"{type(error).__name__}: {error}"[:300]
            continue
        return name, why
    return None, why


def step_env(args) -> dict:
    """Versions, the accelerator, and which optional kernels can run here."""
    import torch

    cuda = torch.cuda.is_available()
    flash, flash_why = flash_attention()
    out = {
        "python": platform.python_version(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "versions": {name: version(name) for name in PACKAGES},
        "torch_cuda": torch.version.cuda,
        "cuda_available": cuda,
        "flash_attention": flash,
        "flash_attention_not_used": flash_why,
    }
    try:
        import liger_kernel  # noqa: F401 - importable is what TRL's use_liger_kernel needs

        out["liger_importable"] = True
    except Exception as error:  # a broken install reports why instead of stopping the check
        out["liger_importable"] = False
        out["liger_error"] = f"{type(error).__name__}: {error}"[:300]
    if cuda:
        props = torch.cuda.get_device_properties(0)
        out.update(
            gpu=torch.cuda.get_device_name(0),
            gpu_count=torch.cuda.device_count(),
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return out


def _synthetic_lines(seed: int = 0) -> list[str]:
    """Texts of syllable words for the tokenizer (the benchmark's pairs use such words too)."""
    rng = random.Random(seed)
    consonants, vowels = "bcdfghjklmnprstvwz", "aeiou"
    words = {
        "".join(rng.choice(consonants) + rng.choice(vowels) for _ in range(rng.randint(1, 4)))
        for _ in range(6000)
    }
    words = sorted(words)
    lines = [" ".join(rng.choices(words, k=rng.randint(8, 40))) for _ in range(3000)]
    return lines + words


def step_model(args) -> dict:
    """Tokenizer + model (Qwen2.5-0.5B's shape on a GPU, a 2-layer stand-in on CPU), saved with
    save_pretrained, and ``--rows`` preference pairs written with the benchmark's generator."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2Config
    from workload import Shape, prepare_workload

    from dpokit.tiny import build_tiny_tokenizer

    work = Path(args.work)
    model_dir = work / ("qwen2.5-0.5b-shape" if args.mode == "gpu" else "qwen2-small")
    tokenizer = build_tiny_tokenizer(_synthetic_lines(), model_dir, vocab_size=TOKENIZER_VOCAB)
    shape = dict(QWEN25_05B if args.mode == "gpu" else CPU_SHAPE)
    shape["vocab_size"] = shape["vocab_size"] or len(tokenizer)
    config = Qwen2Config(
        **shape,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    device = "cuda" if args.mode == "gpu" and torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    with torch.device(device):  # initialising 0.5B weights on the GPU takes seconds, not a minute
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.save_pretrained(str(model_dir))
    built = time.perf_counter() - start
    pair_shape = Shape(f"gpucheck-{args.mode}", pairs_per_step=args.batch, **PAIR_SHAPES[args.mode])
    work_data = prepare_workload(pair_shape, work, args.rows, str(model_dir))
    return {
        "model": str(model_dir),
        "data": work_data["data"],
        "rows": args.rows,
        "max_length": pair_shape.max_length + 2,
        "shape": shape,
        "pair_tokens": {**PAIR_SHAPES[args.mode], "pairs_per_step": args.batch},
        "parameters": sum(p.numel() for p in model.parameters()),
        "build_seconds": built,
    }


def _score(model, batch, device) -> dict:
    """Per-sequence log-probs (2B,) and completion-token counts of one collated batch."""
    from dpokit.logprobs import CompletionScorer, scorer_kwargs

    batch = {k: v.to(device) if hasattr(v, "to") else v for k, v in batch.items()}
    out = CompletionScorer(model)(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),
    )
    return {"logps": out.logps.float().cpu(), "tokens": out.token_counts.cpu()}


def _relative(a, b) -> float:
    """max_i |a_i - b_i| / |b_i| over sequences."""
    return float(((a - b).abs() / b.abs().clamp(min=1e-12)).max())


def step_logps(args) -> dict:
    """One batch of ``--batch`` pairs scored through dpokit's CompletionScorer three ways: two rows
    per pair and padding-free, both in bf16 autocast with ``--attn``, and two rows in fp32 with
    SDPA (the exact value the bf16 ones are compared with). Log-probs: (2B,) nats."""
    import torch
    from transformers import AutoModelForCausalLM

    from dpokit.data import DataConfig, PairCollator, prepare_pairs
    from dpokit.data.packing import pair_collator
    from dpokit.modeling import load_tokenizer

    model_info = json.loads(Path(args.model_json).read_text())
    device = torch.device("cuda" if args.mode == "gpu" and torch.cuda.is_available() else "cpu")
    tokenizer = load_tokenizer(model_info["model"])
    length = model_info["max_length"]
    settings = DataConfig(
        max_length=length, max_prompt_length=length - 1, cache_dir=str(Path(args.work) / "hf")
    )
    prepared = prepare_pairs(model_info["data"], tokenizer, settings)
    rows = [prepared.dataset[i] for i in range(args.batch)]
    pad = tokenizer.pad_token_id
    layouts = {
        "two_rows": PairCollator(pad)(rows),
        "padding_free": pair_collator(pad, "padding_free")(rows),
    }

    def load(attn: str):
        return (
            AutoModelForCausalLM.from_pretrained(
                model_info["model"], dtype=torch.float32, attn_implementation=attn
            )
            .to(device)
            .eval()
        )

    with torch.no_grad():
        model = load(args.attn)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            bf16 = {name: _score(model, batch, device) for name, batch in layouts.items()}
        del model
        exact = _score(load("sdpa"), layouts["two_rows"], device)
    two, free = bf16["two_rows"]["logps"], bf16["padding_free"]["logps"]
    free_tokens = bf16["padding_free"]["tokens"]
    return {
        "attn_implementation": args.attn,
        "device": str(device),
        "pairs": args.batch,
        "sequence_tokens": int(layouts["two_rows"]["attention_mask"].sum()),
        "same_tokens": bool(torch.equal(bf16["two_rows"]["tokens"], free_tokens)),
        "logps_fp32_two_rows": exact["logps"].tolist(),
        "logps_bf16_two_rows": two.tolist(),
        "logps_bf16_padding_free": free.tolist(),
        "rel_padding_free_vs_two_rows": _relative(free, two),
        "rel_bf16_vs_fp32": max(_relative(two, exact["logps"]), _relative(free, exact["logps"])),
        "bf16_differs_from_fp32": bool((two != exact["logps"]).any()),
    }


STEPS = {"env": step_env, "model": step_model, "logps": step_logps}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("step", choices=sorted(STEPS))
    parser.add_argument("--mode", choices=("gpu", "cpu"), default="gpu")
    parser.add_argument("--work", required=True, help="scratch directory of the check")
    parser.add_argument("--result", required=True, help="JSON file to write")
    parser.add_argument("--rows", type=int, default=64, help="model: pairs to write")
    parser.add_argument("--batch", type=int, default=8, help="pairs per batch")
    parser.add_argument("--model-json", help="logps: the model step's result")
    parser.add_argument("--attn", default="sdpa", help="logps: attention of the bf16 forwards")
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    result = STEPS[args.step](args)
    Path(args.result).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
