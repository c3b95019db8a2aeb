"""Shared test helpers: the small training configs the engine and procedure tests start from.

Imported as ``from helpers import ...`` (pytest puts ``tests/`` on ``sys.path``, as for
``multiproc``).
"""

from __future__ import annotations

from dpokit.config import TrainConfig

# A tiny run: 4 rows a batch, constant LR, short sequences, no progress bar.
TINY_RUN = dict(
    batch_size=4,
    learning_rate=1e-3,
    warmup_ratio=0.0,
    lr_scheduler="constant",
    max_length=64,
    max_prompt_length=32,
    progress=False,
)


def train_config(model, data, output_dir, reference_cache_dir, **overrides) -> TrainConfig:
    """`TINY_RUN` settings for ``model`` on ``data``; ``overrides`` win."""
    values = dict(
        model=str(model),
        data=data,
        output_dir=str(output_dir),
        reference_cache_dir=str(reference_cache_dir),
        **TINY_RUN,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


def make_config(tiny_dir, data, tmp_path, **overrides) -> TrainConfig:
    """An engine test's run: ``tmp_path/run`` and ``tmp_path/cache``, 4 unshuffled steps."""
    overrides = {"max_steps": 4, "shuffle": False, **overrides}
    return train_config(tiny_dir, data, tmp_path / "run", tmp_path / "cache", **overrides)


def run_config(model, data, out, **overrides) -> TrainConfig:
    """A multi-run procedure's run in ``out``, its reference cache beside it, 2 steps a run."""
    overrides = {"max_steps": 2, **overrides}
    return train_config(model, str(data), out, out.parent / f"{out.name}-cache", **overrides)
