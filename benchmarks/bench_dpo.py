"""DPO training throughput: dpokit against TRL's DPOTrainer and a plain PyTorch loop.

    python benchmarks/bench_dpo.py                      # the issue's shape, all contenders
    python benchmarks/bench_dpo.py --preset long        # completions of 256-512 tokens
    python benchmarks/bench_dpo.py --model PATH         # a real checkpoint (and its tokenizer)
    python benchmarks/bench_dpo.py --only dpokit,trl_precomputed --repeats 3

Every contender trains the same DPO run (same checkpoint, same JSONL pairs in file order, batch
of 4 pairs, fp32, no gradient checkpointing, AdamW lr 1e-6 constant) in a subprocess of its own,
so its peak RSS is its own. Each is run for 3 and for 6 optimizer steps; the difference divided by
3 is the steady-state time per step (start-up, tokenization and reference pre-computation cancel).
Contenders are alternated within a repeat and the order reversed between repeats; the report
gives medians over repeats. TRL needs the ``bench`` extra: ``pip install -e .[bench]``.

Also measured in the same run: the machine's fp32 matmul peak (for model FLOPs utilisation), and
dpokit with each of its speed features switched off in turn. Output: a Markdown table on stdout
and in ``--out``/``RESULTS.md``, all raw numbers in ``--out``/``results.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

# (label, contender, dpokit config overrides). The first dpokit row is the default configuration;
# each "- X" row turns one speed feature off (or changes one choice) to measure what it buys.
CONTENDERS: list[tuple[str, str, dict]] = [
    ("dpokit (default)", "dpokit", {}),
    ("dpokit packing=none (two rows per pair)", "dpokit", {"packing": "none"}),
    ("dpokit packing=shared_prompt", "dpokit", {"packing": "shared_prompt"}),
    ("dpokit packing=padding_free", "dpokit", {"packing": "padding_free"}),
    (
        "dpokit packing=none + group_by_length",
        "dpokit",
        {"packing": "none", "group_by_length": True},
    ),
    ("dpokit - saved softmax (recompute logits)", "dpokit", {"logps_saved_softmax_mb": 0}),
    ("dpokit - fused AdamW", "dpokit", {"fused_optimizer": False}),
    ("dpokit - precomputed reference (frozen copy online)", "dpokit", {"reference_mode": "model"}),
    ("dpokit + gradient checkpointing", "dpokit", {"gradient_checkpointing": True}),
    (
        "dpokit, all of the above off",
        "dpokit",
        {
            "packing": "none",
            "logps_saved_softmax_mb": 0,
            "fused_optimizer": False,
            "reference_mode": "model",
        },
    ),
    ("TRL DPOTrainer, precomputed reference", "trl_precomputed", {}),
    ("TRL DPOTrainer, online reference", "trl_online", {}),
    ("plain PyTorch loop", "plain", {}),
]

# Rows that need a GPU: listed, marked "not measured here" on CPU.
GPU_ONLY = [
    ("dpokit mixed_precision=bf16", "dpokit", {"mixed_precision": "bf16"}),
    (
        "dpokit packing=padding_free + flash-attention varlen",
        "dpokit",
        {"packing": "padding_free"},
    ),
]


# --------------------------------------------------------------------------------------------------
# Worker side: one contender, one step count, in this process


def worker(spec: dict) -> None:
    import contenders

    result = contenders.run(spec["contender"], spec["work"], spec["steps"], spec["overrides"])
    try:
        import torch

        if torch.cuda.is_available():
            result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    except ImportError:
        pass
    result.update(process_memory_mb())
    print("BENCH_RESULT " + json.dumps(result), flush=True)


def process_memory_mb() -> dict:
    """This process's peak resident (VmHWM) and peak virtual (VmPeak) memory in MB, from
    /proc/self/status (Linux; empty elsewhere). VmPeak is what an address-space cap
    (RLIMIT_AS, see bench_memory.py) limits."""
    names = {"VmHWM": "vm_hwm_mb", "VmPeak": "vm_peak_mb"}
    try:
        lines = Path("/proc/self/status").read_text().splitlines()
    except OSError:
        return {}
    out = {}
    for line in lines:
        key, _, value = line.partition(":")
        if key in names:
            out[names[key]] = int(value.split()[0]) / 1024  # kB
    return out


def matmul_peak(seconds: float = 4.0, n: int = 2048) -> float:
    """Best sustained fp32 GFLOP/s of an n x n matmul (on the GPU when there is one)."""
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ b
        if device == "cuda":
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start) / 1e9)
    return best


# --------------------------------------------------------------------------------------------------
# Parent side


@dataclass
class Measurement:
    label: str
    contender: str
    overrides: dict
    runs: list[dict] = field(default_factory=list)  # one per (repeat, steps)


def busy_cpu_seconds() -> float:
    """CPU seconds the whole machine has been busy since boot (all processes), from /proc/stat."""
    try:
        fields = Path("/proc/stat").read_text().splitlines()[0].split()[1:]
    except OSError:
        return 0.0
    user, nice, system, _idle, _iowait, irq, softirq, steal = (int(x) for x in fields[:8])
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(max_share: float, max_wait: float, log) -> float:
    """Wait (up to ``max_wait`` s) until other processes use < ``max_share`` of the CPUs over 2 s.

    A shared machine's other jobs steal cores from the contender being timed; the benchmark
    records how much they took during each run either way (``foreign_cpu_share``).
    """
    deadline = time.perf_counter() + max_wait
    while True:
        before = busy_cpu_seconds()
        time.sleep(2.0)
        share = (busy_cpu_seconds() - before) / (2.0 * os.cpu_count())
        if share < max_share or time.perf_counter() > deadline:
            return share
        log(f"  waiting: other processes use {share:.0%} of the CPUs")


def run_worker(spec: dict, log, quiet: tuple[float, float]) -> dict:
    """Run one contender in a fresh interpreter; adds wall/cpu seconds, its own peak RSS, and
    the share of the machine's CPU time other processes used meanwhile."""
    with tempfile.TemporaryFile("w+") as out:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
        idle_share = wait_for_quiet(*quiet, log)
        load_before = os.getloadavg()[0]
        busy_before = busy_cpu_seconds()
        start = time.perf_counter()
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        wall = time.perf_counter() - start
        busy = busy_cpu_seconds() - busy_before
        out.seek(0)
        text = out.read()
    lines = [line for line in text.splitlines() if line.startswith("BENCH_RESULT ")]
    if proc.returncode != 0 or not lines:
        log(text[-3000:])
        raise RuntimeError(f"worker {spec['contender']} {spec['overrides']} failed")
    result = json.loads(lines[-1].removeprefix("BENCH_RESULT "))
    cpu = usage.ru_utime + usage.ru_stime
    result.update(
        process_seconds=wall,
        cpu_seconds=cpu,
        peak_rss_mb=usage.ru_maxrss / 1024,  # Linux: KiB
        load_before=load_before,
        foreign_share_before=idle_share,
        foreign_cpu_share=max(busy - cpu, 0.0) / (wall * os.cpu_count()),
    )
    return result


