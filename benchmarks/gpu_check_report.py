"""The results of benchmarks/gpu_check.py: ``results.json`` (every number) and ``RESULTS.md``
(tables), rewritten after each step so that a check cut short still leaves what it measured."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

VERSIONS = ("torch", "transformers", "accelerate", "trl", "liger-kernel", "flash-attn",
            "flash-attn-4", "triton")  # fmt: skip


def _fmt(value, spec: str) -> str:
    return "" if value is None else format(value, spec)


class Report:
    """Collects checks (passed/failed), skips (what did not run here, and why), installs, each
    step's numbers and the benchmark table; ``finish`` returns the exit status (0: no failure)."""

    def __init__(self, out: Path, command: str):
        self.out = out
        self.started = time.time()
        self.data: dict = {
            "command": command,
            "started": time.strftime("%Y-%m-%d %H:%M:%S %Z", time.localtime(self.started)),
            "mode": None,
            "notes": [],
            "checks": [],
            "skipped": [],
            "installs": [],
            "step_seconds": {},
            "sections": {},
        }

    # ---------------------------------------------------------------------------------- recording

    def check(self, name: str, passed: bool, value: str = "", tolerance: str = "") -> None:
        self.data["checks"].append(
            {"check": name, "passed": bool(passed), "value": value, "tolerance": tolerance}
        )
        self.write()

    def skip(self, what: str, why: str) -> None:
        self.data["skipped"].append({"what": what, "why": why})
        self.write()

    def install(self, package: str, outcome: str, detail: str) -> None:
        self.data["installs"].append({"package": package, "outcome": outcome, "detail": detail})
        self.write()

    def note(self, text: str) -> None:
        self.data["notes"].append(text)

    def timing(self, step: str, seconds: float) -> None:
        self.data["step_seconds"][step] = round(seconds, 1)

    def section(self, name: str, values: dict) -> None:
        self.data["sections"][name] = values
        self.write()

    def set_mode(self, mode: str, env: dict) -> None:
        if mode == "gpu":
            self.data["mode"] = f"gpu: {env.get('gpu')} x{env.get('gpu_count')}"
        else:
            self.data["mode"] = "cpu: bf16 autocast on CPU, sdpa instead of flash-attention"

    def bench(self, meta: dict, table: list[dict], rows) -> None:
        self.data["sections"]["bench"] = {"meta": meta, "table": table}
        for row in rows:
            if row.skip:
                self.skip(f"bench: {row.label}", row.skip)
        self.write()

    # ---------------------------------------------------------------------------------- output

    def failures(self) -> list[dict]:
        return [c for c in self.data["checks"] if not c["passed"]]

    def finish(self) -> int:
        """Write the files; print the verdict (one line per failure) to stderr; 0 or 1."""
        self.data["wall_seconds"] = round(time.time() - self.started, 1)
        self.write()
        failed = self.failures()
        passed = len(self.data["checks"]) - len(failed)
        skipped = ", ".join(s["what"] for s in self.data["skipped"]) or "none"
        for c in failed:
            first_line = (c["value"] or "").splitlines()[:1]
            print(f"gpu_check: FAILED: {c['check']}: {' '.join(first_line)}", file=sys.stderr)
        verdict = "FAILED" if failed else "passed"
        print(
            f"gpu_check: {verdict}: {passed} of {len(self.data['checks'])} checks passed; "
            f"skipped: {skipped}; results in {self.out}/RESULTS.md "
            f"({self.data['wall_seconds']:.0f} s)",
            file=sys.stderr,
        )
        return 1 if failed or not self.data["checks"] else 0

    def write(self) -> None:
        (self.out / "results.json").write_text(json.dumps(self.data, indent=1, default=str))
        (self.out / "RESULTS.md").write_text(self.markdown())

    def markdown(self) -> str:
        d = self.data
        lines = [
            "# gpu_check results",
            "",
            f"Mode: {d['mode']}. Started {d['started']}; command `{d['command']}`.",
            *(f"- {n}" for n in d["notes"]),
            "",
        ]
        env = d["sections"].get("env")
        if env:
            versions = ", ".join(f"{k} {env['versions'].get(k)}" for k in VERSIONS)
            gpu = env.get("gpu", "none")
            lines += [
                f"Environment: python {env['python']}, {env['machine']}, CUDA "
                f"{env['torch_cuda']}, GPU {gpu}; {versions}; attention for the flash path: "
                f"{env['flash_attention'] or 'sdpa'}.",
                "",
            ]
        lines += self._checks_md() + self._bench_md()
        if d["installs"]:
            lines += ["## Installs", "", "| package | outcome | detail |", "|---|---|---|"]
            lines += [f"| {i['package']} | {i['outcome']} | {_one_line(i['detail'])} |"
                      for i in d["installs"]] + [""]  # fmt: skip
        if d["skipped"]:
            lines += ["## Not run here", ""]
            lines += [f"- {s['what']}: {s['why']}" for s in d["skipped"]] + [""]
        seconds = ", ".join(f"{k} {v:.0f} s" for k, v in d["step_seconds"].items())
        lines += [f"Step times: {seconds}."]
        return "\n".join(lines) + "\n"

    def _checks_md(self) -> list[str]:
        lines = ["## Checks", "", "| check | result | value | tolerance |", "|---|---|---|---|"]
        for c in self.data["checks"]:
            result = "passed" if c["passed"] else "**FAILED**"
            lines.append(
                f"| {c['check']} | {result} | {_one_line(c['value'])} | {c['tolerance']} |"
            )
        train = self.data["sections"].get("train")
        if train and train["records"]:
            losses = ", ".join(f"{r['loss']:.6f}" for r in train["records"])
            lines += ["", f"Training losses by step: {losses}.", f"Command: `{train['command']}`"]
        return lines + [""]

    def _bench_md(self) -> list[str]:
        bench = self.data["sections"].get("bench")
        if not bench or not bench["table"]:
            return []
        meta = bench["meta"]
        short, long_ = meta["steps"]
        lines = [
            "## Benchmark",
            "",
            f"{meta['pairs_per_step']} pairs ({meta['tokens_per_step']:.0f} tokens) per step; "
            f"s/step: median of the single steps 2..{long_} of a {long_}-step run; differenced: "
            f"(time of {long_} steps - time of {short}) / {long_ - short}, whole runs (start-up "
            "cancels). MFU against "
            f"the bf16 matmul peak measured here ({_fmt(meta['bf16_peak_tflops'], '.0f')} "
            "TFLOP/s). Speed-up: this row's s/step over the first row's.",
            "",
            "| configuration | s/step | differenced s/step | tokens/s | CUDA max MB | peak RSS MB "
            "| MFU | first-step loss | logps/chosen | rel. diff | first row's speed-up |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for r in bench["table"]:
            first = r["first_step"]
            lines.append(
                f"| {r['label']} | {r['seconds_per_step']:.3f} | "
                f"{_fmt(r['differenced_seconds_per_step'], '.3f')} | "
                f"{_fmt(r['tokens_per_second'], '.0f')} | "
                f"{_fmt(r['cuda_max_allocated_mb'], '.0f')} | {r['peak_rss_mb']:.0f} | "
                f"{_fmt(r['mfu'], '.1%')} | {_fmt(first.get('loss'), '.6f')} | "
                f"{_fmt(first.get('logps/chosen'), '.4f')} | {_fmt(r['logps_rel_diff'], '.1e')} | "
                f"{r['dpokit_speedup']:.2f}x |"
            )
        return lines + [""]


def _one_line(text: str) -> str:
    return " ".join(str(text).split()).replace("|", "/")[:300]
