"""prepare_pairs: source -> validated, tokenized pairs (+ summary and fingerprint), cached."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import datasets
from datasets import Features, List, Value

from dpokit.hashing import json_digest

from .config import DataConfig
from .errors import DataError, InvalidRow
from .formats import Format, read_pair_row, scores_present
from .loading import RowLocator, load_source, reread_mixed_pairs
from .rows import cache_path, dataset_column_kinds, detect_source_format, kept_rows, source_rows
from .summary import (
    COMPLETIONS_TRUNCATED,
    DROP_REASON,
    IDENTICAL,
    IDENTICAL_AFTER_TRUNCATION,
    IDENTICAL_AFTER_TRUNCATION_REASON,
    IDENTICAL_REASON,
    PROMPT_TRUNCATED,
    DataSummary,
    summarize,
)
from .tokenization import PairEncoder, tokenizer_fingerprint

logger = logging.getLogger("dpokit.data")

# Bump when the tokenized output of the same input and settings changes: old caches then miss.
PIPELINE_VERSION = 2  # 2: pairs identical only after truncation are counted (and dropped)

TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids")
SCORE_COLUMNS = ("score_chosen", "score_rejected")


@dataclass
class PreparedData:
    """Tokenized pairs for the engine.

    ``dataset`` columns: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``
    (completion ids include the EOS), ``index`` (row position in this dataset, 0..N-1) and, when
    ``has_scores``, ``score_chosen``/``score_rejected``. ``fingerprint`` changes whenever the source
    content, the tokenizer or a tokenization setting does: key caches of per-row results on
    (fingerprint, index).
    """

    dataset: datasets.Dataset
    summary: DataSummary
    fingerprint: str
    has_scores: bool
    cache_file: str | None = None
    from_cache: bool = False

    def __len__(self) -> int:
        return len(self.dataset)


def prepare_pairs(
    source, tokenizer, config: DataConfig | None = None, split: str | None = None
) -> PreparedData:
    """Load, validate and tokenize preference pairs once (cached for file-backed sources).

    ``source``: a JSONL/JSON/Parquet/CSV path, a ``save_to_disk`` directory, a hub name, a
    ``datasets.Dataset``/``DatasetDict`` or a list of dicts. Raises `DataError` for bad input.
    """
    config = config or DataConfig()
    src = reread_mixed_pairs(load_source(source, config, split), config)
    dataset = source_rows(src)
    kinds = dataset_column_kinds(dataset)
    fmt = detect_source_format(kinds, config, src.name)
    encoder = PairEncoder(tokenizer, config)
    if fmt.kind == "chat":
        encoder.require_chat_template(src.name)
    has_scores = _check_scores(kinds, config, src.name)
    fingerprint = pairs_fingerprint(src.fingerprint, fmt.name, tokenizer, encoder, config)
    cache_file = cache_path(src, config, fingerprint)
    mapped, summary, from_cache = tokenize_rows(
        dataset,
        PairRowProcessor(fmt, encoder, config, has_scores, src.name, src.locator),
        _features(has_scores),
        src.name,
        fmt.name,
        config,
        fingerprint,
        cache_file,
        "dpokit: tokenizing pairs",
    )
    kept = kept_rows(mapped, fingerprint)
    return PreparedData(kept, summary, fingerprint, has_scores, cache_file, from_cache)


def tokenize_rows(
    dataset: datasets.Dataset,
    processor,
    features: Features,
    source_name: str,
    format_name: str,
    config: DataConfig,
    fingerprint: str,
    cache_file: str | None,
    desc: str,
) -> tuple[datasets.Dataset, DataSummary, bool]:
    """Map ``processor`` over the raw rows (cached), summarize and log -> (mapped, summary,
    from_cache). Raises `DataError` when every row was dropped."""
    num_proc = _num_proc(config, len(dataset))
    from_cache = cache_file is not None and _cache_exists(cache_file, num_proc)
    mapped = dataset.map(
        processor,
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        features=features,
        num_proc=num_proc,
        # Our own cache name and fingerprint: datasets would otherwise hash the tokenizer object,
        # whose hash changes with its runtime state, and miss the cache.
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        desc=desc,
    )
    summary = summarize(mapped, source_name, format_name, config.identical_pairs)
    _report(summary)
    if summary.rows_kept == 0:
        raise DataError(f"no rows left to train on\n{summary.format()}", source=source_name)
    return mapped, summary, from_cache


class RowGuard:
    """Mixin of the ``Dataset.map`` row processors: errors in a row name its source and line/row.

    Needs ``self.source_name`` and ``self.locator`` (a `RowLocator`).
    """

    source_name: str
    locator: RowLocator

    def _guard(self, index: int, fn, *args):
        """Call ``fn``; turn an `InvalidRow` into a `DataError` naming the source and row."""
        try:
            return fn(*args)
        except InvalidRow as error:
            row, kind = self.locator.locate(index)
            raise DataError(str(error), self.source_name, row, kind) from None


class PairRowProcessor(RowGuard):
    """The ``Dataset.map`` function: a batch of raw rows -> token ids + per-row status columns.

    Rows are normalized and rendered one by one (errors name the row), then each text column is
    tokenized in one batched call. Dropped rows keep empty id lists and a drop reason.
    """

    def __init__(
        self,
        fmt: Format,
        encoder: PairEncoder,
        config: DataConfig,
        has_scores: bool,
        source_name: str,
        locator: RowLocator,
    ) -> None:
        self.fmt = fmt
        self.encoder = encoder
        self.config = config
        self.has_scores = has_scores
        self.source_name = source_name
        self.locator = locator

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        rows = [{column: values[i] for column, values in batch.items()} for i in range(n)]
        out = {column: [[] for _ in range(n)] for column in TOKEN_COLUMNS}
        out.update({PROMPT_TRUNCATED: [False] * n, COMPLETIONS_TRUNCATED: [0] * n})
        out.update({DROP_REASON: [], IDENTICAL: [], IDENTICAL_AFTER_TRUNCATION: [False] * n})
        if self.has_scores:
            out.update({column: [] for column in SCORE_COLUMNS})
        texts, pending = [], []  # rendered texts of the rows to tokenize, and their positions
        for position, (row, index) in enumerate(zip(rows, indices, strict=True)):
            example, scores, reason, rendered = self._guard(index, self._read, row)
            out[DROP_REASON].append(reason)
            out[IDENTICAL].append(example.identical)
            if self.has_scores:
                out["score_chosen"].append(scores[0])
                out["score_rejected"].append(scores[1])
            if rendered is not None:
                texts.append(rendered)
                pending.append(position)
        # One tokenizer call per text column: fast tokenizers batch in Rust.
        ids = [self.encoder.tokenize([t[k] for t in texts]) for k in range(3)]
        for j, position in enumerate(pending):
            encoded = self._guard(indices[position], self.encoder.finish, *(c[j] for c in ids))
            out[PROMPT_TRUNCATED][position] = encoded.prompt_truncated
            out[COMPLETIONS_TRUNCATED][position] = encoded.completions_truncated
            if self._identical_after_truncation(encoded, out, position):
                continue  # dropped: its ids stay empty
            out["prompt_input_ids"][position] = encoded.prompt_input_ids
            out["chosen_input_ids"][position] = encoded.chosen_input_ids
            out["rejected_input_ids"][position] = encoded.rejected_input_ids
        return out

    def _identical_after_truncation(self, encoded, out: dict, position: int) -> bool:
        """Mark a pair whose texts differ but whose completions' tokens do not (truncation cut
        both to the same start): identical, as pairs identical in the text are, and dropped with
        ``identical_pairs="drop"``. Returns whether it was dropped."""
        if out[IDENTICAL][position] or encoded.chosen_input_ids != encoded.rejected_input_ids:
            return False
        out[IDENTICAL][position] = out[IDENTICAL_AFTER_TRUNCATION][position] = True
        if self.config.identical_pairs != "drop":
            return False
        out[DROP_REASON][position] = IDENTICAL_AFTER_TRUNCATION_REASON
        return True

    def _read(self, row: dict):
        """(example, scores, drop reason or "", rendered texts or None when dropped)."""
        example, scores = read_pair_row(self.fmt, row, self.config, self.has_scores)
        reason = self._drop_reason(example, scores)
        return example, scores, reason, None if reason else self.encoder.render(example)

    def _drop_reason(self, example, scores) -> str:
        reason = self._score_problem(scores) if self.config.require_scores else ""
        if reason and self.config.bad_scores == "error":
            raise InvalidRow(
                f"{reason}: {self.config.score_chosen_field}={scores[0]}, "
                f"{self.config.score_rejected_field}={scores[1]}; ODPO needs chosen > rejected "
                "(bad_scores='drop' drops such rows)"
            )
        if not reason and example.identical and self.config.identical_pairs == "drop":
            reason = IDENTICAL_REASON
        return reason

    @staticmethod
    def _score_problem(scores: tuple[float, float]) -> str:
        # ODPO's offset is log(s_w - s_l): a tie gives log 0, reversed scores a log of a negative.
        chosen, rejected = scores
        if chosen == rejected:
            return "score tie"
        return "reversed scores" if chosen < rejected else ""


def pairs_fingerprint(
    source_fingerprint: str, format_name: str, tokenizer, encoder: PairEncoder, config: DataConfig
) -> str:
    """Stable id of the prepared data: source content, tokenizer identity, settings, version."""
    payload = {
        "version": PIPELINE_VERSION,
        "source": source_fingerprint,
        "format": format_name,
        "tokenizer": tokenizer_fingerprint(tokenizer, encoder.chat_template),
        "settings": config.fingerprint_settings(),
    }
    return json_digest(payload)


def _check_scores(kinds: dict, config: DataConfig, name: str) -> bool:
    fields = (config.score_chosen_field, config.score_rejected_field)
    missing = [f for f in fields if kinds.get(f) in (None, "null")]
    if config.require_scores and missing:
        raise DataError(
            f"require_scores is set but the data has no {missing} column: the method (ODPO) "
            f"reads a score of each completion from columns {list(fields)}",
            source=name,
        )
    return scores_present(kinds, config)


def _features(has_scores: bool) -> Features:
    ids = List(Value("int32"))
    features = {column: ids for column in TOKEN_COLUMNS}
    if has_scores:
        features.update({column: Value("float64") for column in SCORE_COLUMNS})
    features.update(
        {
            DROP_REASON: Value("string"),
            IDENTICAL: Value("bool"),
            IDENTICAL_AFTER_TRUNCATION: Value("bool"),
            PROMPT_TRUNCATED: Value("bool"),
            COMPLETIONS_TRUNCATED: Value("int8"),
        }
    )
    return Features(features)


def _num_proc(config: DataConfig, rows: int) -> int | None:
    if config.num_proc is None:
        return None
    num_proc = min(config.num_proc, rows)
    return num_proc if num_proc > 1 else None


def _cache_exists(cache_file: str, num_proc: int | None) -> bool:
    """Mirror of how ``datasets.map`` names its cache files (one per worker with num_proc)."""
    if num_proc is None:
        return os.path.exists(cache_file)
    prefix, ext = os.path.splitext(cache_file)
    return all(
        os.path.exists(f"{prefix}_{rank:05d}_of_{num_proc:05d}{ext}") for rank in range(num_proc)
    )


def _report(summary: DataSummary) -> None:
    logger.info("%s", summary.format())
    if summary.identical_pairs:
        logger.warning(
            "%s: %d row(s) with chosen identical to rejected (%d of them only after truncation "
            "to the same tokens), %s (identical_pairs=%r)",
            summary.source,
            summary.identical_pairs,
            summary.identical_after_truncation,
            "kept" if summary.identical_pairs_action == "keep" else "dropped",
            summary.identical_pairs_action,
        )
