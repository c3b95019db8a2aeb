"""One command for a machine with a CUDA GPU: dpokit's bf16 + flash-attention padding-free path end
to end on a real-shape model, and the benchmark against TRL (with and without use_liger_kernel).

    bash benchmarks/gpu_check.sh OUT_DIR [--install] [--cpu] [--budget SECONDS] ...
    python benchmarks/gpu_check.py OUT_DIR ...                  # the same, once dpokit imports

Steps, each in a subprocess with a time limit, all within ``--budget`` seconds (default 540 on a
GPU, so that the whole check ends within ~10 minutes on one H200):

1. ``env``: python, torch, CUDA, the GPU, and the versions of transformers, accelerate, trl,
   liger-kernel, flash-attn ("not installed" when absent).
2. ``install`` (only with ``--install``): ``pip install`` what is missing of ``trl>=1.16``,
   ``liger-kernel`` (``--no-deps``: it needs only torch and triton, which a CUDA torch brings) and
   a flash-attention: ``flash-attn`` (``--no-deps --only-binary=:all:``: a wheel from the index,
   or from the folder in ``$GPU_CHECK_WHEELS``; its source build takes far longer than this check
   has), else ``flash-attn-4`` (binary, Hopper and newer). The installed torch is pinned in each
   command. Each install has its own time limit; a failed one is reported and the check goes on.
   ``env`` then picks flash_attention_2, 3 or 4, the first that is installed and runs a packed
   forward on the GPU.
3. ``model``: Qwen2.5-0.5B's published shape (gpu_check_steps.QWEN25_05B) with random weights and
   a small BPE tokenizer, ``save_pretrained``, plus preference pairs (benchmarks/workload.py).
4. ``train``: ``dpokit train`` (the CLI) with ``mixed_precision=bf16
   attn_implementation=flash_attention_2 packing=padding_free`` (or the flash version ``env``
   chose). Checks: the run finishes and saves ``final/``, every loss is finite, the first loss is
   ln 2 (policy = reference) to bf16 tolerance.
5. ``logps``: one batch through dpokit's CompletionScorer, padding-free vs two rows per pair (both
   bf16 autocast, same attention kernel) and vs fp32 SDPA. Checks: the same completion tokens, and
   per-sequence log-probs equal to bf16 tolerance (relative 2^-8, one bf16 rounding step).
6. ``bench`` (gpu_check_bench.py): dpokit bf16 padding-free + flash-attention, TRL's DPOTrainer in
   bf16, TRL + ``use_liger_kernel``, dpokit bf16 default, TRL + flash-attention; s/step,
   tokens/s, CUDA memory, MFU against the measured bf16 matmul peak, first-step numbers.

Without CUDA (or with ``--cpu``) the same steps run on a 2-layer model of the same family with bf16
autocast on CPU and SDPA instead of flash-attention; what needs CUDA is listed as skipped.
Output: ``OUT_DIR/results.json`` and ``OUT_DIR/RESULTS.md`` (written after every step), logs in
``OUT_DIR/logs/``; models and runs in a temporary directory, removed at the end (``--keep-work``:
in ``OUT_DIR/work``). Exit status 0 when every check passed (skips are not failures unless
``--require-flash``), 1 when a check failed or a step broke, naming each on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from gpu_check_bench import last_error, plan_rows, run_bench, run_limited, summarize  # noqa: E402
from gpu_check_report import Report  # noqa: E402

BF16_RTOL = 2.0**-8  # one bf16 rounding step (8 significant bits), relative
# The first loss is ln 2 - beta/2 * mean(h) + O(h^2): 0.01 lets bf16 rounding move the reward
# margin h of the policy against its own precomputed reference by up to 0.2 nat (beta 0.1).
LOSS_ATOL = 1e-2
BETA = 0.1

# Per mode: pairs per step, training steps, benchmark step counts, time limits (s) of the steps.
SETTINGS = {
    "gpu": dict(batch=8, train_steps=8, bench_steps=(3, 8), budget=540, limits=dict(
        env=90, install=150, model=180, train=240, logps=150, bench=180)),
    "cpu": dict(batch=4, train_steps=3, bench_steps=(2, 4), budget=900, limits=dict(
        env=90, install=150, model=150, train=300, logps=150, bench=240)),
}  # fmt: skip


class StepError(RuntimeError):
    """A step's subprocess failed, timed out or wrote no result."""


