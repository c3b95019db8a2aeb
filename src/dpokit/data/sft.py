"""Supervised fine-tuning data: source -> validated, tokenized (prompt, completion) rows, cached.

The SFT stage of the demo, ``dpokit sft`` and SPIN read the same rows. Accepted layouts (registered
in :data:`dpokit.data.formats.FORMATS` with ``task="sft"``):

- ``prompt`` + ``completion`` strings;
- ``prompt`` (string or message list, or absent) + ``completion`` message list (chat template);
- ``messages``: one conversation whose LAST assistant turn is the completion, everything before it
  the prompt (turns after it are ignored).

Everything else is the pairs pipeline's machinery (:mod:`dpokit.data.pipeline`): the same loading,
row-level `DataError`s, BOS/EOS handling and truncation (`PairEncoder`), summary and on-disk cache.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from datasets import Features, List, Value

from .config import DataConfig
from .errors import DataError, InvalidRow
from .formats import Format, PairExample, detect_format, read_messages, read_text, register_format
from .loading import RowLocator, load_source
from .pipeline import (
    PreparedData,
    _cache_exists,
    _cache_file,
    _column_kinds,
    _kept_rows,
    _num_proc,
    _report,
    pairs_fingerprint,
)
from .summary import (
    COMPLETIONS_TRUNCATED,
    DROP_REASON,
    IDENTICAL,
    PROMPT_TRUNCATED,
    summarize,
)
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
    completion = read_messages(row, COMPLETION_FIELD)
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
    return SFTExample("chat", prompt, completion)


def _detect_messages(kinds: Mapping[str, str], config: DataConfig) -> bool:
    return kinds.get(MESSAGES_FIELD) == "messages"


def _normalize_messages(row: Mapping, config: DataConfig) -> SFTExample:
    return _split_last_assistant(read_messages(row, MESSAGES_FIELD), MESSAGES_FIELD)


def _split_last_assistant(messages: list[dict], field: str) -> SFTExample:
    """Prompt = the turns before the last assistant turn; completion = that turn."""
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
    if last is None:
        raise InvalidRow(f"field {field!r} has no assistant turn to train on")
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
    dataset = src.dataset.with_format(None)
    if len(dataset) == 0:
        raise DataError("the dataset has no rows", source=src.name)
    kinds = _column_kinds(dataset)
    try:
        fmt = detect_format(kinds, config, task="sft")
    except InvalidRow as error:
        raise DataError(str(error), source=src.name) from None
    encoder = PairEncoder(tokenizer, config)
    if fmt.kind == "chat":
        encoder.require_chat_template(src.name)
    fingerprint = pairs_fingerprint(src.fingerprint, fmt.name, tokenizer, encoder, config)
    cache_file = _cache_file(src, config, fingerprint)
    if cache_file is not None:
        cache_file = cache_file.replace("pairs-", "sft-")
    num_proc = _num_proc(config, len(dataset))
    from_cache = cache_file is not None and _cache_exists(cache_file, num_proc)
    mapped = dataset.map(
        SFTRowProcessor(fmt, encoder, src.name, src.locator),
        with_indices=True,
        batched=True,
        remove_columns=dataset.column_names,
        features=_features(),
        num_proc=num_proc,
        cache_file_name=cache_file,
        new_fingerprint=fingerprint,
        desc="dpokit: tokenizing SFT rows",
    )
    summary = summarize(mapped, src.name, fmt.name, config.identical_pairs)
    _report(summary)
    if summary.rows_kept == 0:
        raise DataError(f"no rows left to train on\n{summary.format()}", source=src.name)
    kept = _kept_rows(mapped, fingerprint)
    return PreparedData(kept, summary, fingerprint, False, cache_file, from_cache)


class SFTRowProcessor:
    """``Dataset.map`` function: raw rows -> prompt/completion ids + the summary's status columns.

    ``_completions_truncated`` counts the one completion of each row; ``_identical`` is always
    False (there is no pair).
    """

    def __init__(self, fmt: Format, encoder: PairEncoder, source_name: str, locator: RowLocator):
        self.fmt = fmt
        self.encoder = encoder
        self.source_name = source_name
        self.locator = locator

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        rows = [{column: values[i] for column, values in batch.items()} for i in range(n)]
        texts = [
            self._guard(index, self._render, row) for row, index in zip(rows, indices, strict=True)
        ]
        prompts = self.encoder.tokenize([t[0] for t in texts])
        completions = self.encoder.tokenize([t[1] for t in texts])
        out = {column: [] for column in SFT_COLUMNS}
        out.update({PROMPT_TRUNCATED: [], COMPLETIONS_TRUNCATED: []})
        for index, prompt, completion in zip(indices, prompts, completions, strict=True):
            prompt, completion, prompt_cut, completion_cut = self._guard(
                index, self._finish, prompt, completion
            )
            out["prompt_input_ids"].append(prompt)
            out["completion_input_ids"].append(completion)
            out[PROMPT_TRUNCATED].append(prompt_cut)
            out[COMPLETIONS_TRUNCATED].append(completion_cut)
        out[DROP_REASON] = [""] * n
        out[IDENTICAL] = [False] * n
        return out

    def _render(self, row: dict) -> tuple[str, str]:
        example = self.fmt.normalize(row, self.encoder.config)
        # The pair encoder renders chat through the template; the completion fills both sides.
        pair = PairExample(example.kind, example.prompt, example.completion, example.completion)
        prompt, completion, _ = self.encoder.render(pair)
        return prompt, completion

    def _finish(self, prompt: list[int], completion: list[int]):
        encoder = self.encoder
        prompt = encoder.with_bos(prompt)
        if not prompt:
            raise InvalidRow(
                "the prompt encodes to no tokens: the first completion token needs context"
            )
        prompt, prompt_cut = encoder.truncate_prompt(prompt)
        completion, completion_cut = encoder.truncate_completion(
            "completion", len(prompt), encoder.with_eos(completion)
        )
        return prompt, completion, prompt_cut, completion_cut

    def _guard(self, index: int, fn, *args):
        try:
            return fn(*args)
        except InvalidRow as error:
            row, kind = self.locator.locate(index)
            raise DataError(str(error), self.source_name, row, kind) from None


def _features() -> Features:
    ids = List(Value("int32"))
    return Features(
        {
            "prompt_input_ids": ids,
            "completion_input_ids": ids,
            PROMPT_TRUNCATED: Value("bool"),
            COMPLETIONS_TRUNCATED: Value("int8"),
            DROP_REASON: Value("string"),
            IDENTICAL: Value("bool"),
        }
    )


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
