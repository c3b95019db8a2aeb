"""Same seed and config on CPU: the same loss trajectory, bit for bit, even where randomness
enters (shuffled batches, LoRA dropout, the adapter's initialisation); another seed differs."""

from __future__ import annotations

import json

from dpokit import train
from dpokit.config import TrainConfig

TOPICS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]


def test_same_seed_same_trajectory_other_seed_another(tiny_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [
        {"prompt": f"Do you like {t}?", "chosen": f" yes, {t}.", "rejected": f" no {t}!"}
        for t in TOPICS * 3
    ]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))

    def run(name: str, seed: int) -> list[float]:
        config = TrainConfig.from_dict(
            dict(
                method="dpo",
                model=str(tiny_dir),
                data=str(data),
                output_dir=str(tmp_path / name),
                reference_cache_dir=str(tmp_path / "cache"),
                seed=seed,
                shuffle=True,
                lora=True,
                lora_r=4,
                lora_dropout=0.3,
                batch_size=4,
                max_steps=4,
                learning_rate=1e-2,
                max_length=64,
                max_prompt_length=32,
                progress=False,
            )
        )
        history = train(config).history
        return [(r["loss"], r["grad_norm"], r["rewards/margins"]) for r in history]

    # Run "a" computes the reference table, run "b" finds it cached: setup that draws from the
    # RNG only on a cache miss must not change the dropout masks (the engine reseeds).
    first, again = run("a", seed=7), run("b", seed=7)
    assert first == again  # exact: same batches, same dropout masks, same adapter init
    assert run("c", seed=8) != first
