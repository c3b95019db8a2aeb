"""Inputs a new user gets wrong (tester finding F18): an empty data file says it has no rows, a
missing data file is a file error (exit 4, the README's table), a LoRA adapter records its base
model's absolute path, a pad id outside the model's vocabulary pads with EOS instead, and an EOS
outside it is one line, not a crash."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
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


def _bad_special(tiny_dir, model_dir, role: str):
    """The tiny model with a tokenizer whose ``role`` token got a new id len(vocab) = 400, the
    way transformers 5 gives a Qwen2 tokenizer without <|endoftext|> a new pad token."""
    shutil.copytree(tiny_dir, model_dir)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    tokenizer.add_special_tokens({f"{role}_token": "<|endoftext|>"})
    tokenizer.save_pretrained(str(model_dir))
    vocab = json.loads((model_dir / "config.json").read_text())["vocab_size"]
    assert getattr(tokenizer, f"{role}_token_id") == 400 == vocab


def test_a_pad_id_outside_the_vocabulary_pads_with_eos(tiny_dir, tmp_path, caplog):
    """The run pads with EOS instead (logged) and trains the weights the original tokenizer
    gives: padding is masked, so the pad id cannot change a number."""
    _bad_special(tiny_dir, tmp_path / "bad-pad", "pad")
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    settings = ["save_steps=none"]
    with caplog.at_level("WARNING", logger="dpokit"):
        code = main(train_argv(tmp_path / "bad-pad", data, tmp_path / "out", *settings))
    assert code == 0
    assert "pad token '<|endoftext|>' has id 400, outside the model's vocabulary" in caplog.text
    assert main(train_argv(tiny_dir, data, tmp_path / "ref", *settings)) == 0
    got = load_file(str(tmp_path / "out" / "final" / "model.safetensors"))
    want = load_file(str(tmp_path / "ref" / "final" / "model.safetensors"))
    for key, value in want.items():
        torch.testing.assert_close(got[key], value, rtol=0, atol=1e-6)


def test_an_eos_id_outside_the_vocabulary_is_one_line(tiny_dir, tmp_path, capsys):
    model_dir = tmp_path / "bad-eos"
    _bad_special(tiny_dir, model_dir, "eos")
    data = write_jsonl(tmp_path / "pairs.jsonl", ROWS)
    assert main(train_argv(model_dir, data, tmp_path / "out")) == EXIT_FILES
    assert error_line(capsys) == (
        f"tokenizer of {model_dir}: its eos token '<|endoftext|>' has id 400, outside the "
        "model's vocabulary (vocab_size 400): save the tokenizer with an eos token the model "
        "has, or resize the model's embeddings (model.resize_token_embeddings(len(tokenizer)))"
    )
