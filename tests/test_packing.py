"""Packed layouts of pairs (shared prompt, padding-free), the saved-softmax LM head, length-grouped
batching: exact layouts by hand, log-probs and gradients equal to the two-row form, and training
runs whose first steps agree with the default layout."""

from __future__ import annotations

import json
import math
import random
import types

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from dpokit.config import ConfigError, TrainConfig
from dpokit.data import PairCollator
from dpokit.data.packing import (
    AutoPairCollator,
    LengthGroupedSampler,
    PaddingFreeCollator,
    SharedPromptCollator,
    first_fit_decreasing,
    packed_attention_masks,
    packed_window_problem,
    padding_fraction,
    pair_collator,
    row_lengths,
)
from dpokit.engine import Trainer
from dpokit.logprobs import (
    CompletionScorer,
    SoftmaxWorkspace,
    chunked_token_logps,
    packed_attention_mask,
    scorer_kwargs,
)
from dpokit.logprobs.scorer import _right_padded
from dpokit.metrics import read_metrics
from dpokit.tiny import build_tiny_model

ROWS = [  # two pairs with prompts of 3 and 1 tokens
    {
        "prompt_input_ids": [5, 6, 7],
        "chosen_input_ids": [8, 9],
        "rejected_input_ids": [10],
        "index": 0,
    },
    {
        "prompt_input_ids": [11],
        "chosen_input_ids": [12],
        "rejected_input_ids": [13, 14, 15],
        "index": 1,
    },
]


# --------------------------------------------------------------------------------------------------
# Layouts, by hand


def test_shared_prompt_layout_by_hand():
    batch = SharedPromptCollator(pad_token_id=0)(ROWS)
    # pair 0: prefix [5, 6] | 7 8 9 (chosen branch) | 7 10 (rejected branch); 7 tokens
    # pair 1: empty prefix  | 11 12                | 11 13 14 15;               6 tokens + 1 pad
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 7, 10], [11, 12, 11, 13, 14, 15, 0]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 2, 3], [0, 1, 0, 1, 2, 3, 0]]
    assert batch["branch_ids"].tolist() == [[0, 0, 1, 1, 1, 2, 2], [1, 1, 2, 2, 2, 2, 0]]
    assert batch["segment_ids"].tolist() == [[0] * 7, [0] * 6 + [-1]]
    assert batch["attention_mask"].tolist() == [[1] * 7, [1] * 6 + [0]]
    # chosen sequences are 0..B-1, rejected B..2B-1, as rows are in the two-row form
    assert batch["sequence_ids"].tolist() == [[-1, -1, -1, 0, 0, -1, 2], [-1, 1, -1, 3, 3, 3, -1]]
    assert batch["completion_mask"].tolist() == (batch["sequence_ids"] >= 0).tolist()
    assert batch["index"].tolist() == [0, 1]


def test_padding_free_layout_by_hand():
    batch = PaddingFreeCollator(pad_token_id=0)(ROWS)  # sequences: 5, 2, 4, 4 tokens -> 1 row
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12, 5, 6, 7, 10, 11, 13, 14, 15]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]]
    assert batch["sequence_ids"].tolist() == [[-1, -1, -1, 0, 0, -1, 1, -1, -1, -1, 2, -1, 3, 3, 3]]
    assert batch["segment_ids"].tolist() == [[0] * 5 + [1] * 2 + [2] * 4 + [3] * 4]
    assert not batch["branch_ids"].any() and batch["attention_mask"].all()
    assert padding_fraction(batch) == 0.0
    # Rows of at most 6 tokens, longest first: [5] [4, 2] [4] -> 3 rows of 6, 3 of 18 slots padding
    rows = PaddingFreeCollator(pad_token_id=0, packing_length=6)(ROWS)
    assert rows["input_ids"].tolist() == [
        [5, 6, 7, 8, 9, 0],
        [11, 12, 5, 6, 7, 10],
        [11, 13, 14, 15, 0, 0],
    ]
    assert rows["sequence_ids"].tolist() == [
        [-1, -1, -1, 0, 0, -1],
        [-1, 1, -1, -1, -1, 2],
        [-1, 3, 3, 3, -1, -1],
    ]
    assert padding_fraction(rows) == pytest.approx(3 / 18)
    assert first_fit_decreasing([5, 2, 4, 4], 6) == [[0], [1, 2], [3]]
    assert first_fit_decreasing([9, 1], 6) == [[0], [1]]  # an oversized item gets its own bin


