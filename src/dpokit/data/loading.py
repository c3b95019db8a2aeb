"""Whatever the user points at -> one `datasets.Dataset`, its name for errors and a fingerprint.

Local files (JSON lines, JSON, Parquet, CSV) and folders go through ``datasets.load_dataset``;
directories written by ``save_to_disk`` through ``load_from_disk``; other strings are handed to
``load_dataset`` as a hub name. When a JSON file does not load as a table, it is read again in
Python to name the broken line or the row with the wrong type. Text files are read as bytes and
split on "\n" only; a line that is not UTF-8 is named (`DataError`), as is a path that does not
exist (a string that cannot be a hub name is taken as a path).
"""

from __future__ import annotations

import codecs
import gzip
import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import datasets
import pyarrow as pa

from dpokit.hashing import file_sha256
from dpokit.paths import looks_like_path

from .config import DataConfig
from .errors import DataError, InvalidRow, MissingDataError
from .formats import detect_format, feature_kind, read_pair_row, row_column_kinds, scores_present

BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class RowLocator:
    """Maps a dataset row index to what the user can find: a JSONL line number, else the index."""

    jsonl_path: str | None = None
    _line_numbers: list[int] | None = field(default=None, repr=False)

    def locate(self, index: int) -> tuple[int, str]:
        """(1-based line, ``"line"``) of row ``index`` of a JSON-lines file, else
        (index, ``"row"``)."""
        if self.jsonl_path is None:
            return index, "row"
        if self._line_numbers is None:
            # Only computed on an error: the table reader skips blank lines, so rows != lines.
            lines = decoded_lines(self.jsonl_path)
            self._line_numbers = [n for n, line in lines if line.strip()]
        if index < len(self._line_numbers):
            return self._line_numbers[index], "line"
        return index, "row"


@dataclass
class Source:
    """A loaded dataset and what the pipeline needs to know about where it came from."""

    dataset: datasets.Dataset
    name: str
    fingerprint: str
    cacheable: bool
    locator: RowLocator = field(default_factory=RowLocator)


def load_source(source, config: DataConfig, split: str | None = None) -> Source:
    """Load ``source``: a path, a hub name, a `Dataset`/`DatasetDict`, or a list of dicts."""
    if isinstance(source, datasets.DatasetDict):
        source = _pick_split(source, split, "<in-memory DatasetDict>")
    if isinstance(source, datasets.Dataset):
        return _from_dataset(source)
    if isinstance(source, (list, tuple)):
        return _from_rows(list(source), config)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return _from_file(path, config, split)
        if path.is_dir():
            return _from_dir(path, config, split)
        if _data_suffix(path) in BUILDERS or looks_like_path(str(source)):
            raise MissingDataError("no such file or directory", source=str(source))
        return _from_hub(str(source), config, split)
    raise TypeError(
        "source must be a path, a dataset name, a datasets.Dataset/DatasetDict or a list of dicts, "
        f"got {type(source).__name__}"
    )


def _from_dataset(dataset: datasets.Dataset) -> Source:
    files = dataset.cache_files
    name = files[0]["filename"] if files else "<in-memory dataset>"
    return Source(dataset, name, dataset._fingerprint, cacheable=bool(files))


def _from_rows(rows: list, config: DataConfig) -> Source:
    name = "<list of rows>"
    numbered = [(i, "row", row) for i, row in enumerate(rows)]
    _check_dicts(numbered, name)
    try:
        dataset = datasets.Dataset.from_list(rows)
    except (pa.ArrowException, TypeError, ValueError) as error:
        dataset = _rebuild_from_rows(numbered, name, config, error)
    return Source(dataset, name, dataset._fingerprint, cacheable=False)


def _content_lines(path: Path, head: int = 1 << 16) -> int | None:
    """The lines holding more than white space (after a UTF-8 byte-order mark), counted in a file
    of under ``head`` bytes; None for a longer file (it holds rows, or the loader says why not)."""
    with path.open("rb") as handle:
        start = handle.read(head)
    if len(start) >= head:
        return None
    return sum(1 for line in start.removeprefix(b"\xef\xbb\xbf").split(b"\n") if line.strip())


