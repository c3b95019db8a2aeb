"""Supervised fine-tuning data: source -> validated, tokenized (prompt, completion) rows, cached.

The SFT stage of the demo, ``dpokit sft`` and SPIN read the same rows. Accepted layouts (registered
in :data:`dpokit.data.formats.FORMATS` with ``task="sft"``):

- ``prompt`` + ``completion`` strings;
- ``prompt`` (string or message list, or absent) + ``completion`` message list (chat template);
- ``messages``: one conversation whose last turn, an assistant turn, is the completion, everything
  before it the prompt (a conversation ending in another turn is refused with its line).

Everything else is the pairs pipeline's machinery (:mod:`dpokit.data.pipeline`): the same loading,
row-level `DataError`s, BOS/EOS handling and truncation (`PairEncoder`), summary and on-disk cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch

from .config import DataConfig
from .errors import InvalidRow
from .formats import Format, check_completion_turns, read_messages, read_text, register_format
from .loading import load_source
from .pipeline import PreparedData, pairs_fingerprint, tokenize_rows
from .rows import cache_path, dataset_column_kinds, detect_source_format, kept_rows, source_rows
from .single import CompletionRowProcessor, completion_features
from .tokenization import PairEncoder

COMPLETION_FIELD = "completion"
MESSAGES_FIELD = "messages"
SFT_COLUMNS = ("prompt_input_ids", "completion_input_ids")


@dataclass
class SFTExample:
    """One supervised example; ``kind`` is ``"text"`` (strings) or ``"chat"`` (message lists)."""

    kind: str
    prompt: str | list[dict]
    completion: str | list[dict]


# ---- formats ------------------------------------------------------------------------------------


def _detect_text(kinds: Mapping[str, str], config: DataConfig) -> bool:
    return kinds.get(config.prompt_field) == "text" and kinds.get(COMPLETION_FIELD) == "text"


def _normalize_text(row: Mapping, config: DataConfig) -> SFTExample:
    return SFTExample(
        "text",
        read_text(row, config.prompt_field),
        read_text(row, COMPLETION_FIELD, completion=True),
    )


def _detect_chat(kinds: Mapping[str, str], config: DataConfig) -> bool:
    prompt_ok = kinds.get(config.prompt_field) in (None, "null", "text", "messages")
    return kinds.get(COMPLETION_FIELD) == "messages" and prompt_ok


def _normalize_chat(row: Mapping, config: DataConfig) -> SFTExample:
    given = completion = read_messages(row, COMPLETION_FIELD)
    prompt = row.get(config.prompt_field)
    if isinstance(prompt, list):
        prompt = read_messages(row, config.prompt_field)
        if completion[: len(prompt)] == prompt:  # a full conversation repeating the prompt
            completion = completion[len(prompt) :]
    elif isinstance(prompt, str) and prompt.strip():
        prompt = [{"role": "user", "content": prompt}]
    elif prompt is None or isinstance(prompt, str):
        # No prompt: the completion list is a conversation, split at its last assistant turn.
        return _split_last_assistant(completion, COMPLETION_FIELD)
    else:
        raise InvalidRow(
            f"field {config.prompt_field!r} must be a string or a message list, "
            f"got {type(prompt).__name__}"
        )
    if not completion or any(not m["content"].strip() for m in completion):
        raise InvalidRow(f"empty completion in field {COMPLETION_FIELD!r}")
    check_completion_turns(completion, given, COMPLETION_FIELD)
    return SFTExample("chat", prompt, completion)


def _detect_messages(kinds: Mapping[str, str], config: DataConfig) -> bool:
    return kinds.get(MESSAGES_FIELD) == "messages"


def _normalize_messages(row: Mapping, config: DataConfig) -> SFTExample:
    return _split_last_assistant(read_messages(row, MESSAGES_FIELD), MESSAGES_FIELD)


def _split_last_assistant(messages: list[dict], field: str) -> SFTExample:
    """Prompt = the turns before the last turn, which must be an assistant turn; completion =
    that turn. A conversation that ends in another turn is refused, not cut: it is usually a row
    built wrongly, and training on a shortened one would hide that."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise InvalidRow(f"field {field!r} has no assistant turn to train on")
    check_completion_turns(messages[last:], messages, field)
    if last == 0:
        raise InvalidRow(f"field {field!r}: the assistant turn needs at least one turn before it")
    if not messages[last]["content"].strip():
        raise InvalidRow(f"field {field!r}: the last assistant turn is empty")
    return SFTExample("chat", messages[:last], [messages[last]])


