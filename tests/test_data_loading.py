"""Every source type gives the same prepared rows; the tokenized pairs are cached by fingerprint."""

from __future__ import annotations

import json
import os

import datasets
import pandas as pd
import pytest
from transformers import AutoTokenizer

from dpokit.data import DataConfig, DataError, prepare_pairs
from dpokit.data.pipeline import PairRowProcessor

ROWS = [
    {
        "prompt": "Hello there! How are you",
        "chosen": " I am fine, thank you.",
        "rejected": " I am bad.",
        "score_chosen": 0.9,
        "score_rejected": 0.4,
    },
    {
        "prompt": "\n\nHuman: What is the capital of France?\n\nAssistant:",
        "chosen": " Paris is the capital of France.",
        "rejected": " I like apples, bananas and cherries.",
        "score_chosen": 5.0,
        "score_rejected": 2.5,
    },
    {
        "prompt": "The quick brown fox",
        "chosen": " jumps over the lazy dog.",
        "rejected": " jumps over the lazy dog.",
        "score_chosen": 1.0,
        "score_rejected": 0.0,
    },
]


def write_source(kind: str, tmp_path):
    """Write ROWS as ``kind``; return what prepare_pairs takes."""
    frame = pd.DataFrame(ROWS)
    if kind == "jsonl":
        path = tmp_path / "pairs.jsonl"
        path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    elif kind == "json":
        path = tmp_path / "pairs.json"
        path.write_text(json.dumps(ROWS, indent=1))
    elif kind == "parquet":
        path = tmp_path / "pairs.parquet"
        frame.to_parquet(path)
    elif kind == "csv":
        path = tmp_path / "pairs.csv"
        frame.to_csv(path, index=False)
    elif kind == "saved":
        path = tmp_path / "saved"
        datasets.Dataset.from_list(ROWS).save_to_disk(str(path))
    elif kind == "saved_dict":
        path = tmp_path / "saved_dict"
        datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(path))
    elif kind == "dataset":
        return datasets.Dataset.from_list(ROWS)
    else:
        return [dict(row) for row in ROWS]
    return path


@pytest.fixture()
def config(tmp_path):
    return DataConfig(cache_dir=str(tmp_path / "cache"))


@pytest.fixture()
def expected(tiny_tokenizer):
    return prepare_pairs(ROWS, tiny_tokenizer).dataset.to_list()


@pytest.mark.parametrize(
    "kind", ["jsonl", "json", "parquet", "csv", "saved", "saved_dict", "dataset", "list"]
)
def test_every_source_gives_the_same_rows(kind, tmp_path, tiny_tokenizer, config, expected):
    prepared = prepare_pairs(write_source(kind, tmp_path), tiny_tokenizer, config)
    assert prepared.dataset.to_list() == expected
    assert prepared.dataset.column_names == [
        "prompt_input_ids",
        "chosen_input_ids",
        "rejected_input_ids",
        "score_chosen",
        "score_rejected",
        "index",
    ]
    summary = prepared.summary
    assert (summary.rows_read, summary.rows_kept, summary.rows_dropped) == (3, 3, 0)
    assert (summary.identical_pairs, summary.truncated_prompts) == (1, 0)
    assert summary.format_name == "prompt_chosen_rejected"
    assert "rows read 3, kept 3, dropped 0" in summary.format()


def test_second_call_loads_the_cache_without_tokenizing(tmp_path, tiny_dir, config, monkeypatch):
    path = write_source("jsonl", tmp_path)
    first = prepare_pairs(path, AutoTokenizer.from_pretrained(str(tiny_dir)), config)
    assert not first.from_cache
    assert first.cache_file and os.path.exists(first.cache_file)
    assert first.cache_file.startswith(config.cache_dir)
    modified = os.path.getmtime(first.cache_file)

    def fail(*args, **kwargs):
        raise AssertionError("tokenized again")

    monkeypatch.setattr(PairRowProcessor, "__call__", fail)
    # A fresh tokenizer object loaded from the same files has the same identity.
    second = prepare_pairs(path, AutoTokenizer.from_pretrained(str(tiny_dir)), config)
    assert second.from_cache
    assert (second.cache_file, second.fingerprint) == (first.cache_file, first.fingerprint)
    assert os.path.getmtime(second.cache_file) == modified
    assert second.dataset.to_list() == first.dataset.to_list()
    assert second.summary == first.summary


def test_fingerprint_follows_content_tokenizer_and_settings(tmp_path, tiny_dir, tiny_bos_dir):
    path = write_source("jsonl", tmp_path)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    base = prepare_pairs(path, tokenizer).fingerprint

    def fingerprint(source=path, tok=tokenizer, **settings):
        return prepare_pairs(source, tok, DataConfig(**settings)).fingerprint

    assert fingerprint(num_proc=2) == base  # how it is computed does not matter
    assert fingerprint(max_length=2048) != base
    assert fingerprint(chat_template="{{ messages }}") != base
    assert fingerprint(tok=AutoTokenizer.from_pretrained(str(tiny_bos_dir))) != base
    other = tmp_path / "other.jsonl"
    other.write_text(path.read_text().replace("fine", "good"))
    assert fingerprint(source=other) != base
    tokenizer(["x"], truncation=True, max_length=4)  # changes the backend's state, not the ids
    assert fingerprint() == base


def test_num_proc_gives_the_same_rows_and_errors(tmp_path, tiny_tokenizer, config, expected):
    rows = ROWS * 4
    config.num_proc = 2
    prepared = prepare_pairs(rows, tiny_tokenizer, config)
    assert prepared.dataset.to_list()[:3] == expected
    assert list(prepared.dataset["index"]) == list(range(12))
    bad = rows[:7] + [dict(ROWS[0], chosen="")] + rows[8:]
    with pytest.raises(DataError, match="row 7: empty completion"):
        prepare_pairs(bad, tiny_tokenizer, DataConfig(num_proc=2))


def test_split_of_a_saved_dataset_dict(tmp_path, tiny_tokenizer, config):
    path = tmp_path / "splits"
    two = datasets.DatasetDict(
        {"train": datasets.Dataset.from_list(ROWS), "test": datasets.Dataset.from_list(ROWS[:1])}
    )
    two.save_to_disk(str(path))
    assert len(prepare_pairs(path, tiny_tokenizer, config, split="test")) == 1
    assert len(prepare_pairs(path, tiny_tokenizer, config)) == 3
    with pytest.raises(DataError, match="no split 'dev'"):
        prepare_pairs(path, tiny_tokenizer, config, split="dev")
