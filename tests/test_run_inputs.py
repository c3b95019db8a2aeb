"""Inputs a new user gets wrong (tester finding F18): an empty data file says it has no rows, a
missing data file is a file error (exit 4, the README's table), a LoRA adapter records its base
model's absolute path, and a pad id outside the model's vocabulary is one line, not a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit import train
from dpokit.cli import main
from dpokit.data import DataConfig, DataError
from dpokit.data.loading import load_source
from dpokit.errors import EXIT_DATA, EXIT_FILES
from test_cli_errors import ROWS, error_line, train_argv, write_jsonl
from test_faults import config_for, pair_rows, write_rows


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("empty.jsonl", "", "the file is empty: no rows to read"),
        ("blank.jsonl", "\n  \n\n", "the file is empty: no rows to read"),
        ("bom.jsonl", "\ufeff\n", "the file is empty: no rows to read"),
        ("empty.csv", "", "the file is empty: no rows to read"),
        ("header.csv", "prompt,chosen,rejected\n",
         "the file holds only a header line: no rows to read"),
        ("empty.json", "[]\n", "the file has no rows"),
    ],
)  # fmt: skip
def test_a_data_file_without_rows_says_so(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(DataError) as caught:
        load_source(str(path), DataConfig())
    assert str(caught.value) == f"{path}: {message}"


def test_cli_empty_data_file_is_a_data_error(tmp_path, tiny_dir, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert main(train_argv(tiny_dir, empty, tmp_path / "out")) == EXIT_DATA
    assert error_line(capsys) == f"{empty}: the file is empty: no rows to read"


def test_cli_missing_data_file_is_a_file_error(tmp_path, tiny_dir, capsys):
    missing = tmp_path / "no-such.jsonl"
    assert main(train_argv(tiny_dir, missing, tmp_path / "out")) == EXIT_FILES
    assert error_line(capsys) == f"{missing}: no such file or directory"
    assert not (tmp_path / "out").exists()


def test_lora_adapter_records_the_absolute_base_path(tiny_dir, tmp_path, monkeypatch):
    data = write_rows(tmp_path / "pairs.jsonl", pair_rows(8))
    shutil.copytree(tiny_dir, tmp_path / "llama")
    monkeypatch.chdir(tmp_path)
    settings = dict(lora=True, lora_r=4, lora_target_modules="q_proj,v_proj", max_steps=2)
    result = train(config_for("llama", data, tmp_path / "run", **settings))  # relative "llama"
    adapter = json.loads((result.final_dir / "adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str((tmp_path / "llama").resolve())

    monkeypatch.chdir(tmp_path / "run")  # "llama" means nothing here
    loaded = AutoModelForCausalLM.from_pretrained(str(result.final_dir))
    base = AutoModelForCausalLM.from_pretrained(str(tmp_path / "llama"))
    direct = PeftModel.from_pretrained(base, str(result.final_dir))
    ids = torch.tensor([[5, 17, 42, 9]])
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, direct(ids).logits, atol=0.0, rtol=0.0)


def test_a_pad_id_outside_the_vocabulary_is_one_line(tiny_dir, tmp_path, capsys):
    """transformers 5 gives a Qwen2 tokenizer without <|endoftext|> a new pad token with id
    len(vocab); here the tiny tokenizer (400 ids, the model's vocab_size) gets one the same way."""
    model_dir = tmp_path / "bad-pad"
    shutil.copytree(tiny_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"})
    tokenizer.save_pretrained(str(model_dir))
    assert (
        tokenizer.pad_token_id
        == 400
        == json.loads((model_dir / "config.json").read_text())["vocab_size"]
    )
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert main(train_argv(model_dir, data, tmp_path / "out")) == EXIT_FILES
    assert error_line(capsys) == (
        f"tokenizer of {model_dir}: its pad token '<|endoftext|>' has id 400, outside the "
        "model's vocabulary (vocab_size 400): save the tokenizer with a pad token the model has "
        "(e.g. tokenizer.pad_token = tokenizer.eos_token), or resize the model's embeddings "
        "(model.resize_token_embeddings(len(tokenizer)))"
    )
