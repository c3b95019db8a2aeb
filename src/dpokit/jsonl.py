"""JSON lines: the one reader and writer of every JSONL file dpokit writes and reads back.

SPIN generations and pairs, SLiC reference samples, stepwise chunk data, metrics logs: each holds
text a model generated, and must read back as exactly the strings that were written.

Writing: UTF-8 with non-ASCII characters kept (readable files), except the few that would not
survive another reader, which are written as JSON escapes (``\\uXXXX``) and read back as the same
characters:

- U+0085, U+2028 and U+2029: ``str.splitlines()`` (and some editors) take them for line ends. The
  other characters ``splitlines()`` splits on ("\\r", "\\x0b", "\\x0c", "\\x1c"-"\\x1e") are
  control characters, which JSON always escapes.
- lone surrogates (U+D800-U+DFFF, e.g. ``os.fsdecode`` of undecodable bytes): UTF-8 cannot hold
  them. Escaped, any ``str`` round-trips -- except a high surrogate directly followed by a low
  one, which JSON reads back as the one character the pair encodes (as ``json.dumps`` does with
  its default ``ensure_ascii``).

Reading: the file's bytes are split on "\\n" only, each line decoded as strict UTF-8 and parsed;
blank lines are skipped. A line that is not UTF-8 or not JSON raises :class:`JsonlError` naming
the file and the line. This module imports nothing from dpokit: every layer may use it.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

# Characters json.dumps(ensure_ascii=False) leaves raw that must not be raw in a JSON line.
_UNSAFE = re.compile("[\u0085\u2028\u2029\ud800-\udfff]")


class JsonlError(ValueError):
    """A JSON-lines file that cannot be read back: the message names the file and the line."""


def dumps_line(record: Any, default: Callable[[Any], Any] | None = None) -> str:
    """``record`` as one JSON line, "\\n" included: non-ASCII kept, line separators and lone
    surrogates escaped (see the module docstring). ``default`` converts values JSON cannot hold
    (as in ``json.dumps``); without it they raise ``TypeError``."""
    text = json.dumps(record, ensure_ascii=False, default=default)
    return _UNSAFE.sub(lambda m: f"\\u{ord(m.group()):04x}", text) + "\n"


def dumps(records: Iterable[Any], default: Callable[[Any], Any] | None = None) -> str:
    """The JSON lines of ``records`` (:func:`dumps_line` each), as one string."""
    return "".join(dumps_line(record, default) for record in records)


def encode(records: Iterable[Any]) -> bytes:
    """The UTF-8 bytes of :func:`dumps` (never fails on a lone surrogate: it is escaped)."""
    return dumps(records).encode("utf-8")


def _decode(raw: bytes, name: str, number: int, strict: bool = True) -> str:
    try:
        return raw.decode("utf-8", "strict" if strict else "replace")
    except UnicodeDecodeError as error:
        raise JsonlError(
            f"{name}, line {number}: not UTF-8 (byte {raw[error.start]:#04x} at byte "
            f"{error.start + 1} of the line)"
        ) from None


def iter_lines(
    data: bytes, name: str = "<bytes>", strict: bool = True
) -> Iterator[tuple[int, str]]:
    """(1-based line number, text) of each line of ``data``, split on b"\\n" only.

    Raises :class:`JsonlError` naming ``name`` and the line for bytes that are not UTF-8; with
    ``strict=False`` they are decoded as U+FFFD instead (for a log whose broken lines are
    skipped anyway).
    """
    for number, raw in enumerate(data.split(b"\n"), 1):
        yield number, _decode(raw, name, number, strict)


def parse(data: bytes, name: str = "<bytes>", partial_tail: bool = False) -> list[Any]:
    """The records of the JSON-lines bytes ``data`` (blank lines skipped).

    ``partial_tail``: drop a last line that is not UTF-8 JSON and has no "\\n" after it (the
    half record a killed writer of an append-only log leaves). Raises :class:`JsonlError` naming
    ``name`` and the line for any other line that is not UTF-8 JSON.
    """
    lines = data.split(b"\n")
    tail = len(lines) if partial_tail and not data.endswith(b"\n") else None
    records = []
    for number, raw in enumerate(lines, 1):
        if not raw.strip():
            continue
        try:
            records.append(json.loads(_decode(raw, name, number)))
        except JsonlError:
            if number != tail:
                raise
        except json.JSONDecodeError as error:
            if number != tail:
                raise JsonlError(f"{name}, line {number}: invalid JSON ({error.msg})") from None
    return records


def read(path: str | Path, partial_tail: bool = False) -> list[Any]:
    """The records of the JSON-lines file ``path`` (see :func:`parse`).

    Raises ``OSError`` when it cannot be read, :class:`JsonlError` for a bad line.
    """
    return parse(Path(path).read_bytes(), str(path), partial_tail)
