"""bf16 autocast (``mixed_precision=bf16``) on CPU: the path a GPU trains in, checked without one.

A tiny real Qwen2 model saved and loaded back through ``from_pretrained``, as a user's checkpoint:

- a bf16 DPO run's first loss is ln 2 (policy = its own pre-computed reference), and its first
  log-probs equal an fp32 run's to bf16 tolerance while differing from them (autocast did run),
  with two rows per pair and padding-free;
- ``CompletionScorer`` under ``torch.autocast(bf16)`` equals a direct fp32 full-logits
  computation to bf16 tolerance, padding-free equal to two rows.

benchmarks/gpu_check.sh runs the same checks on a GPU (with flash-attention's varlen kernels).
"""

from __future__ import annotations

import json
import math
import random

import pytest
import torch
from accelerate.state import AcceleratorState
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.data import DataConfig, PairCollator, prepare_pairs
from dpokit.data.packing import pair_collator
from dpokit.engine import Trainer
from dpokit.logprobs import CompletionScorer, full_logits_logps, scorer_kwargs
from dpokit.tiny import build_tiny_model
from helpers import make_config

BF16_RTOL = 2.0**-8  # one bf16 rounding step (8 significant bits), relative


@pytest.fixture()
def fresh_accelerator():
    """accelerate keeps one AcceleratorState per process and refuses a second mixed_precision
    in it; reset it around a test that switches, so neither it nor later tests inherit one."""
    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.fixture(scope="module")
def qwen_dir(tiny_dir, tmp_path_factory):
    """A tiny Qwen2 (the family of gpu_check's real-shape model, tied embeddings) on the tiny
    tokenizer, saved to disk."""
    path = tmp_path_factory.mktemp("tiny-qwen2")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    build_tiny_model(tokenizer, path, arch="qwen2", hidden_size=64, tie_word_embeddings=True)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture(scope="module")
def varied_pairs(tmp_path_factory) -> str:
    """Pairs whose prompts and completions vary in length, so the layouts really differ."""
    rng = random.Random(0)
    words = ["apples", "bananas", "the fox", "the dog", "today", "France", "Paris", "good", "bad"]
    path = tmp_path_factory.mktemp("bf16-data") / "pairs.jsonl"
    with open(path, "w") as handle:
        for _ in range(8):
            row = {
                "prompt": "Human: " + " ".join(rng.choices(words, k=rng.randint(1, 6))) + "?",
                "chosen": " yes " + " ".join(rng.choices(words, k=rng.randint(1, 8))),
                "rejected": " no " + " ".join(rng.choices(words, k=rng.randint(1, 8))),
            }
            handle.write(json.dumps(row) + "\n")
    return str(path)


def _first_step(qwen_dir, data, tmp_path, precision: str, packing: str) -> dict:
    AcceleratorState._reset_state(reset_partial_state=True)
    config = make_config(
        qwen_dir, data, tmp_path / precision, mixed_precision=precision, packing=packing
    )
    trainer = Trainer(config)
    assert trainer.accelerator.mixed_precision == precision
    return trainer.train().history[0]


@pytest.mark.parametrize("packing", ["none", "padding_free"])
def test_bf16_run_starts_at_ln2_with_the_log_probs_of_fp32(
    packing, qwen_dir, varied_pairs, tmp_path, fresh_accelerator
):
    fp32 = _first_step(qwen_dir, varied_pairs, tmp_path, "no", packing)
    bf16 = _first_step(qwen_dir, varied_pairs, tmp_path, "bf16", packing)
    # The reference was scored under the same autocast, on the same (unshuffled) batches, so only
    # fp32 rounding is left; policy in bf16 against a reference in fp32 would be off by ~1e-5.
    assert bf16["loss"] == pytest.approx(math.log(2), abs=1e-6)
    for key in ("logps/chosen", "logps/rejected"):
        assert bf16[key] == pytest.approx(fp32[key], rel=BF16_RTOL, abs=0)
        assert bf16[key] != fp32[key]  # autocast did change the forward


def _score(model, batch) -> tuple[torch.Tensor, torch.Tensor]:
    out = CompletionScorer(model)(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),
    )
    return out.logps, out.token_counts


@torch.no_grad()
def test_autocast_log_probs_equal_fp32_full_logits_in_both_layouts(
    qwen_dir, varied_pairs, tmp_path
):
    tokenizer = AutoTokenizer.from_pretrained(str(qwen_dir))
    settings = DataConfig(max_length=64, max_prompt_length=32, cache_dir=str(tmp_path / "hf"))
    prepared = prepare_pairs(varied_pairs, tokenizer, settings)
    rows = [prepared.dataset[i] for i in range(4)]
    two_rows = PairCollator(tokenizer.pad_token_id)(rows)
    packed = pair_collator(tokenizer.pad_token_id, "padding_free")(rows)
    model = AutoModelForCausalLM.from_pretrained(str(qwen_dir)).eval()  # fp32 weights
    exact = full_logits_logps(
        model, two_rows["input_ids"], two_rows["attention_mask"], two_rows["completion_mask"]
    )  # (2B,) from the whole logits tensor, in fp32: the value bf16 is judged against
    with torch.autocast("cpu", dtype=torch.bfloat16):
        two, two_counts = _score(model, two_rows)
        free, free_counts = _score(model, packed)
    assert two.dtype == free.dtype == torch.float32
    assert torch.equal(two_counts, free_counts)
    assert two_counts.tolist() == two_rows["completion_mask"].sum(dim=1).tolist()
    torch.testing.assert_close(two, exact, rtol=BF16_RTOL, atol=0)
    torch.testing.assert_close(free, two, rtol=BF16_RTOL, atol=0)
    assert not torch.equal(two, exact)  # autocast did change the forward
