"""The benchmark part of gpu_check.py: dpokit against TRL's DPOTrainer in bf16, TRL with and
without ``use_liger_kernel``, on the check's model and pairs.

It reuses the benchmark's contenders (``contenders.run``: the same DPO run, beta 0.1, AdamW lr 1e-6
constant, same batch, data in file order) and its step differencing: steady-state time per step =
(time of LONG steps - time of SHORT steps) / (LONG - SHORT), each count in a fresh subprocess. But
contenders.py trains in fp32 and has no liger switch, and bench_dpo.py has no option for either,
so (leaving both files as they are) the worker here wraps ``trl.DPOConfig`` to force a row's TRL
arguments (``bf16=True``: autocast over fp32 weights, what dpokit's ``mixed_precision=bf16`` does;
``use_liger_kernel``; the attention kernel), and gives dpokit its overrides as bench_dpo.py does.

    python benchmarks/gpu_check_bench.py --worker SPEC_JSON   # one run (used by run_bench)
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

MARKER = "GPU_CHECK_RESULT "


@dataclass
class Row:
    """One configuration of the benchmark; ``skip`` says why it is not run here (or None)."""

    label: str
    contender: str  # a name contenders.run knows: "dpokit" or "trl_precomputed"
    overrides: dict = field(default_factory=dict)  # dpokit config keys
    trl_args: dict = field(default_factory=dict)  # DPOConfig arguments forced for TRL
    skip: str | None = None
    runs: dict = field(default_factory=dict)  # steps -> worker result
    error: str | None = None


def plan_rows(env: dict) -> list[Row]:
    """The rows, most important first (a short time budget drops the last ones)."""
    cuda, flash = env["cuda_available"], env["flash_attention"]
    attn = flash or "sdpa"
    no_trl = None if env["versions"]["trl"] != "not installed" else "trl not installed"
    if not cuda:
        no_liger = "needs CUDA (liger-kernel's kernels are Triton)"
    elif not env["liger_importable"]:
        no_liger = "liger-kernel not installed (or not importable)"
    else:
        no_liger = no_trl
    no_flash = None if flash else "no flash-attention here (see env)"
    # Transformers refuses bf16 without a GPU unless told to use the CPU.
    trl_bf16 = {"bf16": True} if cuda else {"bf16": True, "use_cpu": True}
    pf_label = f"dpokit bf16 packing=padding_free + {flash} (varlen)"
    return [
        Row(
            pf_label if flash else "dpokit bf16 packing=padding_free (sdpa, packed mask)",
            "dpokit",
            {"mixed_precision": "bf16", "packing": "padding_free", "attn_implementation": attn},
        ),
        Row("TRL DPOTrainer bf16", "trl_precomputed", trl_args=trl_bf16, skip=no_trl),
        Row(
            "TRL DPOTrainer bf16 + use_liger_kernel",
            "trl_precomputed",
            trl_args={**trl_bf16, "use_liger_kernel": True},
            skip=no_liger,
        ),
        Row("dpokit bf16 (default packing=auto, sdpa)", "dpokit", {"mixed_precision": "bf16"}),
        Row(  # TRL 1.16's DPOTrainer turns padding_free off ("temporarily unavailable"), so
            # this row is TRL's padded batches with the flash kernel (which unpads them itself)
            f"TRL DPOTrainer bf16 + {flash or 'flash-attention'} (padded)",
            "trl_precomputed",
            trl_args={**trl_bf16, "model_init_kwargs": {"attn_implementation": flash}},
            skip=no_trl or no_flash,
        ),
    ]


# --------------------------------------------------------------------------------------------------
# Worker side


def force_trl_args(forced: dict) -> None:
    """Make ``from trl import DPOConfig`` (inside contenders.run_trl) return a config with
    ``forced`` set; ``model_init_kwargs`` is merged into the contender's (which sets the dtype)."""
    import trl

    original = trl.DPOConfig

    def config(**kwargs):
        merged = {**kwargs, **forced}
        if "model_init_kwargs" in forced:
            merged["model_init_kwargs"] = {
                **(kwargs.get("model_init_kwargs") or {}),
                **forced["model_init_kwargs"],
            }
        return original(**merged)

    trl.DPOConfig = config


def matmul_peak_bf16(seconds: float = 2.0) -> float:
    """Best sustained bf16 TFLOP/s of a square matmul on this process's device."""
    import torch

    cuda = torch.cuda.is_available()
    n = 8192 if cuda else 1024
    a = torch.randn(n, n, device="cuda" if cuda else "cpu", dtype=torch.bfloat16)
    best, deadline = 0.0, time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(5):
            a @ a
        if cuda:
            torch.cuda.synchronize()
        best = max(best, 5 * 2 * n**3 / (time.perf_counter() - start) / 1e12)
    return best