def test_two_row_padding_fraction_by_hand():
    batch = PairCollator(pad_token_id=0)(ROWS)  # lengths 5, 2, 4, 4 padded to 5: 5 of 20 slots
    assert padding_fraction(batch) == pytest.approx(5 / 20)


def test_right_padded_rows_run_without_a_mask(tiny_model):
    """Two-row batches are right-padded: causal attention alone hides the padding, so the model
    gets no mask (its causal kernel); any other 2D mask is passed on."""
    right = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0]])
    left = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    assert _right_padded(right) and not _right_padded(left)
    scorer = CompletionScorer(tiny_model, fast=True)
    assert scorer._model_kwargs(right, None, None, None)["attention_mask"] is None
    assert scorer._model_kwargs(left, None, None, None)["attention_mask"] is left
    positions = torch.arange(4).expand(3, 4)
    assert scorer._model_kwargs(right, positions, None, None)["attention_mask"] is right


def test_packed_attention_mask_by_hand():
    segments = torch.tensor([[0, 0, 0, 0, 0, -1]])
    branches = torch.tensor([[0, 1, 1, 2, 2, 0]])
    mask = packed_attention_mask(segments, branches)[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0],  # shared prefix
        [1, 1, 0, 0, 0, 0],  # branch 1 sees the prefix and itself
        [1, 1, 1, 0, 0, 0],
        [1, 0, 0, 1, 0, 0],  # branch 2 never sees branch 1
        [1, 0, 0, 1, 1, 0],
        [0, 0, 0, 0, 0, 1],  # padding sees only itself: no empty softmax row
    ]
    # Without branches: block-diagonal causal (padding-free sequences)
    blocks = packed_attention_mask(torch.tensor([[0, 0, 1, 1]]))[0, 0].int().tolist()
    assert blocks == [[1, 0, 0, 0], [1, 1, 0, 0], [0, 0, 1, 0], [0, 0, 1, 1]]


# --------------------------------------------------------------------------------------------------
# Exact log-probs and gradients against the two-row form


def _random_rows(vocab: int, pairs: int = 4, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)

    def ids(low, high):
        return [rng.randrange(4, vocab) for _ in range(rng.randint(low, high))]

    rows = [
        {
            "prompt_input_ids": ids(1, 7),
            "chosen_input_ids": ids(1, 9),
            "rejected_input_ids": ids(1, 9),
        }
        for _ in range(pairs)
    ]
    rows[0]["prompt_input_ids"] = rows[0]["prompt_input_ids"][:1]  # a one-token prompt
    return [dict(row, index=i) for i, row in enumerate(rows)]