class Check:
    """The run of one check: its settings, scratch directories, deadline and report."""

    def __init__(self, args):
        self.args = args
        self.out = Path(args.out_dir).resolve()
        # The weights (2 GB for the real shape, twice more in the runs' final/) stay out of OUT_DIR
        # unless asked for: results and logs are what comes back from a GPU machine.
        work = self.out / "work" if args.keep_work else tempfile.mkdtemp(prefix="gpu_check-")
        self.work, self.logs = Path(work), self.out / "logs"
        self.work.mkdir(parents=True, exist_ok=True)
        self.logs.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + (args.budget or SETTINGS["gpu"]["budget"])
        self.report = Report(self.out, " ".join(sys.argv))
        self.mode = "cpu" if args.cpu else "gpu"

    @property
    def settings(self) -> dict:
        return SETTINGS[self.mode]

    def limit(self, name: str) -> float:
        """The step's time limit, cut to what the budget has left; StepError when nothing is."""
        left = self.deadline - time.monotonic()
        if left < 20:
            raise StepError(f"{name}: the check's time budget is spent")
        return min(self.settings["limits"][name], left)

    def step(self, name: str, *extra: str) -> dict:
        """Run gpu_check_steps.py STEP; its JSON result."""
        result = self.work / f"{name}.json"
        result.unlink(missing_ok=True)
        cmd = [sys.executable, str(HERE / "gpu_check_steps.py"), name, "--mode", self.mode]
        cmd += ["--work", str(self.work), "--result", str(result), *extra]
        limit = self.limit(name)
        log = self.logs / f"{name}.log"
        status = run_limited(cmd, limit, log)
        if status["returncode"] != 0 or not result.exists():
            why = f"timed out after {limit:.0f} s" if status["timed_out"] else "failed"
            raise StepError(f"{name} {why}: {last_error(log)} (log {log})")
        self.report.timing(name, status["seconds"])
        return json.loads(result.read_text())


def pip_install(check: Check, name: str, pip_args: list[str]) -> bool:
    """``pip install pip_args`` under the install time limit; reported; True when it worked."""
    cmd = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *pip_args]
    log = check.logs / f"install-{name}.log"
    try:
        status = run_limited(cmd, check.limit("install"), log)
    except StepError as error:
        check.report.install(name, "skipped", str(error))
        return False
    ok = status["returncode"] == 0
    detail = " ".join(pip_args) + ("" if ok else f": {last_error(log)}")
    check.report.install(name, "installed" if ok else "failed", detail)
    return ok


def install(check: Check, env: dict) -> None:
    """pip-install what is missing of trl, liger-kernel and a flash-attention; each reported.

    The installed torch is pinned in every command that resolves dependencies, so that pip
    fails rather than replace it; binaries only for flash-attention (no source builds)."""
    cuda = env["cuda_available"]
    pin = [f"torch=={env['versions']['torch']}"]
    wheels = os.environ.get("GPU_CHECK_WHEELS")
    binary = ["--only-binary=:all:", *(["--find-links", wheels] if wheels else [])]
    if env["versions"]["trl"] == "not installed":
        pip_install(check, "trl", ["trl>=1.16", *pin])
    else:
        check.report.install("trl", "already there", env["versions"]["trl"])
    for name, missing in (("liger-kernel", not env["liger_importable"]),
                          ("flash-attention", env["flash_attention"] is None)):  # fmt: skip
        if not missing:
            check.report.install(name, "already there", "")
        elif not cuda:
            check.report.install(name, "skipped", "needs CUDA")
        elif name == "liger-kernel":  # needs only torch and triton, which a CUDA torch brings
            pip_install(check, name, ["--no-deps", "liger-kernel"])
        elif not pip_install(check, "flash-attn", ["--no-deps", *binary, "flash-attn"]):
            # flash-attn 2 ships no wheels on PyPI; flash-attn-4 (CuTe DSL, Hopper and newer) does
            pip_install(check, "flash-attn-4", [*binary, "flash-attn-4", *pin])


