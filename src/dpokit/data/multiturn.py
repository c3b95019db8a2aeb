"""Multi-turn session pairs for segment-level DPO (SDPO): source -> tokens + segment masks.

A row holds two sessions, ``chosen`` and ``rejected`` (message lists), that share their history up
to the first assistant turn where they differ, e, and run to the same segment end k. Segment DPO is
DPO whose log-probs sum only the ASSISTANT tokens of turns e..k; the shared history and the other
party's turns inside the segment are context. Accepted layout (``task="multiturn_pairs"``):

- ``chosen``, ``rejected``: message lists ``[{"role", "content"}, ...]``, each a whole session;
- optional ``prompt``: a message list prepended to both sessions (unless they already start with
  it); turn indices count from the start of the full session;
- optional ``segment_start``, ``segment_end``: 0-based turn indices, both INCLUSIVE ([e, k] as in
  the paper). The default start is the first turn where the sessions differ, which must be an
  assistant turn; the default end is each session's last turn, and then both sessions must have
  the same number of turns from the start. Turns after the end are dropped (a causal model's
  segment log-probs cannot depend on them).

Tokens: every session is rendered through the chat template one turn at a time; each rendering of
the first j+1 turns must extend the rendering of the first j (a template that rewrites earlier turns
cannot be cut into turns). For an assistant turn, the text the template puts before its content
(``add_generation_prompt=True``, e.g. ``<|assistant|>\\n``) is context, the content through its EOS
is labelled, and whitespace after that EOS is context again (generation stops at EOS). Each text
piece is tokenized separately, as prompt and completion are for pairs.

Output rows use the pair layout (``prompt_input_ids`` = the shared history, ``chosen_input_ids`` /
``rejected_input_ids`` = the rest of each session) plus ``chosen_completion_mask`` /
``rejected_completion_mask``: True exactly on the labelled tokens. :class:`SegmentCollator` makes
the same batch as :class:`~dpokit.data.PairCollator` with that (non-contiguous) mask, so the
pairwise step, the scorer and pre-computed reference log-probs work unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from datasets import Features, List, Value

from dpokit.hashing import derive_fingerprint

from .collate import PairCollator
from .config import DataConfig
from .errors import InvalidRow
from .formats import Format, read_messages, register_format
from .loading import RowLocator, load_source
from .pipeline import PreparedData, RowGuard, pairs_fingerprint, tokenize_rows
from .rows import cache_path, dataset_column_kinds, detect_source_format, kept_rows, source_rows
from .summary import (
    COMPLETIONS_TRUNCATED,
    DROP_REASON,
    IDENTICAL,
    IDENTICAL_AFTER_TRUNCATION,
    IDENTICAL_AFTER_TRUNCATION_REASON,
    IDENTICAL_REASON,
    PROMPT_TRUNCATED,
)
from .tokenization import PairEncoder

START_FIELD = "segment_start"
END_FIELD = "segment_end"
SEGMENTS_VERSION = 1  # bump when the output for the same input changes
SIDES = ("chosen", "rejected")


@dataclass
class SessionPair:
    """Two sessions cut at the segment end, and the segment's first turn ``start`` (None for
    identical sessions without an explicit start: they have no segment)."""

    chosen: list[dict]
    rejected: list[dict]
    start: int | None

    @property
    def identical(self) -> bool:
        """Chosen and rejected sessions are the same."""
        return self.chosen == self.rejected


@dataclass
class EncodedSegmentPair:
    """Token ids of one session pair; masks are True on the segment's assistant tokens."""

    prompt_input_ids: list[int]
    chosen_input_ids: list[int]
    chosen_completion_mask: list[bool]
    rejected_input_ids: list[int]
    rejected_completion_mask: list[bool]
    prompt_truncated: bool = False
    completions_truncated: int = 0


# ---- the format ---------------------------------------------------------------------------------


def _detect(kinds: Mapping[str, str], config: DataConfig) -> bool:
    sessions = kinds.get(config.chosen_field) == kinds.get(config.rejected_field) == "messages"
    indices = all(kinds.get(f) in (None, "null", "number") for f in (START_FIELD, END_FIELD))
    prompt = kinds.get(config.prompt_field) in (None, "null", "messages")
    return sessions and indices and prompt


def _normalize(row: Mapping, config: DataConfig) -> SessionPair:
    chosen = read_messages(row, config.chosen_field)
    rejected = read_messages(row, config.rejected_field)
    if row.get(config.prompt_field) is not None:
        prompt = read_messages(row, config.prompt_field)
        chosen, rejected = (
            s if s[: len(prompt)] == prompt else prompt + s for s in (chosen, rejected)
        )
    return segment_of(chosen, rejected, _turn(row, START_FIELD), _turn(row, END_FIELD))


