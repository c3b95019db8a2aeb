"""Sampling: end tokens of every kind, length-sorted batches in the caller's order, per-batch
seeds that follow the prompts, the model's own generation_config kept out, model mode and global
RNG restored."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from transformers import AddedToken, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from conftest import CORPUS
from dpokit.generation import (
    batch_plan,
    batch_seed,
    cut_at_end,
    encode_prompts,
    end_token_ids,
    ended,
    generate_completions,
    generate_text,
    left_pad,
    strip_end,
)
from dpokit.tiny import build_tiny_model, build_tiny_tokenizer

PROMPTS = ["The quick brown fox", "Hello there! How are", "I like", "good bad great terrible"]
MIXED = ["I like", "The quick brown fox jumps over the lazy", "good", "Hello there! How are you"]


@pytest.fixture()
def prompt_ids(tiny_tokenizer):
    return encode_prompts(tiny_tokenizer, PROMPTS)


def test_left_pad_puts_every_prompt_against_the_right_edge():
    input_ids, attention_mask = left_pad([[5, 6, 7], [8]], pad_token_id=0)
    assert input_ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attention_mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    with pytest.raises(ValueError, match="at least one token"):
        left_pad([[1], []], 0)


def test_cut_at_end_keeps_the_first_end_token_of_any_kind():
    assert cut_at_end([4, 5, 2, 0, 0], 2) == [4, 5, 2]
    assert cut_at_end([4, 2, 7, 2], [2]) == [4, 2]
    assert cut_at_end([4, 9, 7, 2], [2, 9]) == [4, 9]  # the second kind ends it too
    assert cut_at_end([4, 5], [2, 9]) == [4, 5]
    # pad id == an end id (Llama-3 fine-tunes pad with <|end_of_text|>): the first one is the end
    assert cut_at_end([4, 9, 2, 2, 2], [2, 9]) == [4, 9]
    assert cut_at_end([4, 2, 2, 2], [2, 9]) == [4, 2]
    assert ended([4, 9], [2, 9]) and ended([2], [2, 9])
    assert not ended([4, 5], [2, 9]) and not ended([], [2])
    assert strip_end([4, 9], [2, 9]) == [4] and strip_end([4, 5], [2, 9]) == [4, 5]


def _fake_model(generation_eos, config_eos, with_generation_config=True):
    model = SimpleNamespace(generate=None, config=SimpleNamespace(eos_token_id=config_eos))
    if with_generation_config:
        model.generation_config = SimpleNamespace(eos_token_id=generation_eos)
    return model


def test_end_token_ids_are_the_union_of_the_tokenizer_and_the_model():
    tokenizer = SimpleNamespace(eos_token_id=7)
    assert end_token_ids(_fake_model([7, 9], 7), tokenizer) == [7, 9]
    assert end_token_ids(_fake_model([9, 11], 7), tokenizer) == [7, 9, 11]
    assert end_token_ids(_fake_model(9, 7), tokenizer) == [7, 9]  # an int, not a list
    assert end_token_ids(_fake_model(None, [7, 12]), tokenizer) == [7, 12]  # generation: none
    assert end_token_ids(_fake_model(None, 12, False), tokenizer) == [7, 12]  # no generation_config
    assert end_token_ids(_fake_model([3], 5), SimpleNamespace(eos_token_id=None)) == [3]
    with pytest.raises(ValueError, match="end token"):
        end_token_ids(_fake_model(None, None), SimpleNamespace(eos_token_id=None))


def test_batch_plan_sorts_longest_first_ties_by_key():
    lengths = [[0] * n for n in (2, 5, 3, 5, 1)]
    assert batch_plan(lengths, 2) == [[1, 3], [2, 0], [4]]
    # one process's share (batches 0 and 2 of the plan), with its keys: the same batches
    share = [1, 3, 4]
    plan = batch_plan([lengths[i] for i in share], 2, sample_keys=share)
    assert [[share[i] for i in batch] for batch in plan] == [[1, 3], [4]]


def test_sampling_is_deterministic_for_a_seed(tiny_model, tiny_tokenizer, prompt_ids):
    kwargs = dict(max_new_tokens=8, batch_size=2)
    first = generate_completions(tiny_model, tiny_tokenizer, prompt_ids, seed=3, **kwargs)
    again = generate_completions(tiny_model, tiny_tokenizer, prompt_ids, seed=3, **kwargs)
    other = generate_completions(tiny_model, tiny_tokenizer, prompt_ids, seed=4, **kwargs)
    assert first == again
    assert first != other
    assert len(first) == len(PROMPTS)


def test_samples_do_not_depend_on_order_or_the_split_over_processes(tiny_model, tiny_tokenizer):
    """The input order and a split of the plan's batches over processes leave every prompt's
    sample as it was (batches and their seeds follow the keys, not the positions)."""
    ids = encode_prompts(tiny_tokenizer, MIXED * 2)
    kwargs = dict(max_new_tokens=6, seed=5, batch_size=3)
    whole = generate_completions(tiny_model, tiny_tokenizer, ids, **kwargs)
    reverse = list(range(len(ids)))[::-1]
    backwards = generate_completions(
        tiny_model, tiny_tokenizer, [ids[i] for i in reverse], sample_keys=reverse, **kwargs
    )
    assert backwards == [whole[i] for i in reverse]
    plan = batch_plan(ids, 3)  # two "processes" take alternate batches, as SPIN deals them
    for share in ([i for b in plan[0::2] for i in b], [i for b in plan[1::2] for i in b]):
        part = generate_completions(
            tiny_model, tiny_tokenizer, [ids[i] for i in share], sample_keys=share, **kwargs
        )
        assert part == [whole[i] for i in share]
    assert len({tuple(c) for c in whole}) > 1  # samples, not one string repeated


def test_sampling_is_hugging_faces_under_the_batch_seed(tiny_model, tiny_tokenizer):
    """Each batch is Hugging Face's ancestral sampling (temperature, nucleus, no top-k) seeded
    by batch_seed(seed, key of its first prompt): the same tokens as a direct generate call."""
    ids = encode_prompts(tiny_tokenizer, MIXED[:3])
    out = generate_completions(
        tiny_model, tiny_tokenizer, ids, max_new_tokens=5, temperature=0.7, top_p=0.9, seed=11,
        batch_size=1,
    )  # fmt: skip
    eos = tiny_tokenizer.eos_token_id
    for key, prompt in enumerate(ids):
        torch.manual_seed(batch_seed(11, key))
        direct = tiny_model.generate(
            input_ids=torch.tensor([prompt]),
            attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
            do_sample=True, temperature=0.7, top_p=0.9, top_k=0, max_new_tokens=5,
            eos_token_id=eos, pad_token_id=tiny_tokenizer.pad_token_id, use_cache=True,
        )[0, len(prompt) :].tolist()  # fmt: skip
        assert out[key] == cut_at_end(direct, [eos])


def test_greedy_batches_equal_model_generate_one_prompt_at_a_time(tiny_model, tiny_tokenizer):
    """Mixed lengths, sorted into batches: each answer is plain generate() on its prompt alone,
    returned in the caller's order."""
    ids = encode_prompts(tiny_tokenizer, MIXED)
    batched = generate_completions(
        tiny_model, tiny_tokenizer, ids, max_new_tokens=6, do_sample=False, batch_size=3
    )
    eos = tiny_tokenizer.eos_token_id
    for prompt, answer in zip(ids, batched, strict=True):
        out = tiny_model.generate(
            torch.tensor([prompt]), max_new_tokens=6, do_sample=False, eos_token_id=eos,
            pad_token_id=tiny_tokenizer.pad_token_id,
        )  # fmt: skip
        assert answer == cut_at_end(out[0, len(prompt) :].tolist(), eos)


