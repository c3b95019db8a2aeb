"""dpokit on the model families users bring, at their published shapes (issue 12, section 2).

For each family in :data:`architectures.ARCHITECTURES` (Llama-3.2, Qwen2.5, Qwen3, Gemma-2,
Gemma-3, Mistral, Phi-3, GPT-2, OPT, SmolLM2) a model is built from its published config (fewer
layers where noted there), saved with a word-level tokenizer of the real vocabulary size and
loaded back by path, as a user's checkpoint is. Then:

1. dpokit's log-probs equal a direct full-logits computation (``model(...).logits`` ->
   log_softmax -> gather), on the path dpokit picks by itself (chunked head, or full logits for
   Gemma-2's soft-capping);
2. a DPO run's first loss is ln 2 (policy == reference) and its ``save_pretrained`` output
   reloads with ``AutoModelForCausalLM.from_pretrained`` to the trained policy's logits;
3. a TDPO2 run (token KL over the real vocabulary) starts at ln 2 with zero KL.

Models are built once per family (module-scoped fixtures, one family alive at a time) in fp32
with short sequences; families too big to train whole in a few GiB train LoRA adapters.
"""

from __future__ import annotations

import gc
import json
import math
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM

from architectures import ARCHITECTURES, Arch, build_config, build_model, build_tokenizer
from dpokit.data.collate import PairCollator
from dpokit.data.packing import pair_collator
from dpokit.engine import Trainer
from dpokit.logprobs import CompletionScorer, chunked_token_logps, scorer_kwargs
from dpokit.modeling import load_model
from helpers import train_config

LN2 = math.log(2)
TOPICS = ["apples", "bananas", "cherries", "the fox", "the dog", "today", "France", "Paris"]


def pair_rows(count: int, seed: int = 0) -> list[dict]:
    """Preference pairs in plain text: chosen 'yes ...', rejected 'no ...'."""
    rng = random.Random(seed)
    rows = []
    for _ in range(count):
        topic = rng.choice(TOPICS)
        rows.append(
            {
                "prompt": f"Human: Do you like {topic}? Assistant:",
                "chosen": f" yes, I like {topic}.",
                "rejected": f" no, I do not like {topic}!",
            }
        )
    return rows


def corpus_words(rows: list[dict]) -> list[str]:
    """Every word and punctuation mark of the rows (the tokenizer's pre-tokenizer splits)."""
    text = " ".join(" ".join(row.values()) for row in rows)
    for mark in "?:,.!":
        text = text.replace(mark, f" {mark} ")
    return text.split()


@dataclass
class Built:
    """One family, saved: where, its config, a probe batch and the starting model's logits."""

    arch: Arch
    path: Path
    data: str
    config: object
    probe: torch.Tensor  # (1, T) token ids, including the last vocabulary id
    start_logits: torch.Tensor  # (1, T, V) of the saved starting model


@pytest.fixture(scope="module", params=list(ARCHITECTURES))
def built(request, tmp_path_factory):
    """Build, save and free one family; its directory is removed when the next one starts."""
    arch = ARCHITECTURES[request.param]
    path = tmp_path_factory.mktemp(request.param)
    rows = pair_rows(2)
    data = path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    config = build_config(arch)
    tokenizer = build_tokenizer(config, corpus_words(rows), arch.add_bos)
    model = build_model(config)
    vocab = config.vocab_size
    generator = torch.Generator().manual_seed(1)
    probe = torch.randint(0, vocab, (1, 12), generator=generator)
    probe[0, -1] = vocab - 1
    with torch.no_grad():
        start_logits = model(probe).logits.float()
    model.save_pretrained(path / "model")
    tokenizer.save_pretrained(path / "model")
    del model
    gc.collect()
    yield Built(arch, path / "model", str(data), config, probe, start_logits)
    shutil.rmtree(path, ignore_errors=True)


def score_batch(vocab: int, long_row: int | None = None):
    """Right-padded (input_ids, attention_mask, completion_mask) of random ids over the whole
    vocabulary: rows of 20, 13 and 26 tokens (or one of ``long_row``) with 8-12 token prompts."""
    generator = torch.Generator().manual_seed(2)
    shapes = [(8, 12), (9, 4), (12, 14)] if long_row is None else [(long_row - 10, 10)]
    length = max(p + c for p, c in shapes)
    input_ids = torch.zeros(len(shapes), length, dtype=torch.long)
    attention_mask = torch.zeros(len(shapes), length, dtype=torch.long)
    completion_mask = torch.zeros(len(shapes), length, dtype=torch.bool)
    for i, (prompt, completion) in enumerate(shapes):
        n = prompt + completion
        input_ids[i, :n] = torch.randint(0, vocab, (n,), generator=generator)
        attention_mask[i, :n] = 1
        completion_mask[i, prompt:n] = True
    input_ids[0, shapes[0][0]] = vocab - 1  # the head's last row is scored too
    return input_ids, attention_mask, completion_mask