def _score(model, collate, rows):
    """Per-sequence log-probs (2B,), token counts and parameter gradients of a weighted sum."""
    batch = collate(rows)
    model.zero_grad()
    scorer = CompletionScorer(model, chunk_size=5, fast=True, saved_softmax_mb=1)
    out = scorer(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),
    )
    weights = torch.linspace(-1.0, 2.0, out.logps.shape[0])  # a different gradient per sequence
    (out.logps * weights).sum().backward()
    return out.logps.detach(), out.token_counts, [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize(
    "arch, attention, packing",
    [
        ("llama", "sdpa", "shared_prompt"),
        ("llama", "sdpa", "padding_free"),
        ("llama", "eager", "shared_prompt"),
        ("qwen2", "sdpa", "shared_prompt"),
        ("qwen2", "sdpa", "padding_free"),
    ],
)
def test_packed_logps_and_gradients_equal_two_rows(tiny_tokenizer, arch, attention, packing):
    model = build_tiny_model(tiny_tokenizer, arch=arch, seed=1)
    model.config._attn_implementation = attention
    rows = _random_rows(len(tiny_tokenizer))
    two_rows = _score(model, PairCollator(tiny_tokenizer.pad_token_id), rows)
    packed = _score(model, pair_collator(tiny_tokenizer.pad_token_id, packing), rows)
    torch.testing.assert_close(packed[0], two_rows[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(packed[1], two_rows[1])  # the same completion tokens, in the same order
    for got, want in zip(packed[2], two_rows[2], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_flash_attention_gets_position_ids_only_and_refuses_branches(tiny_model):
    tiny_model.config._attn_implementation = "flash_attention_2"
    scorer = CompletionScorer(tiny_model, fast=True)
    free = PaddingFreeCollator(0)(ROWS)
    kwargs = scorer._model_kwargs(
        free["attention_mask"], free["position_ids"], free["segment_ids"], free["branch_ids"]
    )
    assert kwargs["attention_mask"] is None and kwargs["position_ids"] is free["position_ids"]
    shared = SharedPromptCollator(0)(ROWS)
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        scorer._model_kwargs(
            shared["attention_mask"],
            shared["position_ids"],
            shared["segment_ids"],
            shared["branch_ids"],
        )


def test_saved_softmax_gives_the_same_log_probs_and_gradients():
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(10, 8, generator=g, requires_grad=True)
    weight = torch.randn(50, 8, generator=g, requires_grad=True)
    bias = torch.randn(50, generator=g, requires_grad=True)
    targets = torch.randint(0, 50, (10,), generator=g)
    weights = torch.randn(10, generator=g)
    results = []
    for save_rows in (0, 4, 10):  # none saved; the first chunk of 4; all (chunks 4, 4, 2)
        out = chunked_token_logps(hidden, weight, targets, bias, chunk_size=4, save_rows=save_rows)
        grads = torch.autograd.grad((out * weights).sum(), (hidden, weight, bias))
        results.append((out.detach(), grads))
    for out, grads in results[1:]:
        torch.testing.assert_close(out, results[0][0], rtol=0, atol=0)  # forward is the same code
        for a, b in zip(grads, results[0][1], strict=True):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # The saved softmax is consumed by backward: a second backward fails instead of reusing it.
    out = chunked_token_logps(hidden, weight, targets, bias, chunk_size=4, save_rows=10)
    out.sum().backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    with pytest.raises(ValueError):
        chunked_token_logps(hidden, weight, targets, save_rows=-1)


def test_softmax_workspace_is_reused_and_never_shared_between_live_graphs():
    g = torch.Generator().manual_seed(1)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (6,), generator=g)
    expected = chunked_token_logps(hidden, weight, targets, chunk_size=4)
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    workspace = SoftmaxWorkspace()

    def run():
        return chunked_token_logps(hidden, weight, targets, None, 4, 6, workspace)

    first = run()
    held = workspace._buffer
    assert held is not None and held.shape == (6, 40)
    second = run()  # the first graph still holds the buffer: this one gets fresh memory
    assert workspace._buffer is held
    for out in (first, second):  # both backward correctly: nothing was overwritten
        torch.testing.assert_close(out, expected)
        grads = torch.autograd.grad(out.sum(), (hidden, weight))
        for got, want in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    buffer = workspace._buffer
    third = run()  # given back by backward: the same memory again
    assert workspace._buffer is buffer
    del third  # a graph freed without a backward gives it back too
    fourth = run()
    assert workspace._buffer is buffer
    torch.testing.assert_close(fourth, expected)


# --------------------------------------------------------------------------------------------------
# Training runs


@pytest.fixture(scope="module")
def varied_pairs(tmp_path_factory):
    """Pairs with prompts and completions of varied lengths (so layouts really differ)."""
    rng = random.Random(0)
    words = ["apples", "bananas", "the fox", "the dog", "today", "France", "Paris", "good", "bad"]
    path = tmp_path_factory.mktemp("packing-data") / "pairs.jsonl"
    with open(path, "w") as handle:
        for _ in range(16):
            prompt = "Human: " + " ".join(rng.choices(words, k=rng.randint(1, 6))) + "? Assistant:"
            chosen = " yes " + " ".join(rng.choices(words, k=rng.randint(1, 8)))
            rejected = " no " + " ".join(rng.choices(words, k=rng.randint(1, 8)))
            handle.write(
                json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}) + "\n"
            )
    return str(path)


def _config(tiny_dir, data, tmp_path, name, **overrides) -> TrainConfig:
    values = dict(
        model=str(tiny_dir),
        data=data,
        output_dir=str(tmp_path / name),
        reference_cache_dir=str(tmp_path / f"cache-{name}"),
        batch_size=4,
        learning_rate=1e-3,
        warmup_ratio=0.0,
        lr_scheduler="constant",
        max_steps=2,
        max_length=64,
        max_prompt_length=32,
        progress=False,
        shuffle=False,
    )
    values.update(overrides)
    return TrainConfig.from_dict(values)


@pytest.mark.parametrize("method", ["dpo", "tdpo1"])  # pre-computed and online (frozen) reference
def test_training_with_each_packing_matches_the_two_row_layout(
    method, tiny_dir, varied_pairs, tmp_path
):
    runs = {}
    for packing in ("none", "shared_prompt", "padding_free", "auto"):
        trainer = Trainer(
            _config(tiny_dir, varied_pairs, tmp_path, packing, method=method, packing=packing)
        )
        runs[packing] = trainer.train().history
    keys = ("loss", "logps/chosen", "logps/rejected")
    for packing in ("shared_prompt", "padding_free", "auto"):
        for step in (0, 1):  # step 1's loss also checks the gradients and the optimizer step
            for key in keys:
                assert runs[packing][step][key] == pytest.approx(runs["none"][step][key], rel=1e-5)
    # What each layout costs in padding: the packed ones need less
    padding = {p: runs[p][0]["padding_fraction"] for p in ("none", "shared_prompt", "padding_free")}
    assert padding["padding_free"] == 0.0 < padding["shared_prompt"] < padding["none"]


def test_padding_fraction_is_logged(tiny_dir, varied_pairs, tmp_path):
    config = _config(tiny_dir, varied_pairs, tmp_path, "log", packing="none", max_steps=1)
    trainer = Trainer(config)
    first_batch = next(iter(trainer.train_loader))
    expected = padding_fraction(first_batch)
    assert 0.0 < expected < 1.0
    trainer.train()
    record = read_metrics(trainer.output_dir)[0]
    assert record["padding_fraction"] == pytest.approx(expected)


def test_auto_layout_picks_the_cheaper_per_batch(tiny_dir, varied_pairs, tmp_path):
    # Tiny Llama: hidden 32, 4 heads of 8, 2 KV heads, MLP 64. Weights per layer:
    # 2*32*32 (q, o) + 2*32*16 (k, v) + 3*32*64 (MLP) = 9216; attention: 4*32 / (2*9216) = 1/144.
    trainer = Trainer(_config(tiny_dir, varied_pairs, tmp_path, "auto", max_steps=1))
    assert trainer.packing == "auto" and isinstance(trainer.collate, AutoPairCollator)
    assert trainer.collate.attention_cost == pytest.approx(1 / 144)

    def rows(p, c, r):
        ids = {
            "prompt_input_ids": [5] * p,
            "chosen_input_ids": [6] * c,
            "rejected_input_ids": [7] * r,
        }
        return [dict(ids, index=0), dict(ids, index=1)]

    # prompt 10, completions 2: two rows 2*(12 + 12^2/144) = 26 per pair > shared 15 + 15^2/144
    long_prompt = rows(10, 2, 2)
    assert trainer.collate.prefers_shared(long_prompt)
    assert "branch_ids" in trainer.collate(long_prompt)
    # prompt 1, completions 20, attention cost 0.01: 2*(21 + 4.41) = 50.82 < 42 + 17.64 = 59.64
    short_prompt = rows(1, 20, 20)
    assert not AutoPairCollator(0, attention_cost=0.01).prefers_shared(short_prompt)
    assert AutoPairCollator(0, attention_cost=0.01)(short_prompt)["input_ids"].shape == (4, 21)


# --------------------------------------------------------------------------------------------------
# Length-grouped batching


def test_length_grouped_sampler():
    rng = random.Random(1)
    lengths = [rng.randint(1, 100) for _ in range(40)]
    sampler = LengthGroupedSampler(lengths, batch_size=4, seed=3, mega_batches=5)
    order = list(sampler)
    assert sorted(order) == list(range(40)) and order == list(sampler)  # a permutation, repeatable
    sampler.set_epoch(1)
    assert list(sampler) != order  # another shuffle each epoch
    batches = [order[i : i + 4] for i in range(0, 40, 4)]
    assert max(lengths[i] for i in batches[0]) == max(lengths)  # the longest batch comes first

    def waste(batches):
        return sum(
            max(lengths[i] for i in b) * len(b) - sum(lengths[i] for i in b) for b in batches
        )

    shuffled = list(range(40))
    random.Random(3).shuffle(shuffled)
    assert waste(batches) < waste([shuffled[i : i + 4] for i in range(0, 40, 4)]) / 2


def test_group_by_length_trains(tiny_dir, varied_pairs, tmp_path):
    config = _config(
        tiny_dir,
        varied_pairs,
        tmp_path,
        "grouped",
        packing="none",
        group_by_length=True,
        shuffle=True,
    )
    trainer = Trainer(config)
    # The loader hands out the sampler's order: similar lengths together, the longest batch first.
    expected = list(LengthGroupedSampler(row_lengths(trainer.train_data.dataset), 4, config.seed))
    got = [i for batch in trainer.train_loader for i in batch["index"].tolist()]
    assert got == expected
    history = trainer.train().history
    assert len(history) == 2 and all(math.isfinite(r["loss"]) for r in history)


# --------------------------------------------------------------------------------------------------
# Configuration


def test_packing_config_validation(tiny_dir, varied_pairs, tmp_path):
    with pytest.raises(ConfigError, match="packing"):
        _config(tiny_dir, varied_pairs, tmp_path, "bad", packing="rows")
    with pytest.raises(ConfigError, match="packing_length"):
        _config(tiny_dir, varied_pairs, tmp_path, "bad", packing="none", packing_length=64)
    with pytest.raises(ConfigError, match="packing_length"):
        _config(tiny_dir, varied_pairs, tmp_path, "bad", packing="padding_free", packing_length=0)
    with pytest.raises(ConfigError, match="logps_saved_softmax_mb"):
        _config(tiny_dir, varied_pairs, tmp_path, "bad", logps_saved_softmax_mb=-1)
    # KTO's unpaired rows are collated one way only: a packed layout is refused before loading
    with pytest.raises(ConfigError, match="packing=shared_prompt needs preference pairs"):
        Trainer(
            _config(tiny_dir, varied_pairs, tmp_path, "kto", method="kto", packing="shared_prompt")
        )


# Sliding windows (issue 12): the packed mask carries the window, or the layout is refused.
def test_windowed_packed_mask_by_hand():
    segments, positions = torch.tensor([[0, 0, 0, 0, 1, 1]]), torch.tensor([[0, 1, 2, 3, 0, 1]])
    mask = packed_attention_mask(segments, None, positions, window=2)[0, 0].int()
    expected = [[1, 0, 0, 0, 0, 0], [1, 1, 0, 0, 0, 0], [0, 1, 1, 0, 0, 0]]
    expected += [[0, 0, 1, 1, 0, 0], [0, 0, 0, 0, 1, 0], [0, 0, 0, 0, 1, 1]]
    assert mask.tolist() == expected  # query i sees keys at positions i-1 and i of its sequence


def _qwen2(window: int):
    """Qwen2 with its window on layer 1 only (max_window_layers=1): a per-layer-type mask dict."""
    config = Qwen2Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
        sliding_window=window, max_window_layers=1, attn_implementation="sdpa",
    )  # fmt: skip
    torch.manual_seed(5)
    return Qwen2ForCausalLM(config).eval()


