"""Bad input: every error names the file and the line/row; nothing is dropped silently."""

from __future__ import annotations

import json
import logging
import pickle

import pandas as pd
import pytest

from dpokit.data import DataConfig, DataError, prepare_pairs

GOOD = {"prompt": "Hello there!", "chosen": " I am fine.", "rejected": " I am bad."}


def write_lines(path, lines: list[str]):
    path.write_text("\n".join(lines) + "\n")
    return path


def jsonl(path, rows: list[dict]):
    return write_lines(path, [json.dumps(row) for row in rows])


@pytest.fixture()
def config(tmp_path):
    return DataConfig(cache_dir=str(tmp_path / "cache"))


def raises_at(source, row: int, kind: str, match: str, tokenizer, config) -> DataError:
    with pytest.raises(DataError, match=match) as info:
        prepare_pairs(source, tokenizer, config)
    error = info.value
    assert (error.source, error.row, error.row_kind) == (str(source), row, kind)
    assert f"{source}, {kind} {row}: " in str(error)
    return error


def test_broken_json_line(tmp_path, tiny_tokenizer, config):
    path = write_lines(
        tmp_path / "broken.jsonl", [json.dumps(GOOD), json.dumps(GOOD), '{"prompt": "Hi", "ch', ""]
    )
    raises_at(path, 3, "line", "invalid JSON", tiny_tokenizer, config)


def test_missing_field_counts_lines_past_blank_ones(tmp_path, tiny_tokenizer, config):
    missing = {k: v for k, v in GOOD.items() if k != "rejected"}
    path = write_lines(tmp_path / "missing.jsonl", [json.dumps(GOOD), "", json.dumps(missing)])
    raises_at(path, 3, "line", "missing field 'rejected'", tiny_tokenizer, config)


def test_wrong_type_in_jsonl_names_the_line(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "typed.jsonl", [GOOD, GOOD, dict(GOOD, chosen=5)])
    raises_at(path, 3, "line", "field 'chosen' must be a string, got int", tiny_tokenizer, config)


def test_wrong_type_in_an_unused_column_does_not_matter(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "extra.jsonl", [dict(GOOD, meta="x"), dict(GOOD, meta=[1, 2])])
    assert prepare_pairs(path, tiny_tokenizer, config).summary.rows_kept == 2


def test_wrong_type_in_memory_rows_names_the_row(tiny_tokenizer):
    rows = [GOOD, dict(GOOD, rejected=["not", "text"])]
    with pytest.raises(DataError, match=r"row 1: field 'rejected' must be a string, got list"):
        prepare_pairs(rows, tiny_tokenizer)


def test_empty_completion(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "empty.jsonl", [GOOD, dict(GOOD, chosen="  ")])
    raises_at(path, 2, "line", "empty completion in field 'chosen'", tiny_tokenizer, config)


def test_empty_completion_in_csv_names_the_row_index(tmp_path, tiny_tokenizer, config):
    path = tmp_path / "empty.csv"
    pd.DataFrame([GOOD, GOOD, dict(GOOD, rejected=" ")]).to_csv(path, index=False)
    raises_at(path, 2, "row", "empty completion in field 'rejected'", tiny_tokenizer, config)


def test_empty_assistant_turn(tiny_tokenizer):
    prompt = [{"role": "user", "content": "Hi"}]
    row = {
        "prompt": prompt,
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": ""}],
    }
    with pytest.raises(DataError, match=r"row 0: empty completion in field 'rejected'"):
        prepare_pairs([row], tiny_tokenizer)


def test_unknown_layout_lists_the_expected_formats(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "odd.jsonl", [{"question": "Hi", "answer": "yes"}])
    with pytest.raises(DataError, match="cannot tell the data format") as info:
        prepare_pairs(path, tiny_tokenizer, config)
    assert "prompt/chosen/rejected strings" in str(info.value)
    assert info.value.source == str(path) and info.value.row is None


def test_missing_file(tmp_path, tiny_tokenizer):
    with pytest.raises(DataError, match="no such file"):
        prepare_pairs(tmp_path / "nope.jsonl", tiny_tokenizer)