def train(check: Check, model: dict, attn: str) -> None:
    """``dpokit train`` through the CLI on the bf16 padding-free path; its checks."""
    run_dir = check.work / "train"
    steps, length = check.settings["train_steps"], model["max_length"]
    cmd = [sys.executable, "-m", "dpokit.cli", "train", "--method", "dpo"]
    cmd += ["--model", model["model"], "--data", model["data"], "--output-dir", str(run_dir)]
    cmd += [
        "mixed_precision=bf16",
        f"attn_implementation={attn}",
        "packing=padding_free",
        f"max_steps={steps}",
        f"batch_size={check.settings['batch']}",
        f"beta={BETA}",
        "learning_rate=1e-6",
        "lr_scheduler=constant",
        "warmup_ratio=0",
        f"max_length={length}",
        f"max_prompt_length={length - 1}",
        # Training batches = the reference pre-computation's batches, so the first loss tests
        # bf16 itself and not a different packing of the same rows.
        "shuffle=false",
        "progress=false",
        f"reference_cache_dir={check.work / 'reference-cache'}",
        "overwrite=true",
    ]
    limit = check.limit("train")
    status = run_limited(cmd, limit, check.logs / "train.log")
    check.report.timing("train", status["seconds"])
    ok = status["returncode"] == 0 and (run_dir / "final" / "config.json").exists()
    why = "timed out" if status["timed_out"] else f"exit {status['returncode']}"
    records = []
    if (run_dir / "metrics.jsonl").exists():
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        records = [json.loads(x) for x in lines if x.strip()]
        records = [r for r in records if r.get("split", "train") == "train"]
    check.report.check(
        "train: dpokit train ran every step and saved final/",
        ok and len(records) == steps,
        f"{len(records)} of {steps} steps logged"
        + ("" if ok else f"; {why}: {last_error(check.logs / 'train.log')}"),
    )
    check.report.section("train", {"command": " ".join(cmd), "records": records})
    if not records:
        return
    losses = [r["loss"] for r in records]
    check.report.check(
        "train: every loss is finite", all(map(math.isfinite, losses)), f"losses {losses}"
    )
    first = losses[0]
    check.report.check(
        "train: first loss = ln 2 (policy = reference) to bf16 tolerance",
        abs(first - math.log(2)) <= LOSS_ATOL,
        f"{first:.6f} - ln 2 = {first - math.log(2):+.2e}",
        f"abs {LOSS_ATOL}",
    )


def logps(check: Check, model: dict, attn: str) -> None:
    """The direct log-prob comparison of one batch; its checks."""
    model_json = check.work / "model.json"
    batch = str(check.settings["batch"])
    out = check.step("logps", "--model-json", str(model_json), "--batch", batch, "--attn", attn)
    check.report.section("logps", out)
    check.report.check(
        "logps: padding_free scores the same completion tokens as two rows", out["same_tokens"]
    )
    check.report.check(
        f"logps: padding_free = two rows, both bf16 + {attn}",
        out["rel_padding_free_vs_two_rows"] <= BF16_RTOL,
        f"max relative difference {out['rel_padding_free_vs_two_rows']:.2e}",
        f"rel {BF16_RTOL:.2e}",
    )
    check.report.check(
        "logps: bf16 = fp32 (sdpa, two rows)",
        out["rel_bf16_vs_fp32"] <= BF16_RTOL,
        f"max relative difference {out['rel_bf16_vs_fp32']:.2e}",
        f"rel {BF16_RTOL:.2e}",
    )
    check.report.check(
        "logps: bf16 autocast ran (its log-probs differ from fp32 in the last bits)",
        out["bf16_differs_from_fp32"],
    )