def pair_tokens(work: dict) -> list[dict]:
    """Per pair: tokens of its two sequences (2 x prompt + chosen + rejected, with EOS) and its
    completion tokens, tokenized as dpokit does."""
    from transformers import AutoTokenizer

    from dpokit.data import DataConfig, prepare_pairs

    tokenizer = AutoTokenizer.from_pretrained(work["model"])
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    settings = DataConfig(
        max_length=work["max_length"],
        max_prompt_length=work["max_length"] - 1,
        cache_dir=work["cache"],
    )
    prepared = prepare_pairs(work["data"], tokenizer, settings)
    out = []
    for row in prepared.dataset:
        p, c, r = (
            len(row[k]) for k in ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
        )
        out.append({"prompt": p, "completions": c + r, "sequence_tokens": 2 * p + c + r})
    return out


def model_flops_per_step(model_path: str, pairs: list[dict]) -> float:
    """Useful training FLOPs of the policy for these pairs: 3 x forward (forward + backward),
    forward = 2 x decoder weights x sequence tokens + causal attention + 2 x H x V per
    completion token (the LM head is needed only where a token is scored)."""
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(model_path).get_text_config()
    h, layers = config.hidden_size, config.num_hidden_layers
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    kv = getattr(config, "num_key_value_heads", heads) or heads
    inter = config.intermediate_size
    per_layer = h * heads * head_dim * 2 + h * kv * head_dim * 2 + 3 * h * inter
    forward = 0.0
    for pair in pairs:
        tokens = pair["sequence_tokens"]
        # two sequences of ~tokens/2: QK^T and AV, 2 x 2 x T^2 x d per layer, half for causal
        length = tokens / 2
        forward += 2 * per_layer * layers * tokens
        forward += 2 * (2 * length * length * heads * head_dim) * layers
        forward += 2 * h * config.vocab_size * pair["completions"]
    return 3 * forward


