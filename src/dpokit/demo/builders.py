"""From the SFT model's own judged samples to every data shape the methods train on.

For each prompt the SFT model writes ``k`` completions, the judge scores them, and

- ``pairs.jsonl``: best vs worst of the k (ties dropped), with ``score_chosen``/``score_rejected``
  (the judge's rewards, for ODPO) and ``chunk`` (the chunk of stepwise DPO: pairs ordered easy to
  hard by their reward gap, split in ``chunks``);
- ``eval_pairs.jsonl``: the same on held-out prompts (reward accuracy, log-prob changes);
- ``unpaired.jsonl``: KTO's rows ``prompt``/``completion``/``label``: the best answer of each group
  desirable, the worst undesirable;
- ``noisy_pairs.jsonl``: ``pairs.jsonl`` with a known fraction of chosen/rejected swapped (rDPO's
  setting), and a ``flipped`` column saying which;
- ``spin_sft.jsonl``: demonstrations (SPIN trains on SFT data only);
- ``sessions.jsonl``: segment DPO's multi-turn sessions: chosen and rejected share the first
  exchange and differ from the second assistant turn on (the segment: turns 2 and 3).
"""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dpokit.demo.task import ReviewTask
from dpokit.evaluation import Samples, sample


@dataclass
class Group:
    """One prompt's k judged completions."""

    prompt: str
    completions: list[str]
    rewards: list[float]

    @property
    def usable(self) -> list[int]:
        """Completions a data file can hold (an immediate EOS decodes to an empty string)."""
        return [i for i, text in enumerate(self.completions) if text.strip()]

    @property
    def best(self) -> int:
        """Index of the highest-reward usable sample (first on ties)."""
        return max(self.usable, key=lambda i: (self.rewards[i], -i))

    @property
    def worst(self) -> int:
        """Index of the lowest-reward usable sample (first on ties)."""
        return min(self.usable, key=lambda i: (self.rewards[i], i))

    @property
    def has_preference(self) -> bool:
        """At least two usable samples, and the best one scores higher than the worst."""
        return len(self.usable) >= 2 and self.rewards[self.best] > self.rewards[self.worst]


def groups_from_samples(samples: Samples, k: int) -> list[Group]:
    """Cut prompt-major samples (k per prompt) into groups."""
    groups = []
    for start in range(0, len(samples.texts), k):
        groups.append(
            Group(
                samples.prompts[start],
                samples.texts[start : start + k],
                list(samples.rewards[start : start + k]),
            )
        )
    return groups


def sample_groups(
    model,
    tokenizer,
    task: ReviewTask,
    prompts: Sequence[str],
    k: int,
    seed: int,
    progress: str | None = None,
) -> list[Group]:
    """Sample and judge ``k`` completions per prompt with ``model``."""
    samples = sample(
        model, tokenizer, prompts, per_prompt=k, judge=task.judge, seed=seed, progress=progress
    )
    return groups_from_samples(samples, k)


def pair_rows(groups: Sequence[Group], chunks: int = 2) -> list[dict]:
    """Best vs worst of each group with a preference; ``chunk`` = easy-to-hard chunk index."""
    rows = []
    for group in groups:
        if not group.has_preference:
            continue
        rows.append(
            {
                "prompt": group.prompt,
                "chosen": group.completions[group.best],
                "rejected": group.completions[group.worst],
                "score_chosen": group.rewards[group.best],
                "score_rejected": group.rewards[group.worst],
            }
        )
    # Easy pairs (large reward gap) first; ties in the gap keep their order.
    order = sorted(
        range(len(rows)), key=lambda i: -(rows[i]["score_chosen"] - rows[i]["score_rejected"])
    )
    for rank, i in enumerate(order):
        rows[i]["chunk"] = rank * chunks // max(len(rows), 1)
    return rows


def unpaired_rows(groups: Sequence[Group]) -> list[dict]:
    """KTO rows: best of a group desirable, worst undesirable (groups without a preference out)."""
    rows = []
    for group in groups:
        if group.has_preference:
            rows.append(
                {"prompt": group.prompt, "completion": group.completions[group.best], "label": True}
            )
            rows.append(
                {
                    "prompt": group.prompt,
                    "completion": group.completions[group.worst],
                    "label": False,
                }
            )
    return rows


def noisy_rows(pairs: Sequence[dict], flip_fraction: float, seed: int) -> list[dict]:
    """A copy of ``pairs`` with exactly round(flip_fraction * n) labels swapped, chosen by seed."""
    n_flip = round(flip_fraction * len(pairs))
    flipped = set(random.Random(seed).sample(range(len(pairs)), n_flip))
    rows = []
    for i, row in enumerate(pairs):
        row = dict(row)
        if i in flipped:
            row["chosen"], row["rejected"] = row["rejected"], row["chosen"]
            row["score_chosen"], row["score_rejected"] = row["score_rejected"], row["score_chosen"]
        row["flipped"] = i in flipped
        rows.append(row)
    return rows


def session_rows(groups: Sequence[Group], seed: int) -> list[dict]:
    """Three-exchange sessions: exchange 1 shared; exchanges 2-3 good (chosen) or bad (rejected).

    Exchange 1 is a random completion of one group; exchanges 2 and 3 take the best/worst of two
    other groups, so the sessions diverge at the second assistant turn and end together.
    """
    usable = [g for g in groups if g.has_preference]
    rng = random.Random(seed)
    rows = []
    for first, second, third in zip(usable[0::3], usable[1::3], usable[2::3], strict=False):
        shared = [
            {"role": "user", "content": first.prompt},
            {"role": "assistant", "content": first.completions[rng.choice(first.usable)]},
        ]
        chosen = shared + _exchanges((second, third), best=True)
        rejected = shared + _exchanges((second, third), best=False)
        rows.append({"chosen": chosen, "rejected": rejected})
    return rows


def _exchanges(groups: Sequence[Group], best: bool) -> list[dict]:
    """User prompt + the best (or worst) answer of each group, in order."""
    turns = []
    for group in groups:
        index = group.best if best else group.worst
        turns.append({"role": "user", "content": group.prompt})
        turns.append({"role": "assistant", "content": group.completions[index]})
    return turns


def write_jsonl(path: str | Path, rows: Sequence[dict]) -> Path:
    """``rows`` as JSON lines at ``path`` (parents created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")
    return path