def _turn(row: Mapping, field: str) -> int | None:
    value = row.get(field)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value != int(value):
        raise InvalidRow(f"field {field!r} must be a whole turn index, got {value!r}")
    if value < 0:
        raise InvalidRow(f"field {field!r} must be >= 0, got {value!r}")
    return int(value)


def segment_of(
    chosen: list[dict], rejected: list[dict], start: int | None = None, end: int | None = None
) -> SessionPair:
    """Check two sessions against the segment rules and cut them at the segment end.

    Raises `InvalidRow` saying which rule the row breaks (see the module docstring).
    """
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if start is None:
        if chosen == rejected:
            return SessionPair(chosen, rejected, None)  # no segment: the caller decides
        start = shared
        if shared == 0:
            raise InvalidRow(
                "chosen and rejected share no turns: segment DPO needs a shared history"
            )
        roles = {side[start]["role"] for side in (chosen, rejected) if start < len(side)}
        if roles != {"assistant"}:
            raise InvalidRow(
                f"the sessions first differ at turn {start}, which is not an assistant turn in "
                f"both ({', '.join(sorted(roles)) or 'missing'}): the shared history must run up "
                f"to the first differing assistant turn, or give {START_FIELD!r}"
            )
    elif start >= min(len(chosen), len(rejected)):
        raise InvalidRow(
            f"{START_FIELD}={start} is past the end of the sessions ({len(chosen)} chosen and "
            f"{len(rejected)} rejected turns)"
        )
    elif start > shared:
        raise InvalidRow(
            f"{START_FIELD}={start} but the sessions already differ at turn {shared}: the turns "
            "before the segment must be the same in both"
        )
    elif start == 0:
        raise InvalidRow(f"{START_FIELD}=0 leaves no shared history before the segment")
    if end is None:
        if len(chosen) != len(rejected):
            raise InvalidRow(
                f"the segments differ in turn count: from turn {start} to the end chosen has "
                f"{len(chosen) - start} turns and rejected {len(rejected) - start}; give "
                f"{END_FIELD!r} or make the sessions end at the same turn"
            )
        end = len(chosen) - 1
    if end < start or end >= min(len(chosen), len(rejected)):
        raise InvalidRow(
            f"segment [{start}, {end}] (inclusive turn indices) does not fit sessions of "
            f"{len(chosen)} (chosen) and {len(rejected)} (rejected) turns"
        )
    chosen, rejected = chosen[: end + 1], rejected[: end + 1]
    for name, session in zip(SIDES, (chosen, rejected), strict=True):
        if not any(m["role"] == "assistant" for m in session[start:]):
            raise InvalidRow(f"the {name} segment [{start}, {end}] has no assistant turn")
        if any(not m["content"].strip() for m in session[start:] if m["role"] == "assistant"):
            raise InvalidRow(f"the {name} segment has an empty assistant turn")
    return SessionPair(chosen, rejected, start)


SESSIONS = register_format(
    Format(
        name="multiturn_sessions",
        task="multiturn_pairs",
        kind="chat",
        description="chosen/rejected message lists sharing their first turns, optional "
        f"{START_FIELD}/{END_FIELD} (0-based inclusive turn indices) and prompt (messages)",
        detect=_detect,
        normalize=_normalize,
    )
)


# ---- tokens -------------------------------------------------------------------------------------