def _from_file(path: Path, config: DataConfig, split: str | None) -> Source:
    suffix = _data_suffix(path)
    builder = BUILDERS.get(suffix)
    if builder is None:
        raise DataError(
            f"unknown file type {suffix!r}; expected one of {sorted(BUILDERS)}", source=str(path)
        )
    lines = _content_lines(path)  # else "cannot tell the data format from the columns [none]"
    if lines == 0 or (lines == 1 and builder == "csv"):
        what = "holds only a header line" if lines else "is empty"
        raise DataError(f"the file {what}: no rows to read", source=str(path))
    jsonl = builder == "json" and _is_json_lines(path)
    try:
        dataset = datasets.load_dataset(
            builder, data_files=str(path), split=split or "train", cache_dir=config.cache_dir
        )
    except Exception as error:  # noqa: BLE001 - re-read to name the bad line, else re-raise
        if builder != "json":
            if builder == "csv":
                for _ in decoded_lines(path):  # a byte that is not UTF-8: name its line
                    pass
            raise DataError(
                f"cannot load the {builder} file: {root_cause(error)}", source=str(path)
            ) from error
        dataset = _rebuild_from_rows(_json_rows(path, jsonl), str(path), config, error)
    else:
        if jsonl and split in (None, "train") and len(dataset) != _count_lines(path):
            # Arrow's reader takes what JSON lines forbid (two objects on one line, one object
            # over several lines): read line by line to name the line.
            dataset = _rebuild_from_rows(_json_rows(path, jsonl), str(path), config, None)
    if len(dataset) == 0:  # `[]`, a CSV header alone, an empty Parquet table
        raise DataError(f"the file has no rows (split {split or 'train'})", source=str(path))
    fingerprint = file_sha256(path, prefix=f"{builder}|{split}")
    # Line numbers only mean something when the rows are the file's rows, unsliced.
    locator = RowLocator(str(path) if jsonl and split in (None, "train") else None)
    return Source(dataset, str(path), fingerprint, cacheable=True, locator=locator)


def _from_dir(path: Path, config: DataConfig, split: str | None) -> Source:
    if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
        loaded = datasets.load_from_disk(str(path))
    else:
        loaded = datasets.load_dataset(str(path), split=split, cache_dir=config.cache_dir)
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, str(path))
    return Source(loaded, str(path), loaded._fingerprint, cacheable=True)


def _from_hub(name: str, config: DataConfig, split: str | None) -> Source:
    try:
        loaded = datasets.load_dataset(name, split=split, cache_dir=config.cache_dir)
    except Exception as error:  # noqa: BLE001 - the datasets error says why (network, name)
        raise DataError(
            f"not a local file or directory, and datasets.load_dataset failed: {error}",
            source=name,
        ) from error
    if isinstance(loaded, datasets.DatasetDict):
        loaded = _pick_split(loaded, split, name)
    return Source(loaded, name, loaded._fingerprint, cacheable=True)


def _pick_split(dataset_dict: datasets.DatasetDict, split: str | None, name: str):
    if split is not None:
        if split not in dataset_dict:
            raise DataError(f"no split {split!r}; splits: {sorted(dataset_dict)}", source=name)
        return dataset_dict[split]
    if "train" in dataset_dict:
        return dataset_dict["train"]
    if len(dataset_dict) == 1:
        return next(iter(dataset_dict.values()))
    raise DataError(
        f"several splits {sorted(dataset_dict)}: choose one with data_split=NAME "
        "(the `split` argument in Python)",
        source=name,
    )


def reread_mixed_pairs(src: Source, config: DataConfig) -> Source:
    """Pairs from a JSON-lines file whose pair columns change type between rows, as Python reads
    them.

    ``datasets`` stores such a column as JSON text and decodes every string in it as JSON: the
    completion "0" comes back as the number 0, "true" as True. Rows read back from it cannot be
    checked, so the file is read line by line instead (naming the first bad line).
    """
    if src.locator.jsonl_path is None:
        return src
    features = src.dataset.features
    if not any(feature_kind(features[f]) == "mixed" for f in _pair_fields(config) if f in features):
        return src
    rows = _json_rows(Path(src.locator.jsonl_path), jsonl=True)
    return replace(src, dataset=_rebuild_from_rows(rows, src.name, config, None))


# ---- re-reading rows in Python to name the bad one ----------------------------------------------