def summarize(measurements, work, pairs, steps, peak_gflops) -> list[dict]:
    short, long_ = steps
    rows_per_step = work["batch_size"]
    timed = pairs[short * rows_per_step : long_ * rows_per_step]  # the differenced steps' pairs
    flops = model_flops_per_step(work["model"], timed) / (long_ - short)
    tokens = sum(p["sequence_tokens"] for p in timed) / (long_ - short)
    table = []
    for m in measurements:
        by_repeat: dict[int, dict[int, dict]] = {}
        for run in m.runs:
            by_repeat.setdefault(run["repeat"], {})[run["steps"]] = run
        per_step = [
            (r[long_]["seconds"] - r[short]["seconds"]) / (long_ - short)
            for r in by_repeat.values()
            if short in r and long_ in r
        ]
        cpu_per_step = [
            (r[long_]["cpu_seconds"] - r[short]["cpu_seconds"]) / (long_ - short)
            for r in by_repeat.values()
            if short in r and long_ in r
        ]
        step_time = statistics.median(per_step)
        in_run = [s for run in m.runs for s in run.get("step_seconds", [])]
        longs = [r[long_] for r in by_repeat.values() if long_ in r]
        row = {
            "label": m.label,
            "contender": m.contender,
            "overrides": m.overrides,
            "seconds_per_step": step_time,
            "seconds_per_step_repeats": per_step,
            # The median of single steps timed inside the runs (steps 2..N): robust to a
            # disturbance that lands in one run and skews the difference of two totals.
            "in_run_seconds_per_step": statistics.median(in_run) if in_run else None,
            "cpu_seconds_per_step": statistics.median(cpu_per_step),
            "pairs_per_second": rows_per_step / step_time,
            "tokens_per_second": tokens / step_time,
            "peak_rss_mb": statistics.median(r["peak_rss_mb"] for r in longs),
            "mfu": flops / step_time / (peak_gflops * 1e9),
            "first_step": longs[0]["first_step"],
            "padding_fraction": longs[0].get("padding_fraction"),
            "cuda_max_allocated_mb": longs[0].get("cuda_max_allocated_mb"),
            "foreign_cpu_share": statistics.median(r["foreign_cpu_share"] for r in m.runs),
        }
        table.append(row)
    base = next(r for r in table if r["label"] == "dpokit (default)")
    for row in table:
        row["first_step_rel_diff"] = {
            k: abs(v - base["first_step"][k]) / max(abs(base["first_step"][k]), 1e-12)
            for k, v in row["first_step"].items()
            if k in base["first_step"]
        }
        row["speedup_of_dpokit"] = base["pairs_per_second"] / row["pairs_per_second"]
        row["memory_ratio_of_dpokit"] = base["peak_rss_mb"] / row["peak_rss_mb"]
    return table