@pytest.mark.parametrize("action", ["keep", "drop"])
def test_identical_pairs_are_counted_and_warned(tiny_tokenizer, caplog, action):
    rows = [GOOD, dict(GOOD, rejected=GOOD["chosen"]), GOOD]
    with caplog.at_level(logging.INFO, logger="dpokit.data"):
        prepared = prepare_pairs(rows, tiny_tokenizer, DataConfig(identical_pairs=action))
    summary = prepared.summary
    assert summary.identical_pairs == 1
    assert summary.rows_read == 3
    if action == "keep":
        assert summary.rows_kept == 3 and summary.dropped == {}
    else:
        assert summary.rows_kept == 2 and summary.dropped == {"identical pair": 1}
        assert list(prepared.dataset["index"]) == [0, 1]
    assert any("identical" in r.message and r.levelno == logging.WARNING for r in caplog.records)
    assert any("rows read 3" in r.message for r in caplog.records)


SCORED = [
    dict(GOOD, score_chosen=0.9, score_rejected=0.4),
    dict(GOOD, score_chosen=3, score_rejected=3),
    dict(GOOD, score_chosen=0.1, score_rejected=0.2),
    dict(GOOD, score_chosen=7, score_rejected=-1),
]


def test_odpo_ties_and_reversed_scores_dropped_with_counts(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "scored.jsonl", SCORED)
    config.require_scores, config.bad_scores = True, "drop"
    prepared = prepare_pairs(path, tiny_tokenizer, config)
    summary = prepared.summary
    assert summary.dropped == {"score tie": 1, "reversed scores": 1}
    assert (summary.rows_read, summary.rows_kept, summary.rows_dropped) == (4, 2, 2)
    assert "dropped 2 (reversed scores: 1, score tie: 1)" in summary.format()
    assert list(prepared.dataset["score_chosen"]) == [0.9, 7.0]
    assert list(prepared.dataset["score_rejected"]) == [0.4, -1.0]
    assert list(prepared.dataset["index"]) == [0, 1]


def test_odpo_bad_scores_error_names_the_line(tmp_path, tiny_tokenizer, config):
    path = jsonl(tmp_path / "scored.jsonl", SCORED)
    config.require_scores = True
    raises_at(path, 2, "line", "score tie: score_chosen=3.0", tiny_tokenizer, config)
    path = jsonl(tmp_path / "reversed.jsonl", [SCORED[0], SCORED[2]])
    raises_at(path, 2, "line", "reversed scores", tiny_tokenizer, config)


def test_scores_are_only_checked_when_required(tiny_tokenizer):
    prepared = prepare_pairs(SCORED, tiny_tokenizer)
    assert prepared.has_scores and prepared.summary.rows_kept == 4


def test_required_scores_must_exist(tiny_tokenizer):
    with pytest.raises(DataError, match="require_scores is set but the data has no"):
        prepare_pairs([GOOD], tiny_tokenizer, DataConfig(require_scores=True))


def test_conversational_data_without_chat_template_gives_a_hint(tiny_tokenizer):
    tiny_tokenizer.chat_template = None
    row = {
        "prompt": [{"role": "user", "content": "Hi"}],
        "chosen": [{"role": "assistant", "content": "Hello"}],
        "rejected": [{"role": "assistant", "content": "No"}],
    }
    with pytest.raises(
        DataError, match=r"set tokenizer.chat_template or pass --chat-template FILE"
    ):
        prepare_pairs([row], tiny_tokenizer)
    # The override makes it work.
    template = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    assert len(prepare_pairs([row], tiny_tokenizer, DataConfig(chat_template=template))) == 1


def test_data_error_survives_pickling_from_worker_processes():
    error = pickle.loads(pickle.dumps(DataError("bad", "x.jsonl", 3, "line")))
    assert (error.source, error.row, error.row_kind, str(error)) == (
        "x.jsonl",
        3,
        "line",
        "x.jsonl, line 3: bad",
    )
    assert isinstance(error, ValueError)


def test_empty_prompt_without_bos_has_no_context(tiny_tokenizer):
    with pytest.raises(DataError, match=r"row 1: the prompt encodes to no tokens"):
        prepare_pairs([GOOD, dict(GOOD, prompt="")], tiny_tokenizer)