@pytest.mark.parametrize("packing", ["shared_prompt", "padding_free"])
def test_packed_layouts_keep_a_sliding_window(packing):
    rows = _random_rows(64, pairs=3, seed=2)  # sequences longer than the 3-token window
    model, wide = _qwen2(3), _qwen2(64)
    assert model.config.layer_types == ["full_attention", "sliding_attention"]
    two_rows = _score(model, PairCollator(0), rows)[0]
    assert (two_rows - _score(wide, PairCollator(0), rows)[0]).abs().max() > 1e-3
    packed = _score(model, pair_collator(0, packing), rows)[0]
    torch.testing.assert_close(packed, two_rows, rtol=1e-5, atol=1e-5)


def test_unverified_sliding_window_family_is_refused():
    config = types.SimpleNamespace(model_type="starcoder2", sliding_window=4)
    problem = packed_window_problem("shared_prompt", config, longest=9)
    assert "window of 4 tokens" in problem and "9 tokens" in problem
    assert packed_window_problem("shared_prompt", config, longest=4) is None  # no cut
    assert packed_window_problem("none", config, longest=9) is None
    assert packed_window_problem("padding_free", _qwen2(3).config, longest=9) is None  # masked
    segments, positions = torch.zeros(1, 6, dtype=torch.long), torch.arange(6)[None]
    with pytest.raises(ValueError, match="window of 4 tokens"):
        packed_attention_masks(config, segments, None, positions)
