"""Decoder MLPs over chunks of positions (dpokit.mlp_chunks, config ``mlp_chunk_tokens``): the
same log-probs and gradients as whole rows and as the full-logits computation, no MLP call ever
sees more than a chunk, and the saved model is untouched."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from dpokit.config import ConfigError, TrainConfig
from dpokit.data import PairCollator
from dpokit.logprobs import CompletionScorer, full_logits_logps
from dpokit.mlp_chunks import chunk_mlps
from dpokit.modeling import load_model
from dpokit.tiny import build_tiny_model

ROWS = [
    {
        "prompt_input_ids": [5, 6, 7],
        "chosen_input_ids": [8, 9, 10, 11, 12, 13],
        "rejected_input_ids": [16, 17],
        "index": 0,
    },
    {
        "prompt_input_ids": [12, 13],
        "chosen_input_ids": [14, 15],
        "rejected_input_ids": [18, 19, 20, 21, 22, 23, 24],
        "index": 1,
    },
]


def _logps_and_grads(model, batch):
    model.zero_grad()
    scorer = CompletionScorer(model, chunk_size=4, fast=True)
    out = scorer(batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    (out.logps * torch.tensor([1.0, -2.0, 0.5, 3.0])).sum().backward()
    return out.logps.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_chunked_mlps_give_the_same_logps_and_gradients(tiny_tokenizer, tmp_path, arch):
    build_tiny_model(tiny_tokenizer, tmp_path / arch, arch=arch, seed=4)
    path = str(tmp_path / arch)  # GPT-2's config has dropout: off, as dpokit trains by default
    plain = load_model(path, torch.float32, disable_dropout=True).train()
    chunked = load_model(
        path, torch.float32, True, disable_dropout=True, mlp_chunk_tokens=3
    ).train()
    batch = PairCollator(tiny_tokenizer.pad_token_id)(ROWS)  # (4, 9): rows longer than a chunk
    want, want_grads = _logps_and_grads(plain, batch)
    got, got_grads = _logps_and_grads(chunked, batch)
    with torch.no_grad():  # the independent value: full logits of the unchanged model
        naive = full_logits_logps(
            plain, batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
        )
    torch.testing.assert_close(want, naive, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, naive, rtol=1e-5, atol=1e-5)
    for name, grad in want_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_no_mlp_call_sees_more_than_a_chunk(tiny_tokenizer):
    """Rows of 9 positions, chunks of 4: every MLP call (the layer's forward, its recompute in
    backward, and each chunk's own recompute) sees at most 4 positions."""
    model = build_tiny_model(tiny_tokenizer, arch="llama", seed=4).train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert chunk_mlps(model, 4) == len(model.model.layers)
    widths = []
    for layer in model.model.layers:
        layer.mlp.gate_proj.register_forward_hook(
            lambda module, args, out: widths.append(args[0].shape[1])
        )
    batch = PairCollator(tiny_tokenizer.pad_token_id)(ROWS)
    assert batch["input_ids"].shape[1] == 9
    _logps_and_grads(model, batch)
    layers = len(model.model.layers)
    assert widths[: 3 * layers] == [4, 4, 1] * layers  # the forward: every position once
    # backward: each layer's recompute (chunks again) and each chunk's own recompute (a chunk
    # whose output no scored position depends on is skipped by autograd)
    assert len(widths) >= 3 * layers + 5 * layers
    assert max(widths) == 4
    widths.clear()
    with torch.no_grad():  # no gradients: one call over the whole row
        model(input_ids=batch["input_ids"])
    assert widths == [9] * layers


def test_chunked_model_saves_and_reloads_unchanged(tiny_tokenizer, tmp_path):
    model = build_tiny_model(tiny_tokenizer, arch="qwen2", seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    chunk_mlps(model, 2)
    model.save_pretrained(tmp_path / "saved")
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path / "saved")
    assert loaded.state_dict().keys() == before.keys()
    for key, value in before.items():
        torch.testing.assert_close(loaded.state_dict()[key], value, rtol=0, atol=0)


def test_models_without_mlp_blocks_are_left_alone(tiny_tokenizer):
    opt = build_tiny_model(tiny_tokenizer, arch="opt", seed=1)  # fc1/fc2 in the layer itself
    assert chunk_mlps(opt, 4) == 0
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunk_mlps(opt, 0)


def test_mlp_chunk_tokens_config(tmp_path):
    base = {"model": "m", "data": "d", "output_dir": str(tmp_path)}
    assert TrainConfig.from_dict(base).mlp_chunk_tokens == 2048
    assert TrainConfig.from_dict({**base, "mlp_chunk_tokens": "none"}).mlp_chunk_tokens is None
    with pytest.raises(ConfigError, match="mlp_chunk_tokens"):
        TrainConfig.from_dict({**base, "mlp_chunk_tokens": 0})