def test_the_models_generation_config_does_not_reshape_the_distribution(tiny_model, tiny_tokenizer):
    """A checkpoint's suppress_tokens / repetition_penalty are not applied: greedy is the argmax
    of the model's logits."""
    (ids,) = encode_prompts(tiny_tokenizer, ["I like"])
    sequence = list(ids)
    for _ in range(8):
        with torch.no_grad():
            sequence.append(int(tiny_model(torch.tensor([sequence])).logits[0, -1].argmax()))
    tiny_model.generation_config.suppress_tokens = [sequence[len(ids)]]
    tiny_model.generation_config.repetition_penalty = 50.0
    (ours,) = generate_completions(
        tiny_model, tiny_tokenizer, [ids], max_new_tokens=8, do_sample=False
    )
    assert ours == cut_at_end(sequence[len(ids) :], tiny_tokenizer.eos_token_id)
    leaked = tiny_model.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False)
    assert leaked[0, len(ids)] != sequence[len(ids)]  # plain generate applies them
    assert tiny_model.generation_config.suppress_tokens == [sequence[len(ids)]]  # restored


def test_global_rng_and_training_mode_are_left_alone(tiny_model, tiny_tokenizer, prompt_ids):
    tiny_model.train()
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    generate_completions(tiny_model, tiny_tokenizer, prompt_ids, max_new_tokens=4, seed=0)
    assert torch.equal(torch.rand(3), expected)
    assert tiny_model.training and all(m.training for m in tiny_model.modules())


def _train_answers(model, prompts: list[list[int]], answers: list[list[int]], pad_id: int):
    """Plain torch, 40 Adam steps: the model answers prompt i with answers[i]."""
    width = max(len(p) + len(a) for p, a in zip(prompts, answers, strict=True))
    input_ids = torch.full((len(prompts), width), pad_id)
    labels = torch.full((len(prompts), width), -100)  # train the answer only
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, (prompt, answer) in enumerate(zip(prompts, answers, strict=True)):
        end = len(prompt) + len(answer)
        input_ids[i, :end] = torch.tensor(prompt + answer)
        labels[i, len(prompt) : end] = torch.tensor(answer)
        attention_mask[i, :end] = 1
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        model(input_ids=input_ids, attention_mask=attention_mask, labels=labels).loss.backward()
        optimizer.step()
        optimizer.zero_grad()