def markdown(table, meta) -> str:
    lines = [
        f"Shape `{meta['preset']}`: {meta['shape_text']}. Machine: {meta['machine']}. "
        f"fp32 matmul peak measured in this run: {meta['peak_gflops']:.0f} GFLOP/s. "
        f"Useful model FLOPs per step: {meta['flops_per_step'] / 1e9:.1f} GFLOP. "
        f"Steady state = (time of {meta['steps'][1]} steps - time of {meta['steps'][0]}) / "
        f"{meta['steps'][1] - meta['steps'][0]}, median of {meta['repeats']} alternated repeats. "
        f"Other processes on the machine used {meta['foreign_median']:.0%} of its CPU time during "
        f"the median run ({meta['foreign_max']:.0%} at most).",
        "",
        "| configuration | s/step | in-run s/step | CPU s/step | pairs/s | tokens/s | peak RSS MB "
        "| MFU | padding | dpokit speed-up | dpokit memory | first-step loss | logps/chosen "
        "| rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table:
        first = r["first_step"]
        padding = "" if r["padding_fraction"] is None else f"{r['padding_fraction']:.1%}"
        diff = max(r["first_step_rel_diff"].values(), default=float("nan"))
        lines.append(
            f"| {r['label']} | {r['seconds_per_step']:.2f} | {r['in_run_seconds_per_step']:.2f} | "
            f"{r['cpu_seconds_per_step']:.2f} | "
            f"{r['pairs_per_second']:.2f} | "
            f"{r['tokens_per_second']:.0f} | {r['peak_rss_mb']:.0f} | {r['mfu']:.1%} | {padding} | "
            f"{r['speedup_of_dpokit']:.2f}x | {r['memory_ratio_of_dpokit']:.2f}x | "
            f"{first.get('loss', float('nan')):.6f} | "
            f"{first.get('logps/chosen', float('nan')):.4f} | {diff:.1e} |"
        )
    for label, _, _ in GPU_ONLY:
        if not meta["cuda"]:
            lines.append(f"| {label} | not measured here (GPU only) |" + " |" * 12)
    return "\n".join(lines)


def profile_markdown(work: dict) -> str:
    """Run profile_step.py on the workload (dpokit's defaults) in a subprocess; its Markdown."""
    import profile_step

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "profile.json"
        cmd = [
            sys.executable,
            str(HERE / "profile_step.py"),
            "--model",
            work["model"],
            "--data",
            work["data"],
            "--max-length",
            str(work["max_length"]),
            "--json",
            str(out),
        ]
        subprocess.run(cmd, check=True, capture_output=True)
        return profile_step.markdown(json.loads(out.read_text()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--matmul-peak", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--preset", default="issue", help="issue | long")
    parser.add_argument("--model", help="a real checkpoint directory instead of the built model")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--steps", type=int, nargs=2, default=(3, 6), metavar=("SHORT", "LONG"))
    parser.add_argument("--only", help="comma list of labels/contenders to run (default: all)")
    parser.add_argument("--skip", help="comma list of labels/contenders to leave out")
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dpokit-bench"))
    parser.add_argument("--out", default=str(HERE / "results"))
    parser.add_argument(
        "--quiet",
        type=float,
        nargs=2,
        default=(0.15, 30.0),
        metavar=("SHARE", "SECONDS"),
        help="before each run, wait up to SECONDS until other processes use < SHARE of the CPUs",
    )
    parser.add_argument(
        "--no-profile",
        action="store_true",
        help="skip profiling dpokit's default step (torch.profiler's top operators)",
    )
    parser.add_argument(
        "--retries",
        type=int,
        default=2,
        help="run again (at most this often) when other processes took > 10%% of the CPUs",
    )
    args = parser.parse_args()
    if args.worker:
        return worker(json.loads(args.worker))
    if args.matmul_peak:
        print(json.dumps({"gflops": matmul_peak()}))
        return None

    from workload import PRESETS, prepare_workload

    shape = PRESETS[args.preset]
    short, long_ = args.steps
    rows = long_ * shape.pairs_per_step
    work = prepare_workload(shape, Path(args.workdir), rows, args.model)
    work.update(batch_size=shape.pairs_per_step, max_length=shape.max_length + 2)
    work["cache"] = str(Path(args.workdir) / "datasets-cache")
    pairs = pair_tokens(work)
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    def chosen(label: str, contender: str, names: str | None) -> bool:
        if names is None:
            return False
        return any(n.strip() in (label, contender) for n in names.split(","))

    measurements = [
        Measurement(label, contender, overrides)
        for label, contender, overrides in CONTENDERS
        if (args.only is None or chosen(label, contender, args.only))
        and not chosen(label, contender, args.skip)
    ]
    if not any(m.label == "dpokit (default)" for m in measurements):
        measurements.insert(0, Measurement(*CONTENDERS[0]))

    def peak() -> float:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--matmul-peak"]
        return json.loads(subprocess.run(cmd, capture_output=True, text=True).stdout)["gflops"]

    peaks = [peak()]
    log(f"matmul peak {peaks[0]:.0f} GFLOP/s; {len(measurements)} contenders x {args.repeats}")
    started = time.perf_counter()
    for repeat in range(args.repeats):
        order = measurements if repeat % 2 == 0 else measurements[::-1]
        for m in order:
            counts = (short, long_) if repeat % 2 == 0 else (long_, short)
            for steps in counts:
                spec = {
                    "contender": m.contender,
                    "overrides": m.overrides,
                    "steps": steps,
                    "work": work,
                }
                attempts = [run_worker(spec, log, tuple(args.quiet))]
                while attempts[-1]["foreign_cpu_share"] > 0.10 and len(attempts) <= args.retries:
                    log(f"  other processes took {attempts[-1]['foreign_cpu_share']:.0%}: again")
                    attempts.append(run_worker(spec, log, tuple(args.quiet)))
                result = min(attempts, key=lambda a: a["foreign_cpu_share"])
                result.update(repeat=repeat, steps=steps, attempts=len(attempts))
                m.runs.append(result)
                log(
                    f"[{time.perf_counter() - started:6.0f}s] repeat {repeat} {m.label:45s} "
                    f"{steps} steps: {result['seconds']:.1f}s, cpu {result['cpu_seconds']:.1f}s, "
                    f"others used {result['foreign_cpu_share']:.0%} of the CPUs"
                )
                raw = [
                    {"label": x.label, "overrides": x.overrides, "runs": x.runs}
                    for x in measurements
                ]
                (out_dir / "raw_runs.json").write_text(json.dumps(raw, indent=1))
    peaks.append(peak())
    peak_gflops = max(peaks)
    table = summarize(measurements, work, pairs, (short, long_), peak_gflops)
    import torch

    foreign = [run["foreign_cpu_share"] for m in measurements for run in m.runs]
    meta = {
        "preset": args.preset,
        "shape": shape.to_dict(),
        "shape_text": (
            f"{shape.arch} hidden {shape.hidden_size}, {shape.num_layers} layers, vocab "
            f"{shape.vocab_size}, prompts {shape.prompt_tokens[0]}-{shape.prompt_tokens[1]} "
            "tokens, "
            f"completions {shape.completion_tokens[0]}-{shape.completion_tokens[1]}, "
            f"{shape.pairs_per_step} pairs/step"
            if args.model is None
            else f"checkpoint {args.model}"
        ),
        "model": work["model"],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "cuda": torch.cuda.is_available(),
        "peak_gflops": peak_gflops,
        "peak_gflops_measurements": peaks,
        "flops_per_step": model_flops_per_step(
            work["model"], pairs[short * shape.pairs_per_step : long_ * shape.pairs_per_step]
        )
        / (long_ - short),
        "steps": [short, long_],
        "repeats": args.repeats,
        "foreign_median": statistics.median(foreign),
        "foreign_max": max(foreign),
        "command": " ".join(sys.argv),
        "wall_seconds": time.perf_counter() - started,
    }
    text = markdown(table, meta)
    if not args.no_profile:
        text += "\n\n" + profile_markdown(work)
    (out_dir / "RESULTS.md").write_text(text + "\n")
    (out_dir / "results.json").write_text(
        json.dumps(
            {
                "meta": meta,
                "table": table,
                "raw": [{"label": m.label, "runs": m.runs} for m in measurements],
            },
            indent=1,
        )
    )
    print(text)
    return None


if __name__ == "__main__":
    main()
