"""Tokenizers and models that do not fit the defaults: each trains after a documented fix, or
stops with a message that names the fix (and, where the config can tell, before any weights)."""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit import train
from dpokit.cli import main
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataError
from dpokit.engine import Trainer
from dpokit.errors import ModelError
from dpokit.tiny import CHAT_TEMPLATE, build_tiny_model

PAIRS = [
    {"prompt": f"Human: Do you like {topic}? Assistant:", "chosen": " yes.", "rejected": " no!"}
    for topic in ("apples", "bananas", "the fox", "Paris", "today", "cherries", "the dog", "France")
]
CHATS = [
    {
        "chosen": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": "yes"},
        ],
        "rejected": [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": "no"},
        ],
    }
    for row in PAIRS
]


def write_rows(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return str(path)


def model_with_tokenizer(tiny_dir, path: Path, edit) -> Path:
    """A copy of the tiny model whose tokenizer was changed by ``edit(tokenizer)`` and saved."""
    shutil.copytree(tiny_dir, path)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        (path / name).unlink(missing_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    edit(tokenizer)
    tokenizer.save_pretrained(str(path))
    return path


def config(model, data, tmp_path, **overrides) -> TrainConfig:
    values = dict(
        model=str(model),
        data=data,
        output_dir=str(tmp_path / "run"),
        reference_cache_dir=str(tmp_path / "cache"),
        batch_size=4,
        max_steps=1,
        max_length=64,
        max_prompt_length=32,
        progress=False,
        shuffle=False,
    )
    return TrainConfig.from_dict({**values, **overrides})


def test_tokenizer_without_pad_token_pads_with_eos_and_scores_the_same(tiny_dir, tmp_path, caplog):
    no_pad = model_with_tokenizer(
        tiny_dir, tmp_path / "no-pad", lambda t: setattr(t, "pad_token", None)
    )
    assert AutoTokenizer.from_pretrained(str(no_pad)).pad_token is None
    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    with caplog.at_level(logging.INFO):
        trainer = Trainer(config(no_pad, data, tmp_path / "a", reference_mode="precomputed"))
    assert "tokenizer has no pad token; using EOS '</s>' for padding" in caplog.text
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id
    # Padding is masked: the reference log-probs equal those with the original pad token.
    with_pad = Trainer(config(tiny_dir, data, tmp_path / "b", reference_mode="precomputed"))
    torch.testing.assert_close(
        trainer.references["train"].logps, with_pad.references["train"].logps, atol=1e-6, rtol=0
    )
    assert trainer.train().history[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-5)


def test_tokenizer_without_pad_or_eos_is_refused_by_name(tiny_dir, tmp_path, capsys):
    def strip(tokenizer):
        tokenizer.pad_token = None
        tokenizer.eos_token = None

    bare = model_with_tokenizer(tiny_dir, tmp_path / "bare", strip)
    data = write_rows(tmp_path / "pairs.jsonl", PAIRS)
    with pytest.raises(ModelError, match=r"neither a pad nor an EOS token; set one"):
        Trainer(config(bare, data, tmp_path))
    argv = ["train", "--model", str(bare), "--data", data, "--output-dir", str(tmp_path / "cli")]
    assert main(argv) == 4  # model/files (README's exit-code table)
    assert "neither a pad nor an EOS token" in capsys.readouterr().err


def test_conversational_data_without_chat_template_names_the_fix(tiny_dir, tmp_path, capsys):
    def drop_template(tokenizer):
        tokenizer.chat_template = None

    plain = model_with_tokenizer(tiny_dir, tmp_path / "plain", drop_template)
    data = write_rows(tmp_path / "chats.jsonl", CHATS)
    with pytest.raises(DataError, match=r"chats.jsonl: conversational data needs a chat template"):
        Trainer(config(plain, data, tmp_path / "a"))
    # The documented fix, from the command line: --chat-template FILE.
    template = tmp_path / "template.jinja"
    template.write_text(CHAT_TEMPLATE)
    argv = ["train", "--model", str(plain), "--data", data, "--output-dir", str(tmp_path / "b")]
    argv += ["max_steps=1", "batch_size=4", "max_length=64", "max_prompt_length=32"]
    assert main([*argv, "progress=false"]) == 3  # a data error (dpokit.errors.EXIT_DATA)
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after any progress bars
    assert last.startswith("dpokit: error: ") and "--chat-template FILE" in last
    assert main([*argv, "progress=false", "--chat-template", str(template)]) == 0
    assert (tmp_path / "b" / "final" / "model.safetensors").exists()


def test_template_that_renders_bos_with_a_bos_adding_tokenizer_gives_one_bos(
    tiny_bos_dir, tmp_path
):
    bos_template = "{{ bos_token }}" + CHAT_TEMPLATE
    model = model_with_tokenizer(
        tiny_bos_dir, tmp_path / "bos", lambda t: setattr(t, "chat_template", bos_template)
    )
    tokenizer = AutoTokenizer.from_pretrained(str(model))
    bos = tokenizer.bos_token_id
    # The trap: the rendered text starts with BOS and the tokenizer adds another.
    text = tokenizer.apply_chat_template(
        CHATS[0]["chosen"][:1], tokenize=False, add_generation_prompt=True
    )
    assert tokenizer(text)["input_ids"][:2] == [bos, bos]
    data = write_rows(tmp_path / "chats.jsonl", CHATS)
    trainer = Trainer(config(model, data, tmp_path))
    for row in trainer.train_data.dataset:
        prompt = row["prompt_input_ids"]
        assert prompt[0] == bos and prompt[1] != bos and prompt.count(bos) == 1
        assert bos not in row["chosen_input_ids"] + row["rejected_input_ids"]
    assert trainer.train().history[0]["loss"] == pytest.approx(0.6931471805599453, rel=1e-5)


def test_rows_beyond_the_models_positions_are_refused_before_loading(
    tiny_dir, tmp_path, monkeypatch, caplog
):
    short = tmp_path / "short"
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    build_tiny_model(tokenizer, short, max_positions=32)
    tokenizer.save_pretrained(str(short))
    long_rows = [dict(row, prompt=row["prompt"] * 8) for row in PAIRS]  # 32-token prompts
    long_data = write_rows(tmp_path / "long.jsonl", long_rows)
    real_load = AutoModelForCausalLM.from_pretrained

    def refuse(*args, **kwargs):
        raise AssertionError("weights loaded before the row lengths were checked")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    with pytest.raises(
        ConfigError,
        match=r"max_length=64 exceeds the 32 positions .*longest row has \d+ tokens; "
        r"set max_length=32 or less",
    ):
        Trainer(config(short, long_data, tmp_path / "a"))
    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", real_load)
    # The fix the message names: rows are truncated to 32 tokens (and counted).
    result = train(config(short, long_data, tmp_path / "b", max_length=32, max_prompt_length=16))
    assert result.global_step == 1
    # A max_length beyond the positions that no row reaches only warns.
    short_data = write_rows(tmp_path / "short.jsonl", PAIRS)
    with caplog.at_level(logging.WARNING, logger="dpokit.modeling"):
        train(config(short, short_data, tmp_path / "c"))
    assert "max_length=64 exceeds the 32 positions" in caplog.text
