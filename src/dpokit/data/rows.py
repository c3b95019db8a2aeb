"""Steps every data preparation shares (pairs, unpaired, SFT, multi-turn pairs).

Each ``prepare_*`` reads a source, detects its format from the column kinds, maps a row processor
over it (cached in an Arrow file named by the data fingerprint), then keeps the rows that were not
dropped. These helpers are those shared steps; the processors differ per kind of data.
"""

from __future__ import annotations

from pathlib import Path

import datasets
import numpy as np
import pyarrow.compute as pc
from datasets import Value

from dpokit.hashing import derive_fingerprint

from .config import DataConfig
from .errors import DataError, InvalidRow
from .formats import Format, column_kinds, detect_format, row_column_kinds
from .loading import Source
from .summary import DROP_REASON, STATUS_COLUMNS


def source_rows(src: Source) -> datasets.Dataset:
    """The source's rows as plain Python values.

    Raises `DataError` when there are none.
    """
    dataset = src.dataset.with_format(None)
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", source=src.name)
    return dataset


def dataset_column_kinds(dataset: datasets.Dataset) -> dict[str, str]:
    """Column name -> kind (``"text"``, ``"messages"``, ...) from the features; a mixed-type column
    is judged by its most common kind, so the odd rows fail validation with their row number
    instead of hiding the format."""
    kinds = column_kinds(dataset.features)
    for name, kind in kinds.items():
        if kind == "mixed":
            kinds[name] = row_column_kinds({name: value} for value in dataset[name])[name]
    return kinds


def detect_source_format(
    kinds: dict, config: DataConfig, source_name: str, task: str = "pairs"
) -> Format:
    """The registered format of ``task`` that fits the column ``kinds``.

    Raises `DataError` naming ``source_name`` when none fits (or several do).
    """
    try:
        return detect_format(kinds, config, task=task)
    except InvalidRow as error:
        raise DataError(str(error), source=source_name) from None


def kept_rows(mapped: datasets.Dataset, fingerprint: str) -> datasets.Dataset:
    """Drop the rows with a drop reason, add ``index`` (0..kept-1), remove the status columns.

    The index column is added before selecting, so no indices mapping has to be flattened.
    """
    keep_mask = pc.equal(mapped.data.column(DROP_REASON), "").to_numpy(zero_copy_only=False)
    keep = np.flatnonzero(keep_mask)
    index = np.full(len(mapped), -1, dtype=np.int64)
    index[keep] = np.arange(len(keep))
    dataset = mapped.add_column(
        "index",
        index,
        new_fingerprint=derive_fingerprint(fingerprint, "index"),
        feature=Value("int64"),
    )
    if len(keep) < len(mapped):
        dataset = dataset.select(keep, new_fingerprint=derive_fingerprint(fingerprint, "keep"))
    return dataset.remove_columns(
        list(STATUS_COLUMNS), new_fingerprint=derive_fingerprint(fingerprint, "out")
    )


def cache_path(src: Source, config: DataConfig, fingerprint: str) -> str | None:
    """Where the tokenized rows of ``src`` are cached (an Arrow file named by ``fingerprint``);
    None (kept in memory) for in-memory sources unless ``config.cache_dir`` is set."""
    if not datasets.is_caching_enabled() or not (src.cacheable or config.cache_dir):
        return None
    root = Path(config.cache_dir or datasets.config.HF_DATASETS_CACHE) / "dpokit"
    root.mkdir(parents=True, exist_ok=True)
    return str(root / f"pairs-{fingerprint}.arrow")
