"""Input that is validated, not guessed: roles of conversations, pairs that truncation makes
identical, KTO data with one label, bytes that are not UTF-8, hints that name the real key."""

from __future__ import annotations

import json

import datasets
import pytest

from dpokit.data import DataConfig, DataError, prepare_pairs
from dpokit.data.multiturn import prepare_segments
from dpokit.data.sft import prepare_sft
from dpokit.data.unpaired import prepare_unpaired

U = {"role": "user", "content": "Hello there!"}
A = {"role": "assistant", "content": "I am fine."}
B = {"role": "assistant", "content": "I am bad."}
GOOD_CHAT = {"chosen": [U, A], "rejected": [U, B]}
GOOD_TEXT = {"prompt": "Hello there!", "chosen": " I am fine.", "rejected": " I am bad."}


def jsonl(path, rows: list[dict]):
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture()
def config(tmp_path):
    return DataConfig(cache_dir=str(tmp_path / "cache"))


def error_at(prepare, path, line: int, tokenizer, config) -> str:
    """Run ``prepare`` on ``path``; it must raise a `DataError` at ``line``; its message."""
    with pytest.raises(DataError) as info:
        prepare(path, tokenizer, config)
    error = info.value
    assert (error.source, error.row, error.row_kind) == (str(path), line, "line")
    return str(error)


# ---- conversations: completion turns are assistant turns ----------------------------------------


def test_chosen_ending_in_a_user_turn_is_refused_with_its_line(tmp_path, tiny_tokenizer, config):
    # The row: [user, assistant, user] vs [user, assistant] used to train the trailing
    # user turn as part of the chosen answer.
    trailing = {"chosen": [U, A, U], "rejected": [U, B]}
    path = jsonl(tmp_path / "pairs.jsonl", [GOOD_CHAT, GOOD_CHAT, trailing])
    message = error_at(prepare_pairs, path, 3, tiny_tokenizer, config)
    assert message == (
        f"{path}, line 3: field 'chosen' message 2 is a 'user' turn in the completion "
        "(messages 1-2, after the prompt); completion turns must be assistant turns: the "
        "conversation must end with the assistant's answer"
    )


@pytest.mark.parametrize("role", ["user", "system", "tool", "function", "ipython", "developer"])
def test_every_non_assistant_role_in_a_completion_is_refused(
    tmp_path, tiny_tokenizer, config, role
):
    # Roles that differ only in the completion: rejected's answer is not an assistant turn.
    row = {"chosen": [U, A], "rejected": [U, {"role": role, "content": "x"}]}
    path = jsonl(tmp_path / "pairs.jsonl", [GOOD_CHAT, row])
    message = error_at(prepare_pairs, path, 2, tiny_tokenizer, config)
    assert f"field 'rejected' message 1 is a {role!r} turn in the completion" in message


def test_completion_turns_after_an_explicit_prompt_are_checked(tmp_path, tiny_tokenizer, config):
    row = {"prompt": [U], "chosen": [A, U], "rejected": [B]}  # completion-only lists
    path = jsonl(tmp_path / "pairs.jsonl", [row])
    message = error_at(prepare_pairs, path, 1, tiny_tokenizer, config)
    assert "field 'chosen' message 1 is a 'user' turn in the completion (messages 0-1" in message


@pytest.mark.parametrize("field, position", [("chosen", 0), ("chosen", 1), ("rejected", 1)])
def test_unknown_role_is_refused_wherever_it_is(tmp_path, tiny_tokenizer, config, field, position):
    row = {"chosen": [U, A], "rejected": [U, B]}
    row[field] = list(row[field])
    row[field][position] = {"role": "wizard", "content": "abracadabra"}
    path = jsonl(tmp_path / "pairs.jsonl", [GOOD_CHAT, GOOD_CHAT, GOOD_CHAT, row])
    message = error_at(prepare_pairs, path, 4, tiny_tokenizer, config)
    assert message == (
        f"{path}, line 4: field {field!r} message {position} has the unknown role 'wizard'; "
        "roles: system, developer, user, assistant, tool, function, ipython"
    )


def test_tool_turns_are_accepted_in_the_prompt(tmp_path, tiny_tokenizer, config):
    call = {"role": "assistant", "content": "call: weather(Paris)"}
    result = {"role": "tool", "content": "sunny"}
    history = [{"role": "system", "content": "Be brief."}, U, call, result]
    row = {"chosen": [*history, A], "rejected": [*history, B]}
    prepared = prepare_pairs([row], tiny_tokenizer, config)
    assert prepared.summary.rows_kept == 1
    # The prompt holds the tool result; the completion is the final assistant turn only.
    prompt = tiny_tokenizer.decode(prepared.dataset[0]["prompt_input_ids"])
    chosen = tiny_tokenizer.decode(prepared.dataset[0]["chosen_input_ids"])
    assert prompt.endswith("<|tool|>\nsunny</s>\n<|assistant|>\n")
    assert chosen == "I am fine.</s>"