def bench(check: Check, env: dict, model: dict) -> None:
    """The benchmark rows that fit the remaining budget; a row that broke is a failure."""
    import bench_dpo

    work = {
        "model": model["model"],
        "data": model["data"],
        "batch_size": check.settings["batch"],
        "max_length": model["max_length"],
        "cache": str(check.work / "hf"),
    }
    rows = plan_rows(env)
    steps = tuple(check.args.steps or check.settings["bench_steps"])
    timeout = check.settings["limits"]["bench"]
    peak = run_bench(rows, work, steps, check.deadline - 10, timeout, check.logs)
    short, long_ = steps
    pairs = bench_dpo.pair_tokens(work)[short * work["batch_size"] : long_ * work["batch_size"]]
    tokens = sum(p["sequence_tokens"] for p in pairs) / (long_ - short)
    flops = bench_dpo.model_flops_per_step(model["model"], pairs) / (long_ - short)
    table = summarize(rows, steps, tokens, flops, peak)
    meta = {"steps": steps, "pairs_per_step": work["batch_size"], "tokens_per_step": tokens,
            "flops_per_step": flops, "bf16_peak_tflops": peak}  # fmt: skip
    check.report.bench(meta, table, rows)
    for row in rows:
        if row.error:
            check.report.check(f"bench: {row.label} ran", False, row.error)


def run(check: Check) -> None:
    env = check.step("env")
    if not env["cuda_available"] and check.mode == "gpu":
        check.mode = "cpu"
        check.report.note("no CUDA device: CPU mode (bf16 autocast on CPU, sdpa)")
    if check.args.budget is None:
        check.deadline += check.settings["budget"] - SETTINGS["gpu"]["budget"]
    if check.args.install:
        install(check, env)
        env = check.step("env")
    check.report.section("env", env)
    check.report.set_mode(check.mode, env)
    flash = env["flash_attention"] if check.mode == "gpu" else None
    attn = flash or "sdpa"
    if not flash:
        not_used = env["flash_attention_not_used"].items()
        why = "no CUDA" if check.mode == "cpu" else "; ".join(f"{k}: {v}" for k, v in not_used)
        check.report.skip(
            "flash-attention (varlen)", f"{why}: padding_free ran with sdpa's packed mask"
        )
        if check.args.require_flash:
            check.report.check("flash-attention available (--require-flash)", False, why)
    rows = max(check.settings["train_steps"], max(check.settings["bench_steps"]))
    model = check.step("model", "--rows", str(rows * check.settings["batch"]),
                       "--batch", str(check.settings["batch"]))  # fmt: skip
    check.report.section("model", model)
    for name, action in (("train", train), ("logps", logps)):
        try:
            action(check, model, attn)
        except StepError as error:
            check.report.check(f"{name}: step ran", False, str(error))
    if check.args.no_bench:
        check.report.skip("benchmark", "--no-bench")
    else:
        bench(check, env, model)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("out_dir", help="directory for results.json, RESULTS.md, logs/, work/")
    parser.add_argument("--cpu", action="store_true", help="CPU mode even when CUDA is there")
    parser.add_argument("--install", action="store_true", help="pip-install trl, liger, flash")
    parser.add_argument("--budget", type=float, help="seconds for everything (gpu 540, cpu 900)")
    parser.add_argument("--steps", type=int, nargs=2, metavar=("SHORT", "LONG"))
    parser.add_argument("--no-bench", action="store_true", help="checks only, no benchmark")
    parser.add_argument(
        "--keep-work",
        action="store_true",
        help="keep models and runs in OUT_DIR/work (else a temp dir, removed)",
    )
    parser.add_argument(
        "--require-flash", action="store_true", help="fail (not skip) without flash-attention"
    )
    check = Check(parser.parse_args())
    try:
        run(check)
    except StepError as error:  # env or model broke: nothing after them can run
        check.report.check("setup steps ran", False, str(error))
    finally:
        if not check.args.keep_work:
            shutil.rmtree(check.work, ignore_errors=True)
    return check.report.finish()


if __name__ == "__main__":
    sys.exit(main())