@pytest.fixture(scope="module")
def stopping_model(tiny_dir):
    """The tiny model trained to answer every prompt with " yes." + EOS."""
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    model = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    answer = tokenizer(" yes.", add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    prompts = encode_prompts(tokenizer, PROMPTS)
    _train_answers(model, prompts, [answer] * len(prompts), tokenizer.pad_token_id)
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
    held = generate_completions(
        model, tokenizer, prompts, max_new_tokens=8, min_new_tokens=8, do_sample=False
    )
    assert [len(out) for out in held] == [8] * len(PROMPTS)  # min_new_tokens forbids the EOS


@pytest.fixture(scope="module")
def llama3_style_dir(tmp_path_factory):
    """A Llama-3-style checkpoint: EOS ``</s>`` (<|end_of_text|>) is also the pad token, and
    ``<|eot_id|>`` ends a turn; generation_config lists both. Trained so that the first two
    prompts end with <|eot_id|>, the last two with </s>. Saved and loaded back by the test."""
    path = tmp_path_factory.mktemp("llama3-style")
    tokenizer = build_tiny_tokenizer(CORPUS, vocab_size=400)
    tokenizer.add_tokens([AddedToken("<|eot_id|>", special=True)], special_tokens=True)
    tokenizer.pad_token = tokenizer.eos_token
    model = build_tiny_model(tokenizer)
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=[tokenizer.eos_token_id, eot]
    )
    yes = tokenizer(" yes.", add_special_tokens=False)["input_ids"]
    answers = [yes + [eot]] * 2 + [yes + [tokenizer.eos_token_id]] * 2
    _train_answers(model, encode_prompts(tokenizer, PROMPTS), answers, tokenizer.pad_token_id)
    model.save_pretrained(str(path))
    tokenizer.save_pretrained(str(path))
    return path, answers


def test_generation_stops_on_every_end_token_the_model_declares(llama3_style_dir):
    path, answers = llama3_style_dir
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    model = AutoModelForCausalLM.from_pretrained(str(path))
    eot = tokenizer.convert_tokens_to_ids("<|eot_id|>")
    assert end_token_ids(model, tokenizer) == [tokenizer.eos_token_id, eot]
    assert tokenizer.pad_token_id == tokenizer.eos_token_id
    prompts = encode_prompts(tokenizer, PROMPTS)
    greedy = generate_completions(
        model, tokenizer, prompts, max_new_tokens=12, do_sample=False, batch_size=4
    )
    assert greedy == answers  # stopped at <|eot_id|> (rows 0-1) and at </s> = pad (rows 2-3)
    assert all(ended(out, end_token_ids(model, tokenizer)) for out in greedy)
    assert generate_text(model, tokenizer, PROMPTS, do_sample=False) == [" yes."] * 4
    # The old behaviour, the tokenizer's EOS only: the <|eot_id|> rows run on to the limit.
    old = model.generate(
        torch.tensor([prompts[0]]), max_new_tokens=12, do_sample=False,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )  # fmt: skip
    old_answer = cut_at_end(old[0, len(prompts[0]) :].tolist(), tokenizer.eos_token_id)
    assert old_answer[: len(answers[0])] == answers[0] and len(old_answer) > len(answers[0])


def test_generate_text_decodes(tiny_model, tiny_tokenizer):
    texts = generate_text(tiny_model, tiny_tokenizer, PROMPTS[:2], max_new_tokens=4, seed=0)
    ids = generate_completions(
        tiny_model, tiny_tokenizer, encode_prompts(tiny_tokenizer, PROMPTS[:2]), max_new_tokens=4
    )
    eos = tiny_tokenizer.eos_token_id
    assert texts == tiny_tokenizer.batch_decode([strip_end(t, eos) for t in ids])


def test_bad_arguments_are_refused(tiny_model, tiny_tokenizer, prompt_ids):
    with pytest.raises(ValueError, match="temperature > 0"):
        generate_completions(tiny_model, tiny_tokenizer, prompt_ids, temperature=0.0)
    with pytest.raises(ValueError, match="min_new_tokens"):
        generate_completions(
            tiny_model, tiny_tokenizer, prompt_ids, max_new_tokens=2, min_new_tokens=3
        )
    with pytest.raises(ValueError, match="sample keys"):
        generate_completions(tiny_model, tiny_tokenizer, prompt_ids, sample_keys=[0])


def test_encode_prompts_adds_one_bos_for_llama_style_tokenizers(tiny_bos_dir):
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_bos_dir))
    (ids,) = encode_prompts(tokenizer, ["I like"])
    assert ids[0] == tokenizer.bos_token_id and ids[1] != tokenizer.bos_token_id
    assert ids[1:] == tokenizer("I like", add_special_tokens=False)["input_ids"]
