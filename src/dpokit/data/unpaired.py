"""Unpaired (KTO) data: source -> validated, tokenized (prompt, completion, label) examples.

Accepted layouts (registered in :data:`dpokit.data.formats.FORMATS` with ``task="unpaired"``):

- ``prompt`` + ``completion`` strings, ``label`` true/false (true = desirable, thumbs-up);
- ``prompt`` (string, message list, or absent) + ``completion`` message list + ``label``; without a
  prompt the completion's last turn (an assistant turn) is the completion, the turns before it the
  prompt;
- any preference-pair layout (:func:`dpokit.data.prepare_pairs`): each pair becomes one desirable
  example (prompt, chosen) and one undesirable example (prompt, rejected); the log says so.

KTO's reference point z0 is estimated on MISMATCHED pairs: prompt x_i with another example's
completion. Each example's mismatched completion (``kl_completion_input_ids``) is fixed here, once:
in a seeded permutation of the rows, every row takes the completion of the row before it (skipping
rows with the same prompt). A rotation inside each training batch would make the mismatched pairs,
and so their reference log-probs, depend on how batches are drawn; a fixed pairing draws from the
same distribution (another random example), lets the reference log-probs of both kinds of pair be
pre-computed and cached like every other method's, and makes resumed runs exact. TRL fixes the
pairing at preparation time too.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

import datasets
import numpy as np
import pyarrow.compute as pc
import torch
from datasets import Features, List, Value

from dpokit.hashing import derive_fingerprint

from .collate import PairCollator
from .config import DataConfig
from .errors import DataError, InvalidRow
from .formats import (
    Format,
    check_completion_turns,
    detect_format,
    read_messages,
    read_text,
    register_format,
)
from .loading import load_source
from .pipeline import PreparedData, pairs_fingerprint, prepare_pairs, tokenize_rows
from .rows import cache_path, dataset_column_kinds, source_rows
from .single import CompletionRowProcessor, completion_features
from .summary import STATUS_COLUMNS
from .tokenization import PairEncoder

logger = logging.getLogger("dpokit.data")

COMPLETION_FIELD = "completion"
LABEL_FIELD = "label"
PAIRING_SEED = 0  # the mismatched pairing is part of the data's fingerprint: keep it fixed
UNPAIRED_VERSION = 1  # bump when the output for the same input changes


@dataclass
class UnpairedExample:
    """One labelled example; ``kind`` is ``"text"`` (strings) or ``"chat"`` (message lists)."""

    kind: str
    prompt: str | list[dict]
    completion: str | list[dict]
    desirable: bool


# ---- formats ------------------------------------------------------------------------------------


def read_label(row: Mapping) -> bool:
    """The row's ``label`` (True = desirable). Raises `InvalidRow` unless it is a bool."""
    value = row.get(LABEL_FIELD)
    if value is None:
        raise InvalidRow(f"missing field {LABEL_FIELD!r} (true = desirable, false = undesirable)")
    if not isinstance(value, bool):
        raise InvalidRow(
            f"field {LABEL_FIELD!r} must be true or false (desirable or not), got {value!r}"
        )
    return value


def _detect_text(kinds: Mapping[str, str], config: DataConfig) -> bool:
    text = kinds.get(config.prompt_field) == kinds.get(COMPLETION_FIELD) == "text"
    return text and kinds.get(LABEL_FIELD) == "bool"


def _normalize_text(row: Mapping, config: DataConfig) -> UnpairedExample:
    return UnpairedExample(
        "text",
        read_text(row, config.prompt_field),
        read_text(row, COMPLETION_FIELD, completion=True),
        read_label(row),
    )


def _detect_chat(kinds: Mapping[str, str], config: DataConfig) -> bool:
    prompt_ok = kinds.get(config.prompt_field) in (None, "null", "text", "messages")
    return (
        kinds.get(COMPLETION_FIELD) == "messages" and kinds.get(LABEL_FIELD) == "bool" and prompt_ok
    )