class SessionEncoder:
    """Turns a `SessionPair` into an `EncodedSegmentPair` through the chat template."""

    def __init__(self, tokenizer, config: DataConfig) -> None:
        self.pairs = PairEncoder(tokenizer, config)  # BOS/EOS rules, truncation, template
        self.config = config
        self.eos_text = tokenizer.eos_token

    def encode(self, pair: SessionPair) -> EncodedSegmentPair:
        """Token ids and masks; raises `InvalidRow` on a template that cannot be cut into turns
        and, with ``truncation="error"``, on over-long sessions."""
        sides = [self.pieces(session, pair.start) for session in (pair.chosen, pair.rejected)]
        (prompt_c, rest_c), (prompt_r, rest_r) = sides
        if prompt_c != prompt_r:  # same turns, same template: cannot differ unless it is unstable
            raise InvalidRow("the chat template renders the shared turns differently per session")
        prompt, prompt_cut = self.pairs.truncate_prompt(self.pairs.with_bos(prompt_c))
        if not prompt:
            raise InvalidRow("the shared history encodes to no tokens")
        out, cuts = [], 0
        for name, (ids, mask) in zip(SIDES, (rest_c, rest_r), strict=True):
            ids, cut = self.pairs.truncate_completion(name, len(prompt), ids)
            out += [ids, mask[: len(ids)]]
            cuts += cut
        return EncodedSegmentPair(
            prompt, *out, prompt_truncated=prompt_cut, completions_truncated=cuts
        )

    def pieces(self, session: list[dict], start: int) -> tuple[list[int], tuple[list, list]]:
        """(shared-history ids, (ids, mask) of the rest) of one session, segment from ``start``."""
        texts = self.texts(session, start)
        ids = self.pairs.tokenize([text for text, _, _ in texts])
        prompt, rest, mask = [], [], []
        for piece, (_, shared, label) in zip(ids, texts, strict=True):
            if shared:
                prompt += piece
            else:
                rest += piece
                mask += [label] * len(piece)
        eos = self.pairs.eos_id
        if session[-1]["role"] == "assistant" and rest[-1:] != [eos]:
            rest, mask = rest + [eos], mask + [True]  # a completion ends with EOS, as for pairs
        return prompt, (rest, mask)

    def texts(self, session: list[dict], start: int) -> list[tuple[str, bool, bool]]:
        """(text, shared history?, labelled?) pieces whose concatenation is the rendered session.

        Shared: the turns before ``start`` and the template's opening of turn ``start``.
        Labelled: an assistant turn's content through its EOS, for turns ``start`` and later.
        """
        pieces, previous = [], ""
        for j, message in enumerate(session):
            full = self._render(session[: j + 1], False)
            if message["role"] == "assistant" and j > 0:
                opening = self._render(session[:j], True)
                self._check_extends(previous, opening, j)
                self._check_extends(opening, full, j)
                body, after = self._split_after_eos(full[len(opening) :])
                pieces.append((opening[len(previous) :], j <= start, False))
                pieces.append((body, j < start, j >= start))
                if j < len(session) - 1:  # generation stops at EOS: nothing follows the last turn
                    pieces.append((after, j < start, False))
            else:
                self._check_extends(previous, full, j)
                pieces.append((full[len(previous) :], j < start, False))
            previous = full
        return [piece for piece in pieces if piece[0]]

    def _render(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.pairs.tokenizer.apply_chat_template(
            messages,
            chat_template=self.pairs.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    @staticmethod
    def _check_extends(before: str, after: str, turn: int) -> None:
        if not after.startswith(before):
            raise InvalidRow(
                f"the chat template's rendering of turns 0..{turn} does not extend its rendering "
                "of the turns before, so the session cannot be cut into turns; use a template "
                "that renders conversations incrementally (--chat-template FILE)"
            )

    def _split_after_eos(self, text: str) -> tuple[str, str]:
        """(content through the last EOS, whitespace after it) of an assistant turn's text."""
        if self.eos_text:
            cut = text.rfind(self.eos_text)
            if cut >= 0 and not text[cut + len(self.eos_text) :].strip():
                cut += len(self.eos_text)
                return text[:cut], text[cut:]
        return text, ""


# ---- the pipeline -------------------------------------------------------------------------------


def prepare_segments(
    source, tokenizer, config: DataConfig | None = None, split: str | None = None
) -> PreparedData:
    """Load, validate and tokenize session pairs once (cached for file-backed sources).

    Returns a `PreparedData` with ``prompt_input_ids``, ``chosen_input_ids``,
    ``chosen_completion_mask``, ``rejected_input_ids``, ``rejected_completion_mask`` and
    ``index``. Raises `DataError` naming the source and line/row for bad input.
    """
    config = config or DataConfig()
    src = load_source(source, config, split)
    dataset = source_rows(src)
    fmt = detect_source_format(
        dataset_column_kinds(dataset), config, src.name, task="multiturn_pairs"
    )
    encoder = SessionEncoder(tokenizer, config)
    encoder.pairs.require_chat_template(src.name)
    fingerprint = derive_fingerprint(
        pairs_fingerprint(src.fingerprint, fmt.name, tokenizer, encoder.pairs, config),
        f"segments-v{SEGMENTS_VERSION}",
    )
    cache_file = cache_path(src, config, fingerprint)
    if cache_file is not None:
        cache_file = cache_file.replace("pairs-", "segments-")
    mapped, summary, from_cache = tokenize_rows(
        dataset,
        SegmentRowProcessor(fmt, encoder, config, src.name, src.locator),
        _features(),
        src.name,
        fmt.name,
        config,
        fingerprint,
        cache_file,
        "dpokit: tokenizing session pairs",
    )
    kept = kept_rows(mapped, fingerprint)
    return PreparedData(kept, summary, fingerprint, False, cache_file, from_cache)


COLUMNS = (
    "prompt_input_ids",
    "chosen_input_ids",
    "chosen_completion_mask",
    "rejected_input_ids",
    "rejected_completion_mask",
)


class SegmentRowProcessor(RowGuard):
    """``Dataset.map`` function: raw rows -> ids, segment masks and the summary's status columns."""

    def __init__(
        self,
        fmt: Format,
        encoder: SessionEncoder,
        config: DataConfig,
        source_name: str,
        locator: RowLocator,
    ):
        self.fmt = fmt
        self.encoder = encoder
        self.config = config
        self.source_name = source_name
        self.locator = locator

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        out = {column: [] for column in COLUMNS}
        out.update(
            {PROMPT_TRUNCATED: [], COMPLETIONS_TRUNCATED: [], DROP_REASON: [], IDENTICAL: []}
        )
        out[IDENTICAL_AFTER_TRUNCATION] = []
        for i, index in enumerate(indices):
            row = {column: values[i] for column, values in batch.items()}
            encoded, reason, identical, after_truncation = self._guard(index, self._encode, row)
            for column in COLUMNS:  # a dropped row keeps no ids, but its truncation counts
                out[column].append(getattr(encoded, column) if encoded and not reason else [])
            out[PROMPT_TRUNCATED].append(bool(encoded and encoded.prompt_truncated))
            out[COMPLETIONS_TRUNCATED].append(encoded.completions_truncated if encoded else 0)
            out[DROP_REASON].append(reason)
            out[IDENTICAL].append(identical or after_truncation)
            out[IDENTICAL_AFTER_TRUNCATION].append(after_truncation)
        return out

    def _encode(self, row: dict) -> tuple[EncodedSegmentPair | None, str, bool, bool]:
        """(encoded pair or None, drop reason or "", identical sessions?, identical only after
        truncation?); a row with a drop reason is dropped."""
        pair = self.fmt.normalize(row, self.config)
        if pair.identical and self.config.identical_pairs == "drop":
            return None, IDENTICAL_REASON, True, False
        if pair.start is None:
            raise InvalidRow(
                "chosen and rejected are the same session: there is no differing segment "
                f"(identical_pairs='drop' drops such rows, or give {START_FIELD!r})"
            )
        encoded = self.encoder.encode(pair)
        for mask in (encoded.chosen_completion_mask, encoded.rejected_completion_mask):
            if not any(mask):
                return None, "segment truncated away", pair.identical, False
        after_truncation = not pair.identical and (
            (encoded.chosen_input_ids, encoded.chosen_completion_mask)
            == (encoded.rejected_input_ids, encoded.rejected_completion_mask)
        )
        if after_truncation and self.config.identical_pairs == "drop":
            return encoded, IDENTICAL_AFTER_TRUNCATION_REASON, False, True
        return encoded, "", pair.identical, after_truncation


def _features() -> Features:
    ids, mask = List(Value("int32")), List(Value("bool"))
    return Features(
        {
            "prompt_input_ids": ids,
            "chosen_input_ids": ids,
            "chosen_completion_mask": mask,
            "rejected_input_ids": ids,
            "rejected_completion_mask": mask,
            PROMPT_TRUNCATED: Value("bool"),
            COMPLETIONS_TRUNCATED: Value("int8"),
            DROP_REASON: Value("string"),
            IDENTICAL: Value("bool"),
            IDENTICAL_AFTER_TRUNCATION: Value("bool"),
        }
    )


# ---- collation ----------------------------------------------------------------------------------


class SegmentCollator:
    """Prepared session pairs -> :class:`~dpokit.data.PairCollator`'s batch, segment-masked.

    ``input_ids``/``attention_mask`` (2B, T): rows 0..B-1 shared history + chosen session, rows
    B..2B-1 shared history + rejected session. ``completion_mask`` (2B, T) bool is True exactly on
    the segment's assistant tokens (not contiguous: the partner's turns inside the segment are
    False). ``index`` (B,).
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        self.pairs = PairCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        batch = self.pairs(rows)
        completion_mask = batch["completion_mask"]  # (2B, T), contiguous so far
        completion_mask.zero_()
        for i, row in enumerate(rows):
            start = len(row["prompt_input_ids"])
            for offset, side in enumerate(SIDES):
                mask = torch.as_tensor(row[f"{side}_completion_mask"], dtype=torch.bool)
                completion_mask[i + offset * len(rows), start : start + len(mask)] = mask
        return batch
