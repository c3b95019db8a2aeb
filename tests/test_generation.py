"""Sampling: seeded, left-padded batches, stopped at EOS, model mode and global RNG restored."""

from __future__ import annotations

import pytest
import torch

from dpokit.generation import (
    cut_at_eos,
    encode_prompts,
    generate_completions,
    generate_text,
    left_pad,
)

PROMPTS = ["The quick brown fox", "Hello there! How are", "I like", "good bad great terrible"]


@pytest.fixture()
def prompt_ids(tiny_tokenizer):
    return encode_prompts(tiny_tokenizer, PROMPTS)


def test_left_pad_puts_every_prompt_against_the_right_edge():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)


def test_cut_at_eos_keeps_the_first_eos_and_drops_the_rest():
    assert cut_at_eos([4, 5, 2, 0, 0], eos_token_id=2) == [4, 5, 2]
    assert cut_at_eos([4, 2, 7, 2], eos_token_id=2) == [4, 2]
    assert cut_at_eos([4, 5], eos_token_id=2) == [4, 5]


def test_sampling_is_deterministic_for_a_seed(tiny_model, tiny_tokenizer, prompt_ids):
    kwargs = dict(max_new_tokens=8, batch_size=2)
    first = generate_completions(tiny_model, tiny_tokenizer, prompt_ids, seed=3, **kwargs)
    again = generate_completions(tiny_model, tiny_tokenizer, prompt_ids, seed=3, **kwargs)
    other = generate_completions(tiny_model, tiny_tokenizer, prompt_ids, seed=4, **kwargs)
    assert first == again
    assert first != other
    assert len(first) == len(PROMPTS)


def test_global_rng_and_training_mode_are_left_alone(tiny_model, tiny_tokenizer, prompt_ids):
    tiny_model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_completions(tiny_model, tiny_tokenizer, prompt_ids, max_new_tokens=4, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())


@pytest.fixture(scope="module")
def stopping_model(tiny_dir):
    """The tiny model trained (plain torch, 30 steps) to answer every prompt with " yes." + EOS."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    answer = tokenizer(" yes.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompts = encode_prompts(tokenizer, PROMPTS)
    width = max(len(p) for p in prompts) + len(answer)
    input_ids = torch.full((len(prompts), width), tokenizer.pad_token_id)
    labels = torch.full((len(prompts), width), -100)  # train the answer only
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, prompt in enumerate(prompts):
        end = len(prompt) + len(answer)
        input_ids[i, :end] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : end] = torch.tensor(answer)
        attention_mask[i, :end] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(30):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return model, tokenizer, answer


def test_generation_stops_at_eos_without_padding(stopping_model):
    model, tokenizer, answer = stopping_model
    prompts = encode_prompts(tokenizer, PROMPTS)
    greedy = generate_completions(
        model, tokenizer, prompts, max_new_tokens=12, do_sample=False, batch_size=4
    )
    assert greedy == [answer] * len(PROMPTS)  # stopped at EOS, not padded to 12 tokens
    sampled = generate_completions(model, tokenizer, prompts * 4, max_new_tokens=12, seed=0)
    eos = tokenizer.eos_token_id
    for out in sampled:
        assert eos not in out[:-1]  # nothing after the first EOS
        assert out[-1] == eos or len(out) == 12
    assert sum(out[-1] == eos for out in sampled) >= len(sampled) // 2


def test_greedy_batches_match_single_prompts(tiny_model, tiny_tokenizer, prompt_ids):
    """Left padding must not change what a prompt generates."""
    batched = generate_completions(
        tiny_model, tiny_tokenizer, prompt_ids, max_new_tokens=6, do_sample=False, batch_size=4
    )
    for ids, expected in zip(prompt_ids, batched, strict=True):
        alone = generate_completions(
            tiny_model, tiny_tokenizer, [ids], max_new_tokens=6, do_sample=False
        )
        assert alone == [expected]


def test_generate_text_decodes(tiny_model, tiny_tokenizer):
    texts = generate_text(tiny_model, tiny_tokenizer, PROMPTS[:2], max_new_tokens=4, seed=0)
    ids = generate_completions(
        tiny_model, tiny_tokenizer, encode_prompts(tiny_tokenizer, PROMPTS[:2]), max_new_tokens=4
    )
    assert texts == tiny_tokenizer.batch_decode(ids, skip_special_tokens=True)


def test_encode_prompts_adds_one_bos_for_llama_style_tokenizers(tiny_bos_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bos_dir))
    (ids,) = encode_prompts(tokenizer, ["I like"])
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids[1:] == tokenizer("I like", add_special_tokens=False)["input_ids"]