def _normalize_chat(row: Mapping, config: DataConfig) -> UnpairedExample:
    given = completion = read_messages(row, COMPLETION_FIELD)
    prompt = row.get(config.prompt_field)
    if isinstance(prompt, list):
        prompt = read_messages(row, config.prompt_field)
        if completion[: len(prompt)] == prompt:  # a full conversation repeating the prompt
            completion = completion[len(prompt) :]
    elif isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is None or isinstance(prompt, str):
        if len(completion) < 2:
            raise InvalidRow(
                f"no {config.prompt_field!r} and field {COMPLETION_FIELD!r} has a single turn: "
                "the completion needs a prompt"
            )
        prompt, completion = completion[:-1], completion[-1:]
    else:
        raise InvalidRow(
            f"field {config.prompt_field!r} must be a string or a message list, "
            f"got {type(prompt).__name__}"
        )
    if not completion or any(not m["content"].strip() for m in completion):
        raise InvalidRow(f"empty completion in field {COMPLETION_FIELD!r}")
    check_completion_turns(completion, given, COMPLETION_FIELD)
    return UnpairedExample("chat", prompt, completion, read_label(row))


UNPAIRED_CHAT = register_format(
    Format(
        name="unpaired_conversational",
        task="unpaired",
        kind="chat",
        description="completion message list + label (bool), with a prompt (string or message "
        "list) or without one (then the completion's last turn is the completion)",
        detect=_detect_chat,
        normalize=_normalize_chat,
    )
)
UNPAIRED_TEXT = register_format(
    Format(
        name="unpaired_prompt_completion",
        task="unpaired",
        kind="text",
        description="prompt/completion strings + label (bool: true = desirable)",
        detect=_detect_text,
        normalize=_normalize_text,
    )
)


# ---- the pipeline -------------------------------------------------------------------------------


def prepare_unpaired(
    source, tokenizer, config: DataConfig | None = None, split: str | None = None
) -> PreparedData:
    """Load, validate and tokenize KTO examples (pairs convert to two examples each).

    Returns a `PreparedData` whose dataset has ``prompt_input_ids``, ``completion_input_ids``
    (ending with EOS unless truncated), ``kl_completion_input_ids`` (the completion of the
    mismatched pair, see the module docstring), ``label`` (bool, True = desirable) and ``index``.
    Raises `DataError` naming the source and line/row for bad input, and for examples that all
    carry the same label (`check_both_labels`).
    """
    config = config or DataConfig()
    src = load_source(source, config, split)
    dataset = source_rows(src)
    kinds = dataset_column_kinds(dataset)
    fmt = _detect(kinds, config, src.name)
    if fmt is None:
        return _from_pairs(source, tokenizer, config, split)
    encoder = PairEncoder(tokenizer, config)
    if fmt.kind == "chat":
        encoder.require_chat_template(src.name)
    fingerprint = derive_fingerprint(
        pairs_fingerprint(src.fingerprint, fmt.name, tokenizer, encoder, config),
        f"unpaired-v{UNPAIRED_VERSION}",
    )
    cache_file = cache_path(src, config, fingerprint)
    if cache_file is not None:
        cache_file = cache_file.replace("pairs-", "unpaired-")
    mapped, summary, from_cache = tokenize_rows(  # rows are never dropped here
        dataset,
        UnpairedRowProcessor(fmt, encoder, src.name, src.locator),
        completion_features({LABEL_FIELD: Value("bool")}),
        src.name,
        fmt.name,
        config,
        fingerprint,
        cache_file,
        "dpokit: tokenizing unpaired examples",
    )
    examples = mapped.remove_columns(
        list(STATUS_COLUMNS), new_fingerprint=derive_fingerprint(fingerprint, "out")
    )
    check_both_labels(examples, src.name)
    examples = with_mismatched_completions(examples, fingerprint)
    return PreparedData(examples, summary, fingerprint, False, cache_file, from_cache)


