"""Data formats: a detector and a normalizer per format, kept in a registry.

A format is recognised from the kinds of the dataset's columns (text, message list, number, ...) and
turns one raw row into a normalized example. Pair formats produce a `PairExample`; later tasks
(unpaired KTO rows, SFT rows, multi-turn sessions) register formats with their own ``task`` and
example type, and the pipeline for that task asks `detect_format` for its task only.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from datasets import LargeList, List, Sequence, Value

from .config import DataConfig
from .errors import InvalidRow

Messages = list[dict]

# The roles chat templates know. Tool results (``tool``; ``function`` in older OpenAI-style data;
# ``ipython`` in Llama 3's template) may appear in a prompt, as context; a completion, the text a
# model is trained to write, holds assistant turns only. Any other role is refused rather than
# handed to a template that would render it in some way of its own, or not at all.
ROLES = ("system", "developer", "user", "assistant", "tool", "function", "ipython")
COMPLETION_ROLE = "assistant"


@dataclass
class PairExample:
    """One preference pair. ``kind == "text"``: strings; ``kind == "chat"``: message lists, where
    ``chosen``/``rejected`` hold only the completion turns and ``prompt`` the shared history."""

    kind: str
    prompt: str | Messages
    chosen: str | Messages
    rejected: str | Messages

    @property
    def identical(self) -> bool:
        """Chosen and rejected are the same."""
        return self.chosen == self.rejected


@dataclass(frozen=True)
class Format:
    """One input layout.

    ``task``: what the examples train, the data kinds of the method table: ``"pairs"``,
    ``"unpaired"``, ``"sft"`` or ``"multiturn_pairs"``. ``kind``: how they are tokenized,
    ``"text"`` or ``"chat"`` (through the chat template).
    ``detect(kinds, config)`` says whether columns of these kinds are this format;
    ``normalize(row, config)`` turns one raw row into the task's example or raises `InvalidRow`.
    """

    name: str
    task: str
    kind: str
    description: str
    detect: Callable[[Mapping[str, str], DataConfig], bool]
    normalize: Callable[[Mapping, DataConfig], object]


FORMATS: list[Format] = []


def register_format(fmt: Format) -> Format:
    """Add a format; earlier registrations win when several detect the same columns."""
    FORMATS.append(fmt)
    return fmt


def detect_format(kinds: Mapping[str, str], config: DataConfig, task: str = "pairs") -> Format:
    """The first registered format of ``task`` that recognises the columns; `InvalidRow` if none."""
    candidates = [fmt for fmt in FORMATS if fmt.task == task]
    for fmt in candidates:
        if fmt.detect(kinds, config):
            return fmt
    columns = ", ".join(f"{name} ({kind})" for name, kind in kinds.items()) or "none"
    expected = "\n".join(f"  - {fmt.name}: {fmt.description}" for fmt in candidates)
    raise InvalidRow(
        f"cannot tell the data format from the columns [{columns}]; expected:\n{expected}"
    )


# ---- column kinds -------------------------------------------------------------------------------


def feature_kind(feature) -> str:
    """``text``, ``number``, ``bool``, ``messages``, ``null``, ``mixed`` or ``other``.

    ``mixed``: a ``Json`` feature, which ``datasets`` uses for JSON columns whose type changes
    between rows; its values must be looked at (`row_column_kinds`).
    """
    if type(feature).__name__ == "Json":
        return "mixed"
    if isinstance(feature, Value):
        dtype = feature.dtype
        if dtype in ("string", "large_string"):
            return "text"
        if dtype == "bool":
            return "bool"
        if dtype == "null":
            return "null"
        return "number" if dtype.startswith(("int", "uint", "float")) else "other"
    inner = None
    if isinstance(feature, list) and feature:
        inner = feature[0]
    elif isinstance(feature, (List, LargeList, Sequence)):
        inner = feature.feature
    if isinstance(inner, dict) and {"role", "content"} <= set(inner):
        return "messages"
    if type(inner).__name__ == "Json":
        return "mixed"  # lists of dicts whose keys differ between rows (a message lacks one)
    return "other"


def value_kind(value) -> str:
    """The same kinds for one Python value (used when the file could not be loaded as a table)."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    if isinstance(value, list) and value and all(_is_message(m) for m in value):
        return "messages"
    return "other"


def column_kinds(features) -> dict[str, str]:
    """Column name -> kind (:func:`feature_kind`) of a ``datasets.Features``."""
    return {name: feature_kind(feature) for name, feature in features.items()}


def row_column_kinds(rows: Iterable[Mapping]) -> dict[str, str]:
    """Most common non-null kind of each column over Python rows (one odd row must not decide)."""
    counts: dict[str, Counter] = {}
    for row in rows:
        for name, value in row.items():
            counts.setdefault(name, Counter())[value_kind(value)] += 1
    kinds = {}
    for name, counter in counts.items():
        non_null = [(kind, n) for kind, n in counter.most_common() if kind != "null"]
        kinds[name] = non_null[0][0] if non_null else "null"
    return kinds


