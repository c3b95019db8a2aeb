"""A deterministic held-out split of prepared data."""

from __future__ import annotations

from dataclasses import replace

import datasets
import numpy as np
from datasets import Value

from dpokit.hashing import derive_fingerprint

from .pipeline import PreparedData


def train_eval_split(data, eval_fraction: float, seed: int = 0):
    """Hold out a seeded random ``eval_fraction`` of the rows (at least one row each side).

    ``data``: a `PreparedData` (returns two `PreparedData`) or a ``datasets.Dataset`` with an
    ``index`` column (returns two datasets). Both parts keep the original row order and are
    re-indexed 0..n-1, so each split's ``index`` addresses a per-split table (e.g. pre-computed
    reference log-probs); each `PreparedData` part gets its own fingerprint.
    """
    dataset = data.dataset if isinstance(data, PreparedData) else data
    train_rows, eval_rows = split_rows(len(dataset), eval_fraction, seed)
    parts = []
    for role, rows in (("train", train_rows), ("eval", eval_rows)):
        tag = f"{role}|{eval_fraction}|{seed}"
        part = _reindexed(dataset.select(rows), tag)
        if isinstance(data, PreparedData):
            part = _prepared_part(data, part, role, tag)
        parts.append(part)
    return parts[0], parts[1]


def split_rows(n: int, eval_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Sorted (train rows, eval rows) of ``range(n)``."""
    if not 0.0 < eval_fraction < 1.0:
        raise ValueError(f"eval_fraction must be in (0, 1), got {eval_fraction}")
    n_eval = max(1, round(n * eval_fraction))
    if n_eval >= n:
        raise ValueError(f"{n} rows are too few to hold out {eval_fraction:.0%} and still train")
    order = np.random.default_rng(seed).permutation(n)
    return np.sort(order[n_eval:]), np.sort(order[:n_eval])


def _reindexed(dataset: datasets.Dataset, tag: str) -> datasets.Dataset:
    fingerprint = derive_fingerprint(dataset._fingerprint, tag)
    if "index" in dataset.column_names:
        dataset = dataset.remove_columns(
            "index", new_fingerprint=derive_fingerprint(fingerprint, "drop")
        )
    return dataset.add_column(
        "index",
        np.arange(len(dataset), dtype=np.int64),
        new_fingerprint=derive_fingerprint(fingerprint, "index"),
        feature=Value("int64"),
    )


def _prepared_part(data: PreparedData, dataset, role: str, tag: str) -> PreparedData:
    # The counts describe the whole preparation; the source line says which part this is.
    source = f"{data.summary.source} [{role} split: {len(dataset)} of {len(data)} rows]"
    return replace(
        data,
        dataset=dataset,
        summary=replace(data.summary, source=source),
        fingerprint=derive_fingerprint(data.fingerprint, tag),
    )
