"""Where a dpokit step's memory goes: peak RSS per phase and the tensors its graph keeps.

    python benchmarks/memory_probe.py --length 2048                      # dpokit's defaults
    python benchmarks/memory_probe.py --length 2048 packing=none logps_saved_softmax_mb=0

Runs ``--steps`` optimizer steps of DPO on bench_memory.py's workload (Qwen2.5-0.5B's width and
vocabulary, 2 layers, one pair of ``--length``-token completions, gradient checkpointing on) in
this process and prints, per phase (setup = loading + reference pass, forward, backward,
optimizer), the peak RSS sampled every millisecond, and, for the first forward, the bytes of the
tensors autograd saved for backward grouped by the module that saved them (storages counted
once; parameters left out). Run it in a fresh process per configuration: RSS peaks only rise.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from bench_memory import parse_overrides, workloads  # noqa: E402
from contenders import dpokit_settings  # noqa: E402

PAGE = os.sysconf("SC_PAGE_SIZE")


class RssSampler(threading.Thread):
    """Samples this process's RSS (from /proc/self/statm) and keeps the peak per phase."""

    def __init__(self, interval: float = 0.001):
        super().__init__(daemon=True)
        self.interval = interval
        self.phase = "start"
        self.peaks: dict[str, float] = collections.defaultdict(float)
        self.entries: dict[str, float] = {}  # RSS when a phase was first entered
        self.running = True

    def rss_mb(self) -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * PAGE / 2**20

    def run(self) -> None:
        while self.running:
            rss = self.rss_mb()
            self.peaks[self.phase] = max(self.peaks[self.phase], rss)
            time.sleep(self.interval)

    def enter(self, phase: str) -> None:
        rss = self.rss_mb()
        self.peaks[self.phase] = max(self.peaks[self.phase], rss)
        self.entries.setdefault(phase, rss)
        self.phase = phase


class SavedTensors:
    """Bytes of tensors autograd saves during a forward, by the innermost module saving them."""

    def __init__(self, model: torch.nn.Module):
        self.stack: list[str] = ["(outside modules)"]
        self.by_module: dict[str, int] = collections.Counter()
        self.seen: set[int] = set()
        self.params = {p.untyped_storage().data_ptr() for p in model.parameters()}
        self.active = False
        for name, module in model.named_modules():
            module.register_forward_pre_hook(self._push(name or "(model)"))
            module.register_forward_hook(self._pop)

    def _push(self, name):
        def hook(module, args):
            self.stack.append(name)

        return hook

    def _pop(self, module, args, output):
        self.stack.pop()

    def pack(self, tensor):
        if self.active and tensor.device.type != "meta":
            storage = tensor.untyped_storage()
            key = storage.data_ptr()
            if key not in self.seen and key not in self.params:
                self.seen.add(key)
                self.by_module[self.stack[-1]] += storage.nbytes()
        return tensor

    def report(self, top: int = 15) -> list[tuple[str, float]]:
        return [(name, n / 2**20) for name, n in self.by_module.most_common(top)]


def build_trainer(work: dict, steps: int, overrides: dict, scratch: Path):
    from dpokit.config import TrainConfig
    from dpokit.engine import Trainer

    values = {**dpokit_settings(work, steps, scratch), "gradient_checkpointing": True}
    values.update(overrides)
    return Trainer(TrainConfig.from_dict(values))


def _mark(sampler: RssSampler, phase: str):
    def hook(module, grad_output):
        sampler.enter(phase)

    return hook


def instrument(trainer, sampler: RssSampler, saved: SavedTensors) -> None:
    """Phase markers around the step's forward, backward and optimizer step."""
    import dataclasses

    procedure, accelerator, optimizer = trainer.procedure, trainer.accelerator, trainer.optimizer
    forward, backward, step = procedure.batch_loss, accelerator.backward, optimizer.step
    count = {"forward": 0}

    def timed_forward(context, batch):
        sampler.enter("forward")
        saved.active = count["forward"] == 0
        count["forward"] += 1
        with torch.autograd.graph.saved_tensors_hooks(saved.pack, lambda t: t):
            out = forward(context, batch)
        saved.active = False
        return out

    def timed_backward(loss, **kwargs):
        sampler.enter("backward (LM head)")
        return backward(loss, **kwargs)

    def timed_step(*args, **kwargs):
        sampler.enter("optimizer")
        out = step(*args, **kwargs)
        sampler.enter("between steps")
        return out

    # Backward runs the LM head first, then the decoder layers last to first: mark each layer.
    model = trainer.accelerator.unwrap_model(trainer.policy).model
    decoder = model.get_decoder()
    for name, module in [*decoder.layers.named_children(), ("norm", decoder.norm)]:
        label = f"backward layer {name}" if name.isdigit() else f"backward {name}"
        module.register_full_backward_pre_hook(_mark(sampler, label))
    trainer.procedure = dataclasses.replace(procedure, batch_loss=timed_forward)
    accelerator.backward = timed_backward
    optimizer.step = timed_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=2048, help="tokens per completion")
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "dpokit-bench"))
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="dpokit config keys")
    args = parser.parse_args()
    work = workloads([args.length], args.steps, Path(args.workdir))[args.length]
    sampler = RssSampler()
    sampler.start()
    sampler.enter("setup (load, reference pass)")
    with tempfile.TemporaryDirectory(prefix="dpokit-probe-") as tmp:
        trainer = build_trainer(work, args.steps, parse_overrides(args.overrides), Path(tmp))
        policy_model = trainer.accelerator.unwrap_model(trainer.policy).model
        saved = SavedTensors(policy_model)
        instrument(trainer, sampler, saved)
        start = time.perf_counter()
        trainer.train()
        seconds = time.perf_counter() - start
        sampler.enter("end")
    sampler.running = False
    report = {
        "length": args.length,
        "overrides": args.overrides,
        "rss_mb_by_phase (first entry, peak)": {
            k: (round(sampler.entries.get(k, 0)), round(v)) for k, v in sampler.peaks.items()
        },
        "saved_for_backward_mb_by_module": [(n, round(mb, 1)) for n, mb in saved.report()],
        "saved_for_backward_total_mb": round(sum(saved.by_module.values()) / 2**20, 1),
        "train_seconds": round(seconds, 1),
    }
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