def _json_rows(path: Path, jsonl: bool) -> list[tuple[int, str, object]]:
    """(line number or row index, "line"/"row", parsed row); a broken line raises `DataError`."""
    if not jsonl:
        text = "\n".join(line for _, line in decoded_lines(path))
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(
                f"invalid JSON at line {e.lineno} column {e.colno}: {e.msg}", source=str(path)
            ) from None
        if not isinstance(data, list):
            raise DataError("expected a JSON list of objects", source=str(path))
        return [(i, "row", row) for i, row in enumerate(data)]
    rows = []
    for number, line in decoded_lines(path):
        if not line.strip():
            continue
        try:
            rows.append((number, "line", json.loads(line)))
        except json.JSONDecodeError as e:
            message = f"invalid JSON (column {e.colno}): {e.msg}"
            raise DataError(message, str(path), number, "line") from None
    return rows


def _rebuild_from_rows(numbered: list, name: str, config: DataConfig, error: Exception):
    """Validate Python rows to raise on the first bad one; if all are fine, keep the used fields.

    A table reader fails on a column whose type changes between rows. When the odd column is one
    the pairs do not use, building the table from the used fields only succeeds.
    """
    _check_dicts(numbered, name)
    rows = [row for _, _, row in numbered]
    if not rows:  # `[]`
        raise DataError("the file has no rows", source=name)
    kinds = row_column_kinds(rows)
    try:
        fmt = detect_format(kinds, config)
    except InvalidRow as e:
        raise DataError(str(e), source=name) from None
    has_scores = scores_present(kinds, config)
    for number, kind, row in numbered:
        try:
            read_pair_row(fmt, row, config, has_scores)
        except InvalidRow as e:
            raise DataError(str(e), name, number, kind) from None
    used = [f for f in _pair_fields(config) if f in kinds]
    try:
        return datasets.Dataset.from_list([{f: row.get(f) for f in used} for row in rows])
    except (pa.ArrowException, TypeError, ValueError) as second:
        raise DataError(f"cannot build a table from the rows: {second}", source=name) from error


def _check_dicts(numbered: list, name: str) -> None:
    for number, kind, row in numbered:
        if not isinstance(row, Mapping):
            raise DataError(
                f"expected an object/dict, got {type(row).__name__}", name, number, kind
            )


def _pair_fields(config: DataConfig) -> tuple[str, ...]:
    return (
        config.prompt_field,
        config.chosen_field,
        config.rejected_field,
        config.score_chosen_field,
        config.score_rejected_field,
    )


# ---- files --------------------------------------------------------------------------------------


def _data_suffix(path: Path) -> str:
    """``.jsonl`` for ``x.jsonl`` and ``x.jsonl.gz`` (datasets decompresses by itself)."""
    suffixes = path.suffixes
    if suffixes and suffixes[-1] == ".gz":
        suffixes = suffixes[:-1]
    return suffixes[-1].lower() if suffixes else ""


def _open_binary(path):
    return gzip.open(path, "rb") if str(path).endswith(".gz") else open(path, "rb")


def decoded_lines(path) -> Iterator[tuple[int, str]]:
    """(1-based line number, text without the "\n") of a UTF-8 text file (``.gz`` too).

    Lines end at "\n" only, as JSON lines do: U+0085, U+2028 and a lone "\r" inside a line are
    text. A byte-order mark (Windows editors) is not part of the first line. A line that is not
    UTF-8 raises `DataError` naming the file, the line and the byte.
    """
    with _open_binary(path) as f:
        for number, raw in enumerate(f, 1):
            if number == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                yield number, raw.decode("utf-8").removesuffix("\n")
            except UnicodeDecodeError as e:
                raise DataError(
                    f"not UTF-8 text: byte {raw[e.start]:#04x} at byte {e.start + 1} of the line "
                    f"({e.reason}); save the file as UTF-8",
                    str(path),
                    number,
                    "line",
                ) from None


def _count_lines(path) -> int:
    """Non-blank lines: the rows a JSON-lines file holds."""
    return sum(1 for _, line in decoded_lines(path) if line.strip())


def _is_json_lines(path: Path) -> bool:
    """A ``.json`` file holding one object per line is JSON lines too; a list is not."""
    if _data_suffix(path) == ".jsonl":
        return True
    with _open_binary(path) as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    return not head.startswith(b"[")


def root_cause(error: BaseException) -> str:
    """The first line of the innermost cause of a library error (``datasets`` wraps the reader's
    error in "An error occurred while generating the dataset")."""
    while error.__cause__ is not None or error.__context__ is not None:
        error = error.__cause__ or error.__context__
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}"