@torch.no_grad()
def direct_token_logps(model, input_ids, attention_mask, completion_mask):
    """(M,) log-probs of the completion tokens from the model's own logits: full forward with
    the attention mask, log_softmax in fp32, gather; row-major like dpokit's token_logps."""
    first = int(completion_mask.any(dim=0).nonzero()[0])  # first completion column
    keep = input_ids.shape[1] - first + 1  # positions first-1 .. T-1
    logits = model(input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    logp = logits[:, :-1].float().log_softmax(dim=-1)  # position p predicts token p+1
    targets = input_ids[:, first:]
    token_logp = logp.gather(2, targets[..., None]).squeeze(2)
    return token_logp[completion_mask[:, first:]]


def scorer_vs_direct(model, batch, fast_expected: bool) -> None:
    """dpokit's per-token and per-row log-probs on ``batch`` == :func:`direct_token_logps` (1e-5
    relative), on the path dpokit chose itself (``fast_expected``: the chunked head)."""
    scorer = CompletionScorer(model, chunk_size=7)  # fast=None: dpokit picks and checks the path
    with torch.no_grad():
        out = scorer(*batch)
    assert scorer.fast is fast_expected
    expected = direct_token_logps(model, *batch)
    torch.testing.assert_close(out.token_logps, expected, rtol=1e-5, atol=1e-5)
    rows = batch[2][:, 1:].nonzero()[:, 0]
    sums = torch.zeros(batch[0].shape[0]).index_add(0, rows, expected)
    torch.testing.assert_close(out.logps, sums, rtol=1e-5, atol=1e-5)


def test_log_probs_equal_full_logits(built):
    """dpokit's chunked (or, for soft-capped logits, exact) log-probs == the model's own logits,
    on a batch over the whole vocabulary; Gemma-3 also on a row longer than its 512-token
    sliding window (dpokit drops the padding mask of right-padded rows)."""
    model = load_model(str(built.path), torch.float32).eval()
    vocab = built.config.vocab_size
    scorer_vs_direct(model, score_batch(vocab), fast_expected=not built.arch.exact_path)
    window = getattr(built.config, "sliding_window", None)
    layer_types = getattr(built.config, "layer_types", None) or ()
    if window is not None and window <= 1024 and "sliding_attention" in layer_types:
        scorer_vs_direct(model, score_batch(vocab, long_row=window + 20), fast_expected=True)
    if built.arch.exact_path:
        assert_soft_capping_is_what_the_model_does(model, built.config)


@torch.no_grad()
def assert_soft_capping_is_what_the_model_does(model, config) -> None:
    """logits = c * tanh(W h / c) (Gemma-2, c = final_logit_softcapping). Random weights give
    logits far below the cap, so the final norm is scaled up 30x (Gemma's norm multiplies by
    1 + weight): then the chunked head alone (no cap) is off by nats, dpokit's path is not."""
    model.get_decoder().norm.weight.fill_(29.0)
    cap = config.final_logit_softcapping
    batch = score_batch(config.vocab_size)
    input_ids, attention_mask, completion_mask = batch
    hidden = model.get_decoder()(input_ids, attention_mask=attention_mask).last_hidden_state
    weight = model.get_output_embeddings().weight
    logits = model(input_ids, attention_mask=attention_mask).logits
    assert logits.abs().max() > cap / 2  # the cap bends these logits
    torch.testing.assert_close(logits, cap * torch.tanh(hidden @ weight.T / cap))
    scorer_vs_direct(model, batch, fast_expected=False)
    scored = completion_mask[:, 1:]
    uncapped = chunked_token_logps(hidden[:, :-1][scored], weight, input_ids[:, 1:][scored])
    capped = direct_token_logps(model, *batch)
    assert (uncapped - capped).abs().max() > 1.0


# --------------------------------------------------------------------------------------------------
# Training runs through dpokit's own loading path, tokenizer and data file


@dataclass
class Run:
    """What a training run leaves: its metrics records, ``final/`` and the trained logits."""

    history: list[dict]
    final_dir: Path
    trained_logits: torch.Tensor  # (1, T, V) of the policy after the run, on Built.probe


def run_method(built: Built, method: str, out: Path) -> Run:
    """One optimizer step of ``method`` on 2 pairs; LoRA where the family is marked so."""
    config = train_config(
        built.path,
        built.data,
        out / "run",
        out / "cache",
        method=method,
        max_steps=1,
        batch_size=2,
        lora=built.arch.lora,
        # LoRA: the reference is the adapter switched off, online (no weight hashing and
        # pre-computing pass over a GB-sized checkpoint); full fine-tuning: the default
        # (pre-computed for DPO, a frozen copy for TDPO2).
        reference_mode="adapter" if built.arch.lora else "auto",
        seed=0,
    )
    with pytest.MonkeyPatch.context() as patch:  # module scope: conftest's cache fixture is off
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", out / "hf-datasets")
        patch.setenv("DPOKIT_CACHE", str(out / "dpokit-cache"))
        trainer = Trainer(config)
        result = trainer.train()
    policy = trainer.accelerator.unwrap_model(trainer.policy).model.eval()
    with torch.no_grad():
        logits = policy(built.probe).logits.float()
    del trainer, policy
    gc.collect()
    return Run(result.history, result.final_dir, logits)


@pytest.fixture(scope="module")
def dpo_run(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("dpo")
    yield run_method(built, "dpo", out)
    shutil.rmtree(out, ignore_errors=True)  # final/ of a full fine-tune is a GB-sized copy


@pytest.fixture(scope="module")
def tdpo_run(built, tmp_path_factory):
    out = tmp_path_factory.mktemp("tdpo2")
    yield run_method(built, "tdpo2", out)
    shutil.rmtree(out, ignore_errors=True)


def test_dpo_first_loss_is_ln2(dpo_run):
    """ln 2 for the families with dropout in their config too (GPT-2, OPT): disable_dropout."""
    assert dpo_run.history[0]["loss"] == pytest.approx(LN2, abs=1e-6)


def test_saved_model_reloads_to_the_trained_logits(built, dpo_run):
    """``final/`` (a full model, or LoRA adapters over the saved base) loads with
    ``AutoModelForCausalLM.from_pretrained`` and gives the trained policy's logits, which the
    one step moved away from the starting model's."""
    model = AutoModelForCausalLM.from_pretrained(dpo_run.final_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(built.probe).logits.float()
    torch.testing.assert_close(logits, dpo_run.trained_logits, rtol=1e-5, atol=1e-5)
    assert (logits - built.start_logits).abs().max() > 1e-3


def test_tdpo2_runs_with_the_full_vocabulary_kl(tdpo_run):
    record = tdpo_run.history[0]
    assert math.isfinite(record["loss"]) and math.isfinite(record["grad_norm"])
    for side in ("kl/chosen", "kl/rejected"):
        assert math.isfinite(record[side]) and record[side] >= -1e-6  # KL >= 0


def test_tdpo2_first_step_has_zero_kl_and_loss_ln2(tdpo_run):
    record = tdpo_run.history[0]
    assert abs(record["kl/chosen"]) < 1e-4 and abs(record["kl/rejected"]) < 1e-4
    assert record["loss"] == pytest.approx(LN2, abs=1e-6)


# --------------------------------------------------------------------------------------------------
# Sliding windows in every batch layout (narrow models, windows shorter than the rows)

SLIDING = ["mistral-7b", "phi3-mini", "gemma2-2b", "gemma3-1b"]


def narrow_sliding_model(name: str, window: int):
    """The family's published config at width 64, vocabulary 128, 2 layers and ``window``."""
    config = build_config(
        ARCHITECTURES[name],
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        vocab_size=128,
        sliding_window=window,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return build_model(config, seed=3)


def sliding_rows() -> list[dict]:
    """Three pairs whose prompt + completion (12-17 tokens) exceed a 4-token window."""
    generator = torch.Generator().manual_seed(4)

    def ids(n: int, eos: bool = False) -> list[int]:
        return torch.randint(3, 128, (n,), generator=generator).tolist() + [2] * eos

    return [
        {
            "prompt_input_ids": ids(prompt),
            "chosen_input_ids": ids(chosen, eos=True),
            "rejected_input_ids": ids(rejected, eos=True),
            "index": i,
        }
        for i, (prompt, chosen, rejected) in enumerate([(6, 7, 5), (8, 4, 8), (7, 9, 6)])
    ]


def layout_logps(model, packing: str, rows: list[dict]) -> torch.Tensor:
    """dpokit's (2B,) sequence log-probs, chosen then rejected, in batch layout ``packing``."""
    collate = PairCollator(0) if packing == "none" else pair_collator(0, packing)
    batch = collate(rows)
    scorer = CompletionScorer(model, chunk_size=7)
    with torch.no_grad():
        out = scorer(
            batch["input_ids"],
            batch["attention_mask"],
            batch["completion_mask"],
            **scorer_kwargs(batch),
        )
    return out.logps


def model_logps(model, rows: list[dict]) -> torch.Tensor:
    """(2B,) sequence log-probs from the model's own logits, two right-padded rows per pair
    with the attention mask passed (the model applies its own window)."""
    batch = PairCollator(0)(rows)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    tokens = direct_token_logps(model, *args)
    owner = batch["completion_mask"][:, 1:].nonzero()[:, 0]
    return torch.zeros(batch["input_ids"].shape[0]).index_add(0, owner, tokens)


@pytest.mark.parametrize(
    "packing",
    [
        "none",
        "shared_prompt",  # was xfail (issue 12): the packed mask now carries the window
        "padding_free",
    ],
)
@pytest.mark.parametrize("name", SLIDING)
def test_sliding_window_is_kept_in_every_batch_layout(name, packing):
    """A row longer than the window: every layout's log-probs == the model's own, which
    differ from those of the same weights without the window (so the window is exercised)."""
    rows = sliding_rows()
    model = narrow_sliding_model(name, window=4)
    expected = model_logps(model, rows)
    wide = narrow_sliding_model(name, window=64)  # the same weights (same seed), no cut
    assert (model_logps(wide, rows) - expected).abs().max() > 1e-3
    torch.testing.assert_close(layout_logps(model, packing, rows), expected, rtol=1e-5, atol=1e-5)
