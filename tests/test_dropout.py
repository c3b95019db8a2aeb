"""Dropout is off in the policy and every reference (``disable_dropout``, issue 11 section 1).

The policy trains in train mode while the reference scores in eval mode; with the config's
dropout on, the first DPO loss is not ln 2 and TDPO's token-level KL is not 0. Models here are
tiny GPT-2 and OPT models whose configs set every dropout to 0.3, saved and loaded by path.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from dpokit.engine import Trainer
from dpokit.modeling import load_model, switch_off_dropout
from helpers import train_config

LN2 = math.log(2)
DROPOUT = 0.3
FAMILIES = {
    "gpt2": dict(n_embd=32, n_layer=2, n_head=4, n_positions=128, attn_pdrop=DROPOUT,
                 resid_pdrop=DROPOUT, embd_pdrop=DROPOUT, summary_first_dropout=DROPOUT),
    "opt": dict(hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
                word_embed_proj_dim=32, max_position_embeddings=128, dropout=DROPOUT,
                attention_dropout=DROPOUT, activation_dropout=DROPOUT),
}  # fmt: skip


@pytest.fixture(scope="module", params=list(FAMILIES))
def dropout_model(request, tiny_dir, tmp_path_factory):
    """A saved ``request.param`` model (tiny Llama's tokenizer) with dropout 0.3 everywhere."""
    path = tmp_path_factory.mktemp(f"{request.param}-dropout")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    config = AutoConfig.for_model(
        request.param,
        vocab_size=len(tokenizer),
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **FAMILIES[request.param],
    )
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path


def write_pairs(path, rows: int = 8) -> str:
    with open(path, "w") as handle:
        for i in range(rows):
            row = {
                "prompt": f"Human: question {i}? Assistant:",
                "chosen": f" yes, answer {i} is right.",
                "rejected": f" no {i}.",
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


def first_record(model, tmp_path, **overrides) -> dict:
    data = write_pairs(tmp_path / "pairs.jsonl")
    config = train_config(
        model, data, tmp_path / "run", tmp_path / "cache", max_steps=1, shuffle=False, **overrides
    )
    return Trainer(config).train().history[0]


def test_dpo_first_loss_is_ln2_with_dropout_in_the_config(dropout_model, tmp_path):
    record = first_record(dropout_model, tmp_path, method="dpo")
    assert record["loss"] == pytest.approx(LN2, abs=1e-6)
    assert record["rewards/margins"] == pytest.approx(0.0, abs=1e-6)


def test_tdpo2_first_step_has_zero_token_kl_with_dropout_in_the_config(dropout_model, tmp_path):
    """TDPO2 scores an online (frozen-copy) reference: policy == reference at step 1 exactly."""
    record = first_record(dropout_model, tmp_path, method="tdpo2")
    assert record["loss"] == pytest.approx(LN2, abs=1e-6)
    assert abs(record["kl/chosen"]) < 1e-6 and abs(record["kl/rejected"]) < 1e-6


def test_disable_dropout_false_keeps_the_configs_dropout(dropout_model, tmp_path):
    """The switch has teeth: with dropout on, the first loss is not ln 2."""
    record = first_record(dropout_model, tmp_path, method="dpo", disable_dropout=False)
    assert abs(record["loss"] - LN2) > 1e-4  # 100x the tolerance of the ln 2 tests


def test_switch_off_dropout_zeroes_modules_and_config_but_not_lora(dropout_model):

    model = load_model(str(dropout_model), torch.float32, disable_dropout=True)
    drops = [m for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    floats = [
        (name, key, value)
        for name, module in model.named_modules()
        for key, value in vars(module).items()
        if "dropout" in key and isinstance(value, float)
    ]
    assert drops or floats  # GPT-2 has Dropout modules; OPT calls F.dropout with floats
    assert all(m.p == 0.0 for m in drops)
    assert all(value == 0.0 for _, _, value in floats)
    for key in ("attn_pdrop", "resid_pdrop", "embd_pdrop", "dropout", "attention_dropout"):
        assert getattr(model.config, key, 0.0) == 0.0, key
    # Train mode, dropout off: two forwards agree exactly.
    model.train()
    ids = torch.randint(
        0, model.config.vocab_size, (2, 9), generator=torch.Generator().manual_seed(0)
    )
    torch.testing.assert_close(model(ids).logits, model(ids).logits, rtol=0, atol=0)

    targets = "c_attn" if model.config.model_type == "gpt2" else "q_proj"
    lora = get_peft_model(model, LoraConfig(r=4, lora_dropout=0.25, target_modules=[targets]))
    switch_off_dropout(lora)  # a second pass (e.g. over an adapter model) keeps LoRA's own
    lora_drops = [m for n, m in lora.named_modules() if n.split(".")[-2:-1] == ["lora_dropout"]]
    assert lora_drops and all(m.p == 0.25 for m in lora_drops)


def test_loading_without_the_switch_keeps_the_configs_dropout(dropout_model):
    model = load_model(str(dropout_model), torch.float32)
    probabilities = [m.p for m in model.modules() if isinstance(m, torch.nn.Dropout)]
    probabilities += [v for m in model.modules() for k, v in vars(m).items() if k == "dropout"]
    assert DROPOUT in probabilities