def worker(spec: dict) -> None:
    """One contender, one step count, in this process; prints its result after MARKER."""
    if spec.get("peak"):
        print(MARKER + json.dumps({"tflops": matmul_peak_bf16()}), flush=True)
        return
    import contenders
    import torch

    if spec["trl_args"]:
        force_trl_args(spec["trl_args"])
    result = contenders.run(spec["contender"], spec["work"], spec["steps"], spec["overrides"])
    if torch.cuda.is_available():
        result["cuda_max_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    print(MARKER + json.dumps(result), flush=True)


# --------------------------------------------------------------------------------------------------
# Parent side


def run_limited(cmd: list[str], timeout: float, log: Path, env: dict | None = None) -> dict:
    """Run ``cmd`` with stdout+stderr to ``log``; kill its whole process group after ``timeout``
    seconds. Returns returncode, timed_out, wall seconds and its peak RSS (MB)."""
    timed_out = threading.Event()
    with log.open("w") as out:
        start = time.perf_counter()
        proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True
        )

        def kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout, kill)
        timer.start()
        try:
            _, status, usage = os.wait4(proc.pid, 0)
        finally:
            timer.cancel()
    proc.returncode = os.waitstatus_to_exitcode(status)
    return {
        "returncode": proc.returncode,
        "timed_out": timed_out.is_set(),
        "seconds": time.perf_counter() - start,
        "peak_rss_mb": usage.ru_maxrss / 1024,  # Linux: KiB
    }


def tail(path: Path, chars: int = 2000) -> str:
    """The last ``chars`` characters of a log."""
    text = path.read_text(errors="replace") if path.exists() else ""
    return text[-chars:]


def last_error(path: Path) -> str:
    """The line of a log that says what went wrong: the last exception line, else the last
    non-empty line."""
    lines = [x.strip() for x in tail(path, 20000).splitlines() if x.strip()]
    errors = [x for x in lines if "Error" in x.split(":")[0] or x.startswith("dpokit: error")]
    return (errors or lines or ["(empty log)"])[-1][:400]


def run_worker(spec: dict, timeout: float, log: Path) -> dict:
    """One worker subprocess; its result, or RuntimeError with the end of its log."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    status = run_limited(cmd, timeout, log, env)
    lines = [x for x in log.read_text(errors="replace").splitlines() if x.startswith(MARKER)]
    if status["returncode"] != 0 or not lines:
        why = f"timed out after {timeout:.0f} s" if status["timed_out"] else "failed"
        raise RuntimeError(f"{why}: {last_error(log)} (log {log})")
    result = json.loads(lines[-1].removeprefix(MARKER))
    result.update(process_seconds=status["seconds"], peak_rss_mb=status["peak_rss_mb"])
    return result


def run_bench(rows: list[Row], work: dict, steps: tuple[int, int], deadline: float,
              timeout: float, logs: Path) -> float | None:  # fmt: skip
    """Run every row that is not skipped, SHORT then LONG steps, while ``deadline`` (a
    time.monotonic() value) leaves room; a row that does not fit gets ``skip``. Returns the bf16
    matmul peak (TFLOP/s) measured first, or None."""
    logs.mkdir(parents=True, exist_ok=True)
    try:
        peak = run_worker({"peak": True}, 60, logs / "bench-peak.log")["tflops"]
    except RuntimeError:
        peak = None
    estimate = 60.0  # seconds a worker takes, until one has been timed
    for i, row in enumerate(rows):
        if row.skip:
            continue
        if deadline - time.monotonic() < 2 * estimate:
            row.skip = "time budget of the check spent"
            continue
        for steps_count in steps:
            spec = {
                "contender": row.contender,
                "overrides": row.overrides,
                "trl_args": row.trl_args,
                "steps": steps_count,
                "work": work,
            }
            limit = min(timeout, max(deadline - time.monotonic(), 1.0))
            try:
                result = run_worker(spec, limit, logs / f"bench-{i}-{steps_count}.log")
            except RuntimeError as error:
                row.error = str(error)
                break
            row.runs[steps_count] = result
            estimate = max(estimate, result["process_seconds"])
    return peak


def summarize(rows: list[Row], steps: tuple[int, int], tokens_per_step: float,
              flops_per_step: float, peak_tflops: float | None) -> list[dict]:  # fmt: skip
    """Per measured row: seconds per step, pairs and tokens per second, memory, MFU against the
    bf16 matmul peak, first-step numbers, ratios to row 0.

    Seconds per step: the median of the LONG run's single steps 2..N (each optimizer step timed
    inside the run) - steady on a GPU and robust to a disturbance that lands in one run - and,
    as a cross-check, (time of LONG steps - time of SHORT) / (LONG - SHORT), which also counts
    what a step costs outside the loop but takes the noise of two whole runs.
    """
    short, long_ = steps
    table = []
    for row in rows:
        if short not in row.runs or long_ not in row.runs:
            continue
        a, b = row.runs[short], row.runs[long_]
        in_run = b.get("step_seconds") or []
        differenced = (b["seconds"] - a["seconds"]) / (long_ - short)
        per_step = statistics.median(in_run) if in_run else differenced
        table.append(
            {
                "label": row.label,
                "seconds_per_step": per_step,
                "differenced_seconds_per_step": differenced,
                "tokens_per_second": tokens_per_step / per_step if per_step > 0 else None,
                "peak_rss_mb": b["peak_rss_mb"],
                "cuda_max_allocated_mb": b.get("cuda_max_allocated_mb"),
                "mfu": flops_per_step / per_step / (peak_tflops * 1e12)
                if peak_tflops and per_step > 0
                else None,
                "first_step": b["first_step"],
                "padding_fraction": b.get("padding_fraction"),
            }
        )
    if table:
        base = table[0]
        for entry in table:
            entry["dpokit_speedup"] = entry["seconds_per_step"] / base["seconds_per_step"]
            first, ref = entry["first_step"], base["first_step"]
            entry["logps_rel_diff"] = max(
                (abs(first[k] - ref[k]) / max(abs(ref[k]), 1e-12) for k in first if k in ref),
                default=None,
            )
    return table


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker(json.loads(sys.argv[2]))
    else:
        sys.exit(__doc__)