def _detect(kinds: dict, config: DataConfig, name: str) -> Format | None:
    """The unpaired format of these columns; None for preference pairs; else a `DataError`."""
    try:
        return detect_format(kinds, config, task="unpaired")
    except InvalidRow as unpaired_error:
        try:
            detect_format(kinds, config, task="pairs")
        except InvalidRow:
            raise DataError(
                f"{unpaired_error}\n  - preference pairs in any layout the pairwise methods "
                "read (prompt/chosen/rejected ...): each becomes one desirable and one "
                "undesirable example",
                source=name,
            ) from None
    return None


def _from_pairs(source, tokenizer, config: DataConfig, split: str | None) -> PreparedData:
    """Preference pairs -> (prompt, chosen, desirable) and (prompt, rejected, undesirable)."""
    pairs = prepare_pairs(source, tokenizer, config, split)
    fingerprint = derive_fingerprint(pairs.fingerprint, f"unpaired-from-pairs-v{UNPAIRED_VERSION}")
    examples = pairs.dataset.map(
        _unpair,
        batched=True,
        remove_columns=pairs.dataset.column_names,
        features=Features(
            {
                "prompt_input_ids": List(Value("int32")),
                "completion_input_ids": List(Value("int32")),
                LABEL_FIELD: Value("bool"),
            }
        ),
        new_fingerprint=fingerprint,
        desc="dpokit: pairs -> unpaired examples",
    )
    n = len(pairs.dataset)
    logger.info(
        "KTO trains on unpaired examples: converted %d preference pairs of %s into %d desirable "
        "(prompt, chosen) and %d undesirable (prompt, rejected) examples",
        n,
        pairs.summary.source,
        n,
        n,
    )
    summary = replace(
        pairs.summary,
        format_name=f"{pairs.summary.format_name}, each pair -> 1 desirable + 1 undesirable",
    )
    examples = with_mismatched_completions(examples, fingerprint)
    return PreparedData(examples, summary, fingerprint, False, pairs.cache_file, pairs.from_cache)


def _unpair(batch: dict[str, list]) -> dict[str, list]:
    # Interleaved (chosen, rejected) per pair, so an unshuffled batch holds both labels.
    out = {"prompt_input_ids": [], "completion_input_ids": [], LABEL_FIELD: []}
    for prompt, chosen, rejected in zip(
        batch["prompt_input_ids"],
        batch["chosen_input_ids"],
        batch["rejected_input_ids"],
        strict=True,
    ):
        for completion, desirable in ((chosen, True), (rejected, False)):
            out["prompt_input_ids"].append(prompt)
            out["completion_input_ids"].append(completion)
            out[LABEL_FIELD].append(desirable)
    return out


def check_both_labels(examples: datasets.Dataset, source: str) -> None:
    """Refuse KTO examples that are all desirable or all undesirable (`DataError`).

    With one kind KTO's loss pushes every log-ratio the same way, away from a reference point z0
    that only tracks it, and the paper's balance lam_D*n_D / (lam_U*n_U) is 0 or infinite: no
    weight setting makes that a KTO run. SFT (``dpokit sft``) trains on desirable examples alone.
    """
    desirable = int(pc.sum(pc.cast(examples.data.column(LABEL_FIELD), "int64")).as_py() or 0)
    undesirable = len(examples) - desirable
    if desirable and undesirable:
        return
    raise DataError(
        f"KTO needs both desirable ({LABEL_FIELD}=true) and undesirable ({LABEL_FIELD}=false) "
        f"examples; got {desirable} desirable and {undesirable} undesirable. With one kind its "
        "loss has nothing to contrast (for desirable examples alone use `dpokit sft`)",
        source=source,
    )


class UnpairedRowProcessor(CompletionRowProcessor):
    """``Dataset.map`` function: raw rows -> prompt/completion ids, label, status columns."""

    extra_columns = (LABEL_FIELD,)

    def _extras(self, example: UnpairedExample) -> tuple[bool]:
        return (example.desirable,)