# ---- field readers ------------------------------------------------------------------------------


def read_text(row: Mapping, field: str, completion: bool = False) -> str:
    """``row[field]`` as a string. Raises `InvalidRow` when it is missing or not a string (or, for
    a ``completion``, blank)."""
    value = _present(row, field)
    if not isinstance(value, str):
        raise InvalidRow(f"field {field!r} must be a string, got {type(value).__name__}")
    if completion and not value.strip():
        raise InvalidRow(f"empty completion in field {field!r}")
    return check_unicode(value, field)


def check_unicode(text: str, field: str) -> str:
    """``text`` if it is valid Unicode; a JSON escape such as "\\ud800" gives a lone surrogate,
    which no tokenizer (nor Arrow) can encode."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidRow(
            f"field {field!r} is not valid Unicode: {error.reason} at character {error.start} "
            f"({text[error.start]!r}; a lone UTF-16 surrogate from a \\u escape?)"
        ) from None
    return text


def read_messages(row: Mapping, field: str) -> Messages:
    """``row[field]`` as a message list. Raises `InvalidRow` unless it is a non-empty list of
    ``{role, content}`` dicts."""
    value = _present(row, field)
    if not isinstance(value, list) or not value:
        raise InvalidRow(
            f"field {field!r} must be a non-empty list of {{'role', 'content'}} messages, "
            f"got {_describe(value)}"
        )
    for position, message in enumerate(value):
        if not _is_message(message):
            raise InvalidRow(
                f"field {field!r} message {position} must be a dict with string 'role' and "
                f"'content', got {_describe(message)}"
            )
        check_unicode(message["content"], f"{field}[{position}].content")
        if message["role"] not in ROLES:
            raise InvalidRow(
                f"field {field!r} message {position} has the unknown role {message['role']!r}; "
                f"roles: {', '.join(ROLES)}"
            )
    # Arrow fills keys that other rows have with None; a template must not see them.
    return [{k: v for k, v in message.items() if v is not None} for message in value]


def check_completion_turns(completion: Messages, conversation: Messages, field: str) -> None:
    """Refuse a completion that is not all assistant turns (a conversation that ends in a user
    turn, or whose answer holds a tool result), naming the message in ``field``.

    ``completion`` is a suffix of ``conversation``, the message list as the row gave it, so
    positions are the user's: message k of ``field``.
    """
    offset = len(conversation) - len(completion)
    for k, message in enumerate(completion):
        if message["role"] != COMPLETION_ROLE:
            last = len(conversation) - 1
            span = f"messages {offset}-{last}" if last > offset else f"message {offset}"
            raise InvalidRow(
                f"field {field!r} message {offset + k} is a {message['role']!r} turn in the "
                f"completion ({span}, after the prompt); completion turns must be "
                "assistant turns: the conversation must end with the assistant's answer"
            )


def read_score(row: Mapping, field: str, required: bool) -> float:
    """A numeric score; a missing one is an error when scores are required, NaN otherwise."""
    value = row.get(field)
    if value is None:
        if required:
            raise InvalidRow(f"missing field {field!r} (require_scores is set)")
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidRow(f"field {field!r} must be a number, got {type(value).__name__}")
    if required and math.isnan(value):
        raise InvalidRow(f"field {field!r} is NaN")
    return float(value)


def _present(row: Mapping, field: str):
    value = row.get(field)
    if value is None:
        raise InvalidRow(f"missing field {field!r}")
    return value


def _is_message(value) -> bool:
    return (
        isinstance(value, Mapping)
        and isinstance(value.get("role"), str)
        and isinstance(value.get("content"), str)
    )


def _describe(value) -> str:
    return f"{type(value).__name__} {value!r}"[:80]


def scores_present(kinds: Mapping[str, str], config: DataConfig) -> bool:
    """Whether rows carry ODPO scores: both columns exist, or they are required."""
    fields = (config.score_chosen_field, config.score_rejected_field)
    return config.require_scores or all(kinds.get(f) not in (None, "null") for f in fields)


def read_pair_row(
    fmt: Format, row: Mapping, config: DataConfig, has_scores: bool
) -> tuple[PairExample, tuple[float, float] | None]:
    """Normalize one row and read its scores (type checks only; ties are the pipeline's call)."""
    example = fmt.normalize(row, config)
    if not has_scores:
        return example, None
    required = config.require_scores
    return example, (
        read_score(row, config.score_chosen_field, required),
        read_score(row, config.score_rejected_field, required),
    )


# ---- pair formats -------------------------------------------------------------------------------


def _detect_text(kinds: Mapping[str, str], config: DataConfig) -> bool:
    fields = (config.prompt_field, config.chosen_field, config.rejected_field)
    return all(kinds.get(f) == "text" for f in fields)


def _normalize_text(row: Mapping, config: DataConfig) -> PairExample:
    return PairExample(
        kind="text",
        prompt=read_text(row, config.prompt_field),
        chosen=read_text(row, config.chosen_field, completion=True),
        rejected=read_text(row, config.rejected_field, completion=True),
    )


def _detect_implicit(kinds: Mapping[str, str], config: DataConfig) -> bool:
    pair = kinds.get(config.chosen_field) == kinds.get(config.rejected_field) == "text"
    return pair and config.prompt_field not in kinds


def _normalize_implicit(row: Mapping, config: DataConfig) -> PairExample:
    """Anthropic HH: the prompt is the shared text up to and including the last marker in it."""
    chosen = read_text(row, config.chosen_field, completion=True)
    rejected = read_text(row, config.rejected_field, completion=True)
    marker = config.implicit_prompt_marker
    shared = os.path.commonprefix([chosen, rejected])
    cut = shared.rfind(marker)
    if cut < 0:
        raise InvalidRow(
            f"{config.chosen_field!r} and {config.rejected_field!r} share no prefix ending in "
            f"{marker!r}; add a {config.prompt_field!r} field or set implicit_prompt_marker"
        )
    end = cut + len(marker)
    example = PairExample("text", chosen[:end], chosen[end:], rejected[end:])
    for field, text in (
        (config.chosen_field, example.chosen),
        (config.rejected_field, example.rejected),
    ):
        if not text.strip():
            raise InvalidRow(f"empty completion in field {field!r} after the prompt")
    return example


def _detect_chat(kinds: Mapping[str, str], config: DataConfig) -> bool:
    pair = kinds.get(config.chosen_field) == kinds.get(config.rejected_field) == "messages"
    return pair and kinds.get(config.prompt_field) in (None, "null", "text", "messages")


def _normalize_chat(row: Mapping, config: DataConfig) -> PairExample:
    chosen = read_messages(row, config.chosen_field)
    rejected = read_messages(row, config.rejected_field)
    prompt = row.get(config.prompt_field)
    if isinstance(prompt, list):
        prompt = read_messages(row, config.prompt_field)
    elif prompt is not None and not isinstance(prompt, str):
        raise InvalidRow(
            f"field {config.prompt_field!r} must be a string or a message list, "
            f"got {type(prompt).__name__}"
        )
    elif prompt is not None:
        check_unicode(prompt, config.prompt_field)
    given = {config.chosen_field: chosen, config.rejected_field: rejected}
    prompt, chosen, rejected = split_conversation(prompt, chosen, rejected)
    for field, messages in ((config.chosen_field, chosen), (config.rejected_field, rejected)):
        if not messages or any(not m["content"].strip() for m in messages):
            raise InvalidRow(f"empty completion in field {field!r}")
        check_completion_turns(messages, given[field], field)
    return PairExample("chat", prompt, chosen, rejected)


def split_conversation(
    prompt: str | Messages | None, chosen: Messages, rejected: Messages
) -> tuple[Messages, Messages, Messages]:
    """Return (prompt messages, chosen completion turns, rejected completion turns).

    - ``prompt`` a message list: each of chosen/rejected either repeats it (a full conversation) or
      holds only the completion turns.
    - otherwise (absent, or a string as in UltraFeedback-binarized, whose chosen/rejected are full
      conversations): the shared message prefix is the prompt; with no shared prefix a string prompt
      becomes one user turn.
    """
    if isinstance(prompt, list):
        n = len(prompt)
        return prompt, *(side[n:] if side[:n] == prompt else side for side in (chosen, rejected))
    # Leave at least one completion turn on each side (identical conversations split at the end).
    n = min(_common_prefix_length(chosen, rejected), len(chosen) - 1, len(rejected) - 1)
    if n > 0:
        return chosen[:n], chosen[n:], rejected[n:]
    if isinstance(prompt, str) and prompt.strip():
        return [{"role": "user", "content": prompt}], chosen, rejected
    raise InvalidRow("chosen and rejected share no prompt turns and there is no prompt field")


def _common_prefix_length(a: list, b: list) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


CHAT = register_format(
    Format(
        name="conversational",
        task="pairs",
        kind="chat",
        description="chosen/rejected message lists [{'role', 'content'}, ...], with or without a "
        "prompt (message list or string); a shared message prefix is the prompt",
        detect=_detect_chat,
        normalize=_normalize_chat,
    )
)
TEXT = register_format(
    Format(
        name="prompt_chosen_rejected",
        task="pairs",
        kind="text",
        description="prompt/chosen/rejected strings",
        detect=_detect_text,
        normalize=_normalize_text,
    )
)
IMPLICIT = register_format(
    Format(
        name="implicit_prompt",
        task="pairs",
        kind="text",
        description="chosen/rejected full texts sharing a prompt that ends with the "
        "implicit_prompt_marker (Anthropic HH: '\\n\\nAssistant:')",
        detect=_detect_implicit,
        normalize=_normalize_implicit,
    )
)