SFT_CHAT = register_format(
    Format(
        name="sft_prompt_completion_chat",
        task="sft",
        kind="chat",
        description="completion as a message list, with a prompt (string or message list) or "
        "without one (then the last assistant turn is the completion)",
        detect=_detect_chat,
        normalize=_normalize_chat,
    )
)
SFT_TEXT = register_format(
    Format(
        name="sft_prompt_completion",
        task="sft",
        kind="text",
        description="prompt/completion strings",
        detect=_detect_text,
        normalize=_normalize_text,
    )
)
SFT_MESSAGES = register_format(
    Format(
        name="sft_messages",
        task="sft",
        kind="chat",
        description="messages: a conversation; its last assistant turn is the completion",
        detect=_detect_messages,
        normalize=_normalize_messages,
    )
)


# ---- the pipeline -------------------------------------------------------------------------------


def prepare_sft(
    source, tokenizer, config: DataConfig | None = None, split: str | None = None
) -> PreparedData:
    """Load, validate and tokenize SFT rows once (cached for file-backed sources).

    ``source``: anything :func:`dpokit.data.prepare_pairs` accepts. Returns a `PreparedData` whose
    dataset has ``prompt_input_ids``, ``completion_input_ids`` (ending with EOS unless truncated)
    and ``index``. Raises `DataError` naming the source and line/row for bad input.
    """
    config = config or DataConfig()
    src = load_source(source, config, split)
    dataset = source_rows(src)
    fmt = detect_source_format(dataset_column_kinds(dataset), config, src.name, task="sft")
    encoder = PairEncoder(tokenizer, config)
    if fmt.kind == "chat":
        encoder.require_chat_template(src.name)
    fingerprint = pairs_fingerprint(src.fingerprint, fmt.name, tokenizer, encoder, config)
    cache_file = cache_path(src, config, fingerprint)
    if cache_file is not None:
        cache_file = cache_file.replace("pairs-", "sft-")
    mapped, summary, from_cache = tokenize_rows(
        dataset,
        SFTRowProcessor(fmt, encoder, src.name, src.locator),
        completion_features(),
        src.name,
        fmt.name,
        config,
        fingerprint,
        cache_file,
        "dpokit: tokenizing SFT rows",
    )
    kept = kept_rows(mapped, fingerprint)
    return PreparedData(kept, summary, fingerprint, False, cache_file, from_cache)


class SFTRowProcessor(CompletionRowProcessor):
    """``Dataset.map`` function: raw rows -> prompt/completion ids + the summary's status columns.

    ``_completions_truncated`` counts the one completion of each row; ``_identical`` is always
    False (there is no pair).
    """


# ---- collation ----------------------------------------------------------------------------------


class SFTCollator:
    """Prepared SFT rows -> one right-padded batch (B rows, T = longest prompt + completion).

    - ``input_ids`` (B, T) long, padded with ``pad_token_id``.
    - ``attention_mask`` (B, T) long: 1 on real tokens.
    - ``completion_mask`` (B, T) bool: True where the TOKEN is a completion token (not shifted; the
      scorer shifts).
    - ``index`` (B,) long: each row's index in the prepared dataset.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: use resolve_pad_token_id(tokenizer)")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        prompts = [list(row["prompt_input_ids"]) for row in rows]
        completions = [list(row["completion_input_ids"]) for row in rows]
        length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        if self.pad_to_multiple_of:
            length = -(-length // self.pad_to_multiple_of) * self.pad_to_multiple_of
        input_ids = torch.full((len(rows), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(rows), length), dtype=torch.long)
        completion_mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            start, end = len(prompt), len(prompt) + len(completion)
            input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
            attention_mask[i, :end] = 1
            completion_mask[i, start:end] = True
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "index": torch.tensor([int(row["index"]) for row in rows], dtype=torch.long),
        }
