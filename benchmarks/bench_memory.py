"""Peak memory of one DPO step as completions grow: dpokit against TRL's DPOTrainer.

    python benchmarks/bench_memory.py                           # 256 ... 8192, cap 20 GiB
    python benchmarks/bench_memory.py --cap-gib 12 --lengths 256,1024,2048,4096
    python benchmarks/bench_memory.py --only dpokit --dpokit packing=none --tag packing-none

The model has Qwen2.5-0.5B's width and 151,936-entry vocabulary with 2 layers (workload.py,
preset ``qwen2.5-0.5b``), built from its config and saved; one pair per step, a 64-token prompt,
chosen and rejected completions of exactly L tokens each (EOS included), fp32, gradient
checkpointing on for both contenders, AdamW, 3 optimizer steps; the reference log-probs are
pre-computed by both (dpokit's default reference mode for DPO; TRL's
``precompute_ref_log_probs=True`` with a pre-compute batch of one pair, as in training).

Each (contender, length) runs in a fresh subprocess under an address-space cap
(``RLIMIT_AS``, ``--cap-gib``): a contender that needs more fails its allocation and is recorded
as "OOM", and longer lengths of it are then skipped. Reported per length: the process's peak RSS
(``wait4``'s ``ru_maxrss``: the whole run, loading and reference pass included), its peak virtual
size (what the cap limits), the median time of steps 2..N, the first step's loss and
``logps/chosen`` (equal across contenders when they score the same tokens); and per segment
between consecutive lengths, the growth of the peak in MB per 1k completion tokens (each of the
pair's two completions grows by that many tokens). Output: Markdown and JSON in ``--out``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
sys.path.insert(0, str(HERE))

from workload import PRESETS, prepare_workload  # noqa: E402

PRESET = "qwen2.5-0.5b"
LENGTHS = (256, 1024, 2048, 4096, 8192)
PROMPT_TOKENS = 64
# What each contender runs: (contender in contenders.py, settings on top of its defaults).
CONTENDERS = {
    "dpokit": ("dpokit", {"gradient_checkpointing": True}),
    "trl": ("trl_precomputed", {"gradient_checkpointing": True, "precompute_ref_batch_size": 1}),
}
LABELS = {"dpokit": "dpokit (defaults)", "trl": "TRL 1.16 DPOTrainer, pre-computed reference"}
# Failures that mean "the cap was hit": torch's CPU allocator, Python, the C++ runtime.
OOM_MARKERS = (
    "can't allocate memory",
    "cannot allocate memory",
    "memoryerror",
    "bad_alloc",
    "out of memory",
    "defaultcpuallocator",
)


def workloads(lengths, steps: int, root: Path) -> dict[int, dict]:
    """Per completion length, the ``work`` dict of contenders.py: one model for all lengths,
    one JSONL of ``steps`` pairs per length (prompt 64 tokens, completions L incl. EOS)."""
    base = PRESETS[PRESET]
    model = prepare_workload(base, root, steps)["model"]
    out = {}
    for length in lengths:
        shape = dataclasses.replace(
            base,
            name=f"{PRESET}-c{length}",
            prompt_tokens=(PROMPT_TOKENS, PROMPT_TOKENS),
            completion_tokens=(length, length),
        )
        work = prepare_workload(shape, root, steps, model_path=model)
        # +2: room for a BOS or template token without truncating anything
        work.update(batch_size=1, max_length=shape.max_length + 2)
        out[length] = work
    return out


def _cap(limit_bytes: int):
    def apply() -> None:  # runs in the child between fork and exec
        resource.setrlimit(resource.RLIMIT_AS, (limit_bytes, limit_bytes))

    return apply


def run_capped(spec: dict, cap_gib: float, log) -> dict:
    """One contender and length in a fresh interpreter under an address-space cap."""
    with tempfile.TemporaryFile("w+") as out:
        env = dict(os.environ, TOKENIZERS_PARALLELISM="false", TQDM_DISABLE="1")
        # dpokit from this checkout, whatever copy the environment has installed
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(SRC), env.get("PYTHONPATH")]))
        cmd = [sys.executable, str(HERE / "bench_dpo.py"), "--worker", json.dumps(spec)]
        start = time.perf_counter()
        cap = _cap(int(cap_gib * 2**30))
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, preexec_fn=cap)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        out.seek(0)
        text = out.read()
    code = os.waitstatus_to_exitcode(status)
    record = {"peak_rss_mb": usage.ru_maxrss / 1024, "process_seconds": wall, "exit_code": code}
    lines = [line for line in text.splitlines() if line.startswith("BENCH_RESULT ")]
    if code == 0 and lines:
        record.update(json.loads(lines[-1].removeprefix("BENCH_RESULT ")), status="ok")
        return record
    lowered = text.lower()
    oom = code == -9 or any(marker in lowered for marker in OOM_MARKERS)
    record.update(status="OOM" if oom else "failed", error_tail=text[-2000:])
    if not oom:
        log(text[-3000:])
    return record


def parse_overrides(items: list[str]) -> dict:
    """``key=value`` strings -> dict, values read as JSON where they parse (numbers, booleans)."""
    out = {}
    for item in items:
        key, _, raw = item.partition("=")
        try:
            out[key] = json.loads(raw)
        except json.JSONDecodeError:
            out[key] = raw
    return out


def measure(args, works: dict[int, dict], log, kept: dict[str, dict[int, dict]]):
    """Run every chosen contender at every length, shortest first; after an OOM the longer
    lengths of that contender are skipped (they need at least as much). Yields the results so
    far ({contender: {length: record}}, on top of ``kept``: earlier runs' records) after each."""
    extra = {"dpokit": parse_overrides(args.dpokit), "trl": parse_overrides(args.trl)}
    chosen = args.only.split(",")
    names = [name for name in CONTENDERS if name in chosen or name in kept]
    results = {name: dict(kept.get(name, {})) for name in names}
    started = time.perf_counter()
    for length, work in works.items():
        for name in chosen:
            by_length = results[name]
            contender, settings = CONTENDERS[name]
            if any(r["status"] == "OOM" for k, r in by_length.items() if k < length):
                by_length[length] = {"status": "skipped (OOM at a shorter length)"}
                yield results
                continue
            spec = {
                "contender": contender,
                "overrides": {**settings, **extra[name]},
                "steps": args.steps,
                "work": work,
            }
            record = run_capped(spec, args.cap_gib, log)
            record.update(cap_gib=args.cap_gib, steps=args.steps)
            by_length[length] = record
            log(
                f"[{time.perf_counter() - started:6.0f}s] {name:7s} L={length:5d}: "
                f"{record['status']}, peak RSS {record.get('peak_rss_mb', 0):.0f} MB, "
                f"{record['process_seconds']:.0f}s"
            )
            yield results


def step_seconds(record: dict) -> float | None:
    times = record.get("step_seconds") or []
    return statistics.median(times) if times else None


def growth(by_length: dict[int, dict]) -> list[tuple[int, int, float | None]]:
    """(L_a, L_b, MB of peak RSS per 1k completion tokens between them) for consecutive
    lengths; None where either end did not finish."""
    lengths = sorted(by_length)
    out = []
    for a, b in zip(lengths, lengths[1:], strict=False):
        ra, rb = by_length[a], by_length[b]
        ok = ra.get("status") == "ok" and rb.get("status") == "ok"
        slope = (rb["peak_rss_mb"] - ra["peak_rss_mb"]) / ((b - a) / 1000) if ok else None
        out.append((a, b, slope))
    return out


def _cell(record: dict) -> str:
    status = record.get("status")
    if status == "ok":
        seconds = step_seconds(record)
        timing = f"{seconds:.1f}" if seconds is not None else "-"
        return f"{record['peak_rss_mb'] / 1024:.2f} | {timing}"
    if status == "OOM":
        return f"OOM (> {record['cap_gib']:g} GiB) | -"
    return f"{status or 'not run'} | -"


def markdown(results: dict, meta: dict) -> str:
    names = list(results)
    lengths = sorted({length for by in results.values() for length in by})
    head = " | ".join(f"{LABELS[n]}: peak RSS GB | s/step" for n in names)
    lines = [
        f"Model: {meta['shape_text']}. Machine: {meta['machine']}. Cap: RLIMIT_AS "
        f"(see the commands below) per process. s/step is the median of steps 2..N on a shared CPU "
        "(indicative only); peak RSS is the whole run's, loading and reference pass included.",
        "",
        f"| completion tokens | {head} | logps/chosen (first step) |",
        "|---|" + "---|---|" * len(names) + "---|",
    ]
    for length in lengths:
        cells = " | ".join(_cell(results[n].get(length, {})) for n in names)
        logps = ", ".join(
            f"{results[n][length]['first_step'].get('logps/chosen', float('nan')):.2f}"
            for n in names
            if results[n].get(length, {}).get("status") == "ok"
        )
        lines.append(f"| {length} | {cells} | {logps} |")
    lines += ["", "Growth of the peak, MB per 1k completion tokens:", ""]
    lines.append("| segment | " + " | ".join(LABELS[n] for n in names) + " |")
    lines.append("|---|" + "---|" * len(names))
    slopes = {n: growth(results[n]) for n in names}
    for i, (a, b, _) in enumerate(slopes[names[0]]):
        cells = " | ".join(
            "-" if slopes[n][i][2] is None else f"{slopes[n][i][2]:.0f}" for n in names
        )
        lines.append(f"| {a} -> {b} | {cells} |")
    lines += [""] + [
        f"Command ({name}, cap {run['cap_gib']:g} GiB, {run['steps']} steps): `{run['command']}`"
        for name, runs in meta["runs"].items()
        for run in runs
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--lengths", default=",".join(map(str, LENGTHS)))
    parser.add_argument("--only", default="dpokit,trl", help="comma list of: dpokit, trl")
    parser.add_argument("--cap-gib", type=float, default=20.0, help="address-space cap per run")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--dpokit", nargs="*", default=[], metavar="KEY=VALUE")
    parser.add_argument("--trl", nargs="*", default=[], metavar="FIELD=VALUE")
    parser.add_argument("--tag", default="", help="suffix of the result files (experiments)")
    parser.add_argument(
        "--merge",
        action="store_true",
        help="keep the other contenders' results already in the output files (one table from "
        "runs of one contender at a time)",
    )
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dpokit-bench"))
    parser.add_argument("--out", default=str(HERE / "results" / "memory"))
    args = parser.parse_args()
    for name in args.only.split(","):
        if name not in CONTENDERS:
            parser.error(f"unknown contender {name!r}; choose from {', '.join(CONTENDERS)}")

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    import torch

    lengths = [int(x) for x in args.lengths.split(",")]
    works = workloads(lengths, args.steps, Path(args.workdir))
    shape = PRESETS[PRESET]
    meta = {
        "shape": shape.to_dict(),
        "shape_text": (
            f"{shape.arch}, hidden {shape.hidden_size}, intermediate {shape.intermediate_size}, "
            f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads, {shape.num_layers} layers, "
            f"vocab {shape.model_vocab_size}, tied embeddings; fp32, gradient checkpointing on; "
            f"1 pair per step, prompt {PROMPT_TOKENS} tokens"
        ),
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads",
        "contenders": {n: CONTENDERS[n] for n in args.only.split(",")},
        "extra_overrides": {"dpokit": args.dpokit, "trl": args.trl},
    }
    command = "python " + " ".join([str(Path(sys.argv[0]).as_posix())] + sys.argv[1:])
    out_dir = Path(args.out)
    out_dir.mkdir(parents=True, exist_ok=True)
    suffix = f"-{args.tag}" if args.tag else ""
    kept, meta["runs"] = {}, {}
    previous = out_dir / f"results{suffix}.json"
    if args.merge and previous.exists():
        old = json.loads(previous.read_text())
        kept = {
            name: {int(length): record for length, record in by_length.items()}
            for name, by_length in old["results"].items()
        }
        meta["runs"] = old["meta"]["runs"]
    this_run = {"command": command, "cap_gib": args.cap_gib, "steps": args.steps}
    for name in args.only.split(","):
        meta["runs"].setdefault(name, []).append(this_run)
    for results in measure(args, works, log, kept):  # rewritten after each run: partial kept
        text = markdown(results, meta)
        (out_dir / f"RESULTS{suffix}.md").write_text(text + "\n")
        tables = {n: {str(k): v for k, v in r.items()} for n, r in results.items()}
        payload = {"meta": meta, "results": tables}
        (out_dir / f"results{suffix}.json").write_text(json.dumps(payload, indent=1))
    print(text)


if __name__ == "__main__":
    main()