def test_unpaired_conversation_ending_in_a_user_turn_is_refused(tmp_path, tiny_tokenizer, config):
    good = {"completion": [U, A], "label": True}
    bad = {"completion": [U, A, U], "label": False}  # its last turn was the "completion"
    path = jsonl(tmp_path / "kto.jsonl", [good, bad])
    message = error_at(prepare_unpaired, path, 2, tiny_tokenizer, config)
    assert "field 'completion' message 2 is a 'user' turn in the completion (message 2," in message


def test_sft_messages_ending_in_a_user_turn_are_refused(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "sft.jsonl", [{"messages": [U, A]}, {"messages": [U, A, U]}])
    message = error_at(prepare_sft, path, 2, tiny_tokenizer, config)
    assert "field 'messages' message 2 is a 'user' turn in the completion (messages 1-2" in message


def test_sessions_refuse_unknown_roles(tmp_path, tiny_tokenizer, config):
    wizard = {"role": "wizard", "content": "hm"}
    row = {"chosen": [U, A, wizard, A], "rejected": [U, B, wizard, B]}
    path = jsonl(tmp_path / "sessions.jsonl", [row])
    message = error_at(prepare_segments, path, 1, tiny_tokenizer, config)
    assert "field 'chosen' message 2 has the unknown role 'wizard'" in message


# ---- pairs that truncation makes identical ------------------------------------------------------


def shared_start_rows(tokenizer):
    """Rows whose completions share their first 4 tokens, differ after, and one identical row."""
    chosen, rejected = " good good good good yes", " good good good good no"
    c, r = (tokenizer(t, add_special_tokens=False)["input_ids"] for t in (chosen, rejected))
    assert c[:4] == r[:4] and c != r  # the premise, checked on the tokenizer itself
    rows = [
        {"prompt": "Hello there!", "chosen": chosen, "rejected": rejected},  # same after cut
        {"prompt": "Hello there!", "chosen": " yes", "rejected": " no"},  # differ at token 0
        {"prompt": "Hello there!", "chosen": " yes", "rejected": " yes"},  # identical text
    ]
    prompt = len(tokenizer("Hello there!", add_special_tokens=False)["input_ids"])
    return rows, prompt + 4  # max_length that keeps exactly the 4 shared completion tokens


@pytest.mark.parametrize("action", ["keep", "drop"])
def test_pairs_identical_after_truncation_are_counted_and_follow_identical_pairs(
    tmp_path, tiny_tokenizer, action
):
    rows, max_length = shared_start_rows(tiny_tokenizer)
    config = DataConfig(
        max_length=max_length,
        max_prompt_length=max_length - 4,
        identical_pairs=action,
        cache_dir=str(tmp_path / "cache"),
    )
    path = jsonl(tmp_path / "pairs.jsonl", rows)
    summary = prepare_pairs(path, tiny_tokenizer, config).summary
    assert (summary.identical_pairs, summary.identical_after_truncation) == (2, 1)
    assert summary.truncated_completions == 2  # both sides of row 0 (rows 1-2 fit)
    if action == "keep":
        assert (summary.rows_kept, summary.dropped) == (3, {})
    else:
        expected = {"identical pair": 1, "identical after truncation": 1}
        assert (summary.rows_kept, summary.dropped) == (1, expected)
    assert f"identical pairs 2 ({action}; 1 of them only after truncation)" in summary.format()


def test_without_truncation_those_pairs_are_not_identical(tmp_path, tiny_tokenizer):
    rows, _ = shared_start_rows(tiny_tokenizer)
    config = DataConfig(identical_pairs="drop", cache_dir=str(tmp_path / "cache"))
    summary = prepare_pairs(rows, tiny_tokenizer, config).summary
    assert (summary.identical_pairs, summary.identical_after_truncation) == (1, 0)
    assert summary.rows_kept == 2