# ---- the mismatched pairs -----------------------------------------------------------------------


def mismatched_partners(prompt_keys: Sequence, seed: int = PAIRING_SEED) -> np.ndarray:
    """``partner[i]``: the row whose completion forms row i's mismatched pair. (N,) int64.

    Rows are put in a seeded random order and each takes the completion of the row before it
    (a rotation by one), moving further back past rows with the same prompt key: a mismatched
    pair must not be a real answer to its prompt. When every row has the same prompt there is no
    mismatched pair to be had; the plain rotation is used and a warning says so.
    """
    n = len(prompt_keys)
    if n < 2:
        raise ValueError("KTO's mismatched pairs need at least two examples")
    order = np.random.default_rng(seed).permutation(n)
    partner = np.empty(n, dtype=np.int64)
    distinct = len(set(prompt_keys)) > 1
    if not distinct:
        logger.warning("every KTO example has the same prompt: mismatched pairs share the prompt")
    for k, row in enumerate(order):
        candidate = order[k - 1]
        step = 1
        while distinct and prompt_keys[candidate] == prompt_keys[row]:
            step += 1
            candidate = order[(k - step) % n]
        partner[row] = candidate
    return partner


def with_mismatched_completions(examples: datasets.Dataset, fingerprint: str) -> datasets.Dataset:
    """Add ``kl_completion_input_ids`` (see :func:`mismatched_partners`) and ``index``."""
    keys = []
    for batch in examples.select_columns(["prompt_input_ids"]).iter(batch_size=1024):
        keys.extend(hash(tuple(ids)) for ids in batch["prompt_input_ids"])
    if len(keys) < 2:
        raise DataError(
            f"KTO needs at least two examples (its reference point z0 pairs each prompt with "
            f"another example's completion); got {len(keys)}"
        )
    partner = mismatched_partners(keys)
    if examples._indices is not None:  # the column below is taken from the table itself
        examples = examples.flatten_indices(new_fingerprint=derive_fingerprint(fingerprint, "flat"))
    completions = examples.data.column("completion_input_ids")  # arrow: no Python lists
    examples = examples.add_column(
        "kl_completion_input_ids",
        pc.take(completions, partner),
        new_fingerprint=derive_fingerprint(fingerprint, "partners"),
    )
    return examples.add_column(
        "index",
        np.arange(len(examples), dtype=np.int64),
        new_fingerprint=derive_fingerprint(fingerprint, "index"),
        feature=Value("int64"),
    )


# ---- collation ----------------------------------------------------------------------------------


class UnpairedCollator:
    """Prepared KTO rows -> the pair batch layout, with the mismatched pairs as the second half.

    Returns (B = number of rows, T = longest prompt + completion, right-padded):

    - ``input_ids`` (2B, T): rows 0..B-1 are prompt_i + completion_i, rows B..2B-1 are
      prompt_i + kl_completion_i (the mismatched pairs that estimate z0).
    - ``attention_mask`` (2B, T), ``completion_mask`` (2B, T) bool, as in
      :class:`~dpokit.data.PairCollator`.
    - ``label`` (B,) bool: True for a desirable example.
    - ``index`` (B,) long.

    Being :class:`PairCollator`'s layout, a pre-computed reference table stores (matched,
    mismatched) where pairs store (chosen, rejected), and works unchanged.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pairs = PairCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        batch = self.pairs(
            [
                {
                    "prompt_input_ids": row["prompt_input_ids"],
                    "chosen_input_ids": row["completion_input_ids"],
                    "rejected_input_ids": row["kl_completion_input_ids"],
                    "index": row["index"],
                }
                for row in rows
            ]
        )
        batch[LABEL_FIELD] = torch.tensor([bool(row[LABEL_FIELD]) for row in rows])
        return batch
