"""Where a dpokit training step spends its time: torch.profiler's top operators, grouped.

    python benchmarks/profile_step.py --model DIR --data FILE [--steps 3] [key=value ...]

Builds the engine's Trainer (so the batch layout, the reference and the optimizer are the ones a
run uses), runs one warm-up step and then ``--steps`` steps under ``torch.profiler``, exactly the
engine's per-step work (step, backward, clip, optimizer step). Prints the top operators by self
CPU time and the share of each group: matrix multiplies (LM head vs the rest), attention,
element-wise work, the optimizer, everything else (Python, data, allocation).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections import defaultdict

GROUPS = (  # first match wins; names are aten / autograd operator names
    ("matmul: decoder", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul")),
    ("attention", ("scaled_dot_product", "attention")),
    ("optimizer", ("adam", "_foreach", "lerp", "addcdiv", "addcmul", "sqrt", "vector_norm")),
    ("element-wise", ("aten::",)),
)


def profile(model: str, data: str, steps: int, overrides: list[str], max_length: int) -> dict:
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from dpokit.config import TrainConfig
    from dpokit.engine import Trainer

    tmp = tempfile.mkdtemp(prefix="dpokit-profile-")
    config = TrainConfig.load(
        None,
        overrides,
        model=model,
        data=data,
        output_dir=f"{tmp}/run",
        reference_cache_dir=f"{tmp}/cache",
        batch_size=4,
        max_steps=steps + 1,
        learning_rate=1e-6,
        lr_scheduler="constant",
        warmup_ratio=0.0,
        max_length=max_length,
        max_prompt_length=max_length - 1,
        shuffle=False,
        progress=False,
        mixed_precision="no",
    )
    trainer = Trainer(config)
    context = trainer._context("train")
    batches = list(trainer.train_loader)[: steps + 1]

    def step(batch):
        out = trainer.procedure.batch_loss(context, batch)
        trainer.accelerator.backward(out.loss)
        trainer._clip()
        trainer.optimizer.step()
        trainer.optimizer.zero_grad()
        return out.loss.detach().item()

    step(batches[0])  # warm-up
    with torch_profiler(torch_profile, ProfilerActivity) as prof:
        start = time.perf_counter()
        for batch in batches[1:]:
            step(batch)
        wall = (time.perf_counter() - start) / max(len(batches) - 1, 1)
    groups: dict[str, float] = defaultdict(float)
    for event in prof.events():
        groups[_group(event)] += event.self_cpu_time_total
    total = sum(groups.values())
    groups = {k: v / total for k, v in groups.items()}
    table = prof.key_averages().table(
        sort_by="self_cpu_time_total", row_limit=15, max_name_column_width=48
    )
    return {"seconds_per_step": wall, "groups": groups, "table": table}


# The chunked LM head's autograd Function, forward and backward: everything inside it (its
# matmuls, exp, scatter) is "LM head".
_HEAD_KEYS = ("_ChunkedTokenLogps", "_ChunkedTokenLogpsBackward")


def torch_profiler(torch_profile, activity):
    import torch

    activities = [activity.CPU] + ([activity.CUDA] if torch.cuda.is_available() else [])
    return torch_profile(activities=activities)


def _group(event) -> str:
    node = event
    while node is not None:
        if node.name in _HEAD_KEYS:
            return "LM head: chunked log-probs (matmuls + softmax)"
        node = node.cpu_parent
    lowered = event.name.lower()
    for group, needles in GROUPS:
        if any(n.lower() in lowered for n in needles):
            return group
    return "other (Python, autograd, data)"


def markdown(result: dict) -> str:
    lines = [
        f"Profiled dpokit step: {result['seconds_per_step']:.2f} s/step under the profiler.",
        "",
        "| where the time goes | share |",
        "|---|---|",
    ]
    for group, share in sorted(result["groups"].items(), key=lambda kv: -kv[1]):
        lines.append(f"| {group} | {share:.0%} |")
    lines += ["", "Top operators by self CPU time:", "", "```", result["table"], "```"]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--max-length", type=int, default=1024)
    parser.add_argument("--json", help="also write the result here")
    parser.add_argument("overrides", nargs="*", help="config key=value")
    args = parser.parse_args()
    result = profile(args.model, args.data, args.steps, args.overrides, args.max_length)
    if args.json:
        with open(args.json, "w") as handle:
            json.dump(result, handle)
    print(markdown(result))


if __name__ == "__main__":
    main()
