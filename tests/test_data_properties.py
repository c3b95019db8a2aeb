"""Property tests of the data loader on random, partly malformed JSON-lines files.

Each file mixes valid rows with bad lines (broken JSON, non-objects, wrong types, missing keys,
empty strings, lone surrogates, rows of another format, two objects on one line, NaN) and blank
lines, in random order. The properties:

- a file with a bad line raises exactly a dpokit ``DataError`` naming the file and one of the bad
  lines (never a traceback from inside Arrow or the tokenizer);
- a file without one loads, and its summary counts what went in: rows read and kept, identical
  pairs, truncated prompts and completions.

Valid rows outnumber bad ones, so the format is always told from the valid rows (a file of mostly
bad rows fails earlier, naming the file: tests/test_data_errors.py). Normal strings have at most
10 characters (<= 40 byte-level tokens) and "huge" ones >= 300 characters of multi-byte letters no
BPE merge joins (>= 300 tokens), so truncation under max_prompt_length=48 / max_length=128 is
known without tokenizing.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from dpokit.data import DataConfig, DataError, prepare_pairs

TEXT_SETTINGS = DataConfig(max_length=128, max_prompt_length=48)
CHAT_SETTINGS = DataConfig(max_length=512, max_prompt_length=256)
HUGE_ALPHABET = "ßðþæøåéüñçλπΩжщ"  # 2-byte letters, not in the tiny tokenizer's merges
PROPERTY_SETTINGS = settings(
    max_examples=int(os.environ.get("DPOKIT_PROPERTY_EXAMPLES", 60)),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

any_char = st.characters(blacklist_categories=("Cs",))  # every code point but lone surrogates
short = st.text(any_char, min_size=1, max_size=10)
short_nonblank = short.filter(lambda s: s.strip())
huge = st.text(st.sampled_from(HUGE_ALPHABET), min_size=300, max_size=3000)


@dataclass
class Line:
    text: str
    bad: bool = False
    row: dict | None = None  # a valid row: what the summary must count
    huge_prompt: bool = False
    huge_completions: int = 0


@dataclass
class Expected:
    lines: list[Line] = field(default_factory=list)

    @property
    def valid(self) -> list[Line]:
        return [line for line in self.lines if line.row is not None]

    @property
    def bad_line_numbers(self) -> set[int]:
        return {n for n, line in enumerate(self.lines, 1) if line.bad}


# ---- valid rows ---------------------------------------------------------------------------------

extra_value = st.one_of(
    st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none()
)


@st.composite
def text_rows(draw) -> Line:
    """prompt/chosen/rejected strings, sometimes huge, sometimes identical, sometimes with an
    unused extra column whose type changes from row to row."""
    prompt = draw(st.one_of(short, huge))
    chosen = draw(st.one_of(short_nonblank, huge))
    rejected = draw(st.one_of(st.just(chosen), short_nonblank, huge))
    row = {"prompt": prompt, "chosen": chosen, "rejected": rejected}
    if draw(st.booleans()):
        row["meta"] = draw(extra_value)
    huge_completions = sum(len(text) >= 300 for text in (chosen, rejected))
    return Line(
        json.dumps(row), row=row, huge_prompt=len(prompt) >= 300, huge_completions=huge_completions
    )


def messages(user: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]


@st.composite
def chat_rows(draw) -> Line:
    user = draw(short)
    chosen = draw(short_nonblank)
    rejected = draw(st.one_of(st.just(chosen), short_nonblank))
    row = {"chosen": messages(user, chosen), "rejected": messages(user, rejected)}
    return Line(json.dumps(row), row=row)


# ---- bad lines ----------------------------------------------------------------------------------

wrong_value = st.one_of(
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.booleans(),
    st.lists(st.integers(), min_size=1, max_size=3),
    st.dictionaries(st.text(max_size=3), st.integers(), min_size=1, max_size=2),
    st.none(),
)
blank_text = st.sampled_from(["", " ", "\t", "\n", "\u3000", " \u2003 "])


def text_row(prompt="Q?", chosen=" yes", rejected=" no") -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


@st.composite
def common_bad_lines(draw, valid: st.SearchStrategy[Line]) -> Line:
    """Bad in any format: broken or non-object JSON, two objects on a line, NaN, surrogates."""
    row = json.loads(draw(valid).text)
    kind = draw(st.sampled_from(["truncated", "non_object", "two_objects", "nan", "surrogate"]))
    if kind == "truncated":
        text = json.dumps(row)
        text = text[: draw(st.integers(1, len(text) - 1))].rstrip("\n")
    elif kind == "non_object":
        value = draw(st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers())))
        text = json.dumps(value)
    elif kind == "two_objects":
        text = json.dumps(row) + json.dumps(row)
    elif kind == "nan":
        key = draw(st.sampled_from(sorted(set(row) - {"meta"})))
        text = json.dumps({**row, key: math.nan})  # Python writes NaN; JSON has no NaN
    else:
        key = draw(st.sampled_from(sorted(set(row) - {"meta"})))
        lone = draw(st.sampled_from(["\ud800", "\udc80", "\udfff"]))
        value = row[key]
        if isinstance(value, list):
            value = [dict(m, content=m["content"] + lone) for m in value]
        else:
            value = value + lone
        text = json.dumps({**row, key: value})  # ASCII escapes: "\\ud800" on the line
    return Line(text, bad=True)


@st.composite
def text_bad_lines(draw) -> Line:
    kind = draw(st.sampled_from(["common", "wrong_type", "missing", "empty", "chat_row"]))
    if kind == "common":
        return draw(common_bad_lines(text_rows()))
    row = text_row()
    key = draw(st.sampled_from(["prompt", "chosen", "rejected"]))
    if kind == "wrong_type":
        row[key] = draw(wrong_value)
    elif kind == "missing":
        del row[key]
    elif kind == "empty":
        row[key] = "" if key == "prompt" else draw(blank_text)  # no prompt token / no completion
    else:
        row = {"chosen": messages("hi", "a"), "rejected": messages("hi", "b")}
    return Line(json.dumps(row), bad=True)


@st.composite
def chat_bad_lines(draw) -> Line:
    kind = draw(st.sampled_from(["common", "text_row", "bad_message", "empty", "no_prompt"]))
    if kind == "common":
        return draw(common_bad_lines(chat_rows()))
    if kind == "text_row":
        row = text_row()
    elif kind == "bad_message":
        message = draw(
            st.sampled_from(
                [{"role": "assistant"}, {"role": 1, "content": "a"}, {"content": "a"}, "a", 3]
            )
        )
        row = {"chosen": [messages("hi", "a")[0], message], "rejected": messages("hi", "b")}
    elif kind == "empty":
        row = {"chosen": messages("hi", draw(blank_text)), "rejected": messages("hi", "b")}
    else:  # no shared turn and no prompt field: nothing is the prompt
        row = {
            "chosen": [{"role": "assistant", "content": "a"}],
            "rejected": [{"role": "assistant", "content": "b"}],
        }
    return Line(json.dumps(row), bad=True)


# ---- files --------------------------------------------------------------------------------------

blank_lines = st.builds(Line, st.sampled_from(["", "   ", "\t"]))


@st.composite
def files(draw, valid, bad) -> Expected:
    n_good = draw(st.integers(1, 7))
    n_bad = draw(st.integers(0, n_good - 1))  # fewer than the valid rows (see the docstring)
    good = draw(st.lists(valid, min_size=n_good, max_size=n_good))
    wrong = draw(st.lists(bad, min_size=n_bad, max_size=n_bad))
    blanks = draw(st.lists(blank_lines, max_size=2))
    return Expected(draw(st.permutations(good + wrong + blanks)))


def load(expected: Expected, tokenizer, config: DataConfig):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "rows.jsonl"
        path.write_text("".join(line.text + "\n" for line in expected.lines), encoding="utf-8")
        try:
            return str(path), prepare_pairs(str(path), tokenizer, config), None
        except Exception as error:  # noqa: BLE001 - the property is about what is raised
            return str(path), None, error


def check(expected: Expected, path: str, prepared, error) -> None:
    event("bad line" if expected.bad_line_numbers else "all rows valid")
    if expected.bad_line_numbers:
        assert type(error) is DataError, repr(error)
        assert error.source == path and error.row_kind == "line", str(error)
        assert error.row in expected.bad_line_numbers, (str(error), expected.bad_line_numbers)
        assert str(error).startswith(f"{path}, line {error.row}: ")
        return
    assert error is None, repr(error)
    summary, valid = prepared.summary, expected.valid
    assert summary.rows_read == summary.rows_kept == len(valid) == len(prepared.dataset)
    assert summary.dropped == {}
    assert summary.identical_pairs == sum(v.row["chosen"] == v.row["rejected"] for v in valid)
    assert summary.truncated_prompts == sum(v.huge_prompt for v in valid)
    assert summary.truncated_completions == sum(v.huge_completions for v in valid)


@PROPERTY_SETTINGS
@given(expected=files(text_rows(), text_bad_lines()))
def test_text_rows_load_or_fail_naming_a_bad_line(expected, tiny_tokenizer):
    check(expected, *load(expected, tiny_tokenizer, TEXT_SETTINGS))


@settings(PROPERTY_SETTINGS, max_examples=max(PROPERTY_SETTINGS.max_examples * 2 // 3, 1))
@given(expected=files(chat_rows(), chat_bad_lines()))
def test_conversational_rows_load_or_fail_naming_a_bad_line(expected, tiny_tokenizer):
    check(expected, *load(expected, tiny_tokenizer, CHAT_SETTINGS))


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ('{"prompt": "Q\\ud800", "chosen": " a", "rejected": " b"}', "field 'prompt' is not valid"),
        (json.dumps(text_row()) + json.dumps(text_row()), "invalid JSON .*Extra data"),
    ],
)
def test_arrow_leniencies_are_caught_at_their_line(line, message, tiny_tokenizer, tmp_path):
    """What the property tests found: Arrow rejects a lone surrogate without saying where, and
    reads two objects on one line as two rows (the summary then miscounts the file)."""
    path = tmp_path / "rows.jsonl"
    path.write_text(json.dumps(text_row()) + "\n" + line + "\n")
    with pytest.raises(DataError, match=rf"rows.jsonl, line 2: {message}"):
        prepare_pairs(str(path), tiny_tokenizer, TEXT_SETTINGS)


def test_a_byte_order_mark_is_not_part_of_the_first_row(tiny_tokenizer, tmp_path):
    path = tmp_path / "rows.jsonl"
    rows = [json.dumps(text_row(prompt=f"Q{i}?")) for i in range(3)]
    path.write_text("\ufeff" + "\n".join(rows) + "\n" + '{"prompt": 1}\n', encoding="utf-8")
    with pytest.raises(DataError, match=r"line 4: field 'prompt' must be a string"):
        prepare_pairs(str(path), tiny_tokenizer, TEXT_SETTINGS)


def test_numeric_looking_strings_in_a_mixed_column_stay_strings(tiny_tokenizer, tmp_path):
    """datasets decodes every string of a column whose type changes as JSON ("0" -> 0): the
    error must still name the chat row, not the valid rows holding "0"."""
    rows = [text_row(chosen="0", rejected="1"), text_row(chosen="true", rejected="[1]")]
    rows.append({"chosen": messages("hi", "a"), "rejected": messages("hi", "b")})
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    with pytest.raises(DataError, match=r"line 3: missing field 'prompt'"):
        prepare_pairs(str(path), tiny_tokenizer, TEXT_SETTINGS)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows[:2]))
    prepared = prepare_pairs(str(path), tiny_tokenizer, TEXT_SETTINGS)
    assert prepared.summary.rows_kept == 2