def test_segments_identical_after_truncation_are_counted_and_dropped(tmp_path, tiny_tokenizer):
    long_a = {"role": "assistant", "content": "good good good good yes"}
    long_b = {"role": "assistant", "content": "good good good good no"}
    cut = {"chosen": [U, long_a], "rejected": [U, long_b]}  # the same first tokens
    other = {"chosen": [U, A], "rejected": [U, {"role": "assistant", "content": "No."}]}
    history = tiny_tokenizer.apply_chat_template([U], tokenize=False, add_generation_prompt=True)
    prompt = len(tiny_tokenizer(history, add_special_tokens=False)["input_ids"])
    keep = dict(max_length=prompt + 3, max_prompt_length=prompt, cache_dir=str(tmp_path / "c"))
    kept = prepare_segments([cut, other], tiny_tokenizer, DataConfig(**keep)).summary
    assert (kept.identical_pairs, kept.identical_after_truncation, kept.rows_kept) == (1, 1, 2)
    drop = DataConfig(**keep, identical_pairs="drop")
    dropped = prepare_segments([cut, other], tiny_tokenizer, drop).summary
    assert (dropped.rows_kept, dropped.dropped) == (1, {"identical after truncation": 1})
    assert dropped.truncated_completions == kept.truncated_completions >= 2


# ---- KTO with one label -------------------------------------------------------------------------


@pytest.mark.parametrize("label", [True, False])
def test_kto_data_with_one_label_is_refused(tmp_path, tiny_tokenizer, config, label):
    rows = [{"prompt": f"Q{i}?", "completion": " yes", "label": label} for i in range(3)]
    path = jsonl(tmp_path / "kto.jsonl", rows)
    with pytest.raises(DataError) as info:
        prepare_unpaired(path, tiny_tokenizer, config)
    counts = "got 3 desirable and 0 undesirable" if label else "got 0 desirable and 3 undesirable"
    assert str(info.value).startswith(
        f"{path}: KTO needs both desirable (label=true) and undesirable (label=false) examples; "
        f"{counts}."
    )


def test_kto_data_with_both_labels_is_accepted(tiny_tokenizer, config):
    rows = [{"prompt": f"Q{i}?", "completion": " yes", "label": i == 0} for i in range(3)]
    labels = prepare_unpaired(rows, tiny_tokenizer, config).dataset["label"]
    assert sorted(labels) == [False, False, True]


# ---- bytes that are not UTF-8, lines split on "\n" only -----------------------------------------


def test_non_utf8_jsonl_names_the_line_and_byte(tmp_path, tiny_tokenizer, config):
    path = tmp_path / "bad.jsonl"
    good = json.dumps(GOOD_TEXT).encode()
    path.write_bytes(
        good + b"\n" + good + b'\n{"prompt": "H\xffi", "chosen": " a", "rejected": " b"}\n'
    )
    message = error_at(prepare_pairs, path, 3, tiny_tokenizer, config)
    # byte 14 of the line: '{"prompt": "H' is 13 bytes
    assert message == (
        f"{path}, line 3: not UTF-8 text: byte 0xff at byte 14 of the line (invalid start byte); "
        "save the file as UTF-8"
    )


def test_non_utf8_csv_names_the_line(tmp_path, tiny_tokenizer, config):
    path = tmp_path / "bad.csv"
    path.write_bytes(b"prompt,chosen,rejected\nHi, a, b\nH\xe9llo, a, b\n")
    message = error_at(prepare_pairs, path, 3, tiny_tokenizer, config)
    assert "not UTF-8 text: byte 0xe9 at byte 2 of the line" in message


def test_line_separators_inside_strings_do_not_shift_line_numbers(tmp_path, tiny_tokenizer, config):
    # U+0085, U+2028 and a lone "\r" are text inside a JSON line (json.dumps(ensure_ascii=False)
    # writes them raw); only "\n" ends a line.
    odd = dict(GOOD_TEXT, prompt="a\u0085b\u2028c\rd")
    lines = [json.dumps(odd, ensure_ascii=False), json.dumps(dict(GOOD_TEXT, chosen=5))]
    path = tmp_path / "odd.jsonl"
    path.write_bytes(("\n".join(lines) + "\n").encode())
    message = error_at(prepare_pairs, path, 2, tiny_tokenizer, config)
    assert "field 'chosen' must be a string, got int" in message


# ---- hints name the key to set -----------------------------------------------------------------


def test_several_splits_hint_names_data_split(tiny_tokenizer):
    rows = datasets.Dataset.from_list([GOOD_TEXT])
    source = datasets.DatasetDict({"first": rows, "second": rows})
    with pytest.raises(DataError) as info:
        prepare_pairs(source, tiny_tokenizer)
    assert "choose one with data_split=NAME" in str(info.value)


@pytest.mark.parametrize("name", ["./missing/prefs", "/no/such/dir", "a/b/c", "~/nope"])
def test_missing_local_data_path_is_not_looked_up_on_the_hub(tiny_tokenizer, name):
    with pytest.raises(DataError) as info:
        prepare_pairs(name, tiny_tokenizer)
    assert str(info.value) == f"{name}: no such file or directory"
