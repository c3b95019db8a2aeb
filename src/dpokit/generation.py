"""Sampling completions from a causal LM: length-sorted batches, stopped at any end token.

On-policy data (the demo's pairs, SPIN's opponent answers, SLiC's reference samples) and evaluation
(judge reward, win rate, KL on samples) all draw completions here. Prompts arrive as token ids
exactly as the data pipeline built them (BOS included when the tokenizer uses one), so a sample is
scored on the same tokens it was generated from.

End tokens: a model may declare several (Llama-3: ``<|end_of_text|>`` and ``<|eot_id|>`` in
``generation_config.eos_token_id``); generation stops a row on any of them
(:func:`end_token_ids`), and a completion is cut after the first.

Sampling is Hugging Face's (``do_sample``: softmax at a temperature, nucleus ``top_p``, no
top-k), in length-sorted batches (less padding) seeded per batch from ``(seed, the key of the
batch's first prompt)`` (:func:`batch_plan`, :func:`batch_seed`): the plan and its seeds do not
depend on the input order or on how the batches are split over processes, so any split samples
what one process would.

Only Hugging Face ``generate`` is used. A faster engine (vLLM) would have to meet the contract of
:func:`generate_completions` -- token ids in, one completion per prompt in the caller's order, cut
after the first of :func:`end_token_ids`, the same ancestral sampling -- and would not reproduce
these samples token for token (its random streams are its own); none is shipped (untested here).
"""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Collection, Sequence

import torch
from tqdm.auto import tqdm
from transformers import GenerationConfig

from dpokit.data.config import DataConfig
from dpokit.data.tokenization import PairEncoder


def _unwrap_generator(model):
    """The object with ``.generate``: the model itself, or the model inside a CompletionScorer."""
    if hasattr(model, "generate"):
        return model
    inner = getattr(model, "model", None)
    if inner is not None and hasattr(inner, "generate"):
        return inner
    raise TypeError(f"{type(model).__name__} has no generate() method")


@contextlib.contextmanager
def _eval_mode(model):
    """Eval mode (no dropout) for the duration; every submodule's own mode is restored."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


@contextlib.contextmanager
def _only_settings(model, settings: GenerationConfig):
    """``model.generation_config`` is ``settings`` for the duration, then restored.

    ``generate`` fills every setting left unset (None) from the model's own generation_config, so
    a checkpoint's ``repetition_penalty``, ``min_p``, ``suppress_tokens``, ``no_repeat_ngram_size``
    ... would otherwise reshape the distribution that on-policy methods assume they sample.
    """
    saved = model.generation_config
    model.generation_config = settings
    try:
        yield
    finally:
        model.generation_config = saved


def _as_ids(value) -> list[int]:
    """An id, a list of ids or None, as a list."""
    if value is None:
        return []
    if isinstance(value, int):
        return [value]
    return [int(v) for v in value]


def end_token_ids(model, tokenizer) -> list[int]:
    """Every token that ends a completion: the tokenizer's EOS first, then each id of the model's
    ``generation_config.eos_token_id`` (an int or a list; ``config.eos_token_id`` when the model
    has no generation_config or it names none), without repeats.

    Raises ``ValueError`` when there is none at all (generation could never stop).
    """
    generator = _unwrap_generator(model)
    declared = _as_ids(getattr(getattr(generator, "generation_config", None), "eos_token_id", None))
    if not declared:
        declared = _as_ids(getattr(getattr(generator, "config", None), "eos_token_id", None))
    ends = list(dict.fromkeys(_as_ids(tokenizer.eos_token_id) + declared))
    if not ends:
        raise ValueError("neither the tokenizer nor the model declares an end token (eos)")
    return ends


def _end_set(end_token_ids: int | Collection[int]) -> Collection[int]:
    return {end_token_ids} if isinstance(end_token_ids, int) else set(end_token_ids)


def cut_at_end(tokens: list[int], end_token_ids: int | Collection[int]) -> list[int]:
    """The tokens up to and including the first end token of any kind (all when there is none).

    Padding after it is dropped even when the pad id is itself an end id: only the first counts.
    """
    ends = _end_set(end_token_ids)
    for i, token in enumerate(tokens):
        if token in ends:
            return tokens[: i + 1]
    return tokens


def ended(tokens: list[int], end_token_ids: int | Collection[int]) -> bool:
    """Whether a completion cut by :func:`cut_at_end` stopped at an end token (False: it ran
    into ``max_new_tokens``)."""
    return bool(tokens) and tokens[-1] in _end_set(end_token_ids)


def strip_end(tokens: list[int], end_token_ids: int | Collection[int]) -> list[int]:
    """The completion without its end token, for decoding: an end id the tokenizer does not mark
    special would otherwise appear in the text."""
    return tokens[:-1] if ended(tokens, end_token_ids) else tokens


def left_pad(
    prompt_input_ids: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every row's last prompt token sits in the last column.

    Returns ``input_ids`` (B, P) and ``attention_mask`` (B, P), 0 on the padding. Raises
    ``ValueError`` for an empty prompt.
    """
    if any(len(ids) == 0 for ids in prompt_input_ids):
        raise ValueError("every prompt needs at least one token to generate from")
    width = max(len(ids) for ids in prompt_input_ids)
    input_ids = torch.full((len(prompt_input_ids), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompt_input_ids), width), dtype=torch.long)
    for i, ids in enumerate(prompt_input_ids):
        input_ids[i, width - len(ids) :] = torch.as_tensor(ids, dtype=torch.long)
        attention_mask[i, width - len(ids) :] = 1
    return input_ids, attention_mask


def batch_plan(
    prompt_input_ids: Sequence[Sequence[int]],
    batch_size: int,
    sample_keys: Sequence[int] | None = None,
) -> list[list[int]]:
    """Positions of the prompts, batch by batch: longest prompt first, ties by sample key.

    Sorting makes a batch's prompts of similar length (little left padding, in the prompt pass
    and in every cached decoding step); longest first puts the most memory-hungry batch first, so
    an out-of-memory error comes at once, not at the end. Keyed ties make the plan of any subset
    that is a union of this plan's batches (one process's share) those same batches.
    """
    keys = range(len(prompt_input_ids)) if sample_keys is None else sample_keys
    order = sorted(range(len(prompt_input_ids)), key=lambda i: (-len(prompt_input_ids[i]), keys[i]))
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def batch_seed(seed: int, key: int) -> int:
    """The torch seed of the batch whose first prompt has sample key ``key`` (63 bits of
    SHA-256 of both: batches of one call, and calls of nearby seeds, do not share streams)."""
    digest = hashlib.sha256(f"dpokit-sample:{seed}:{key}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def _settings(
    max_new_tokens: int,
    min_new_tokens: int,
    ends: list[int],
    pad_id: int,
    bos_id,
    sampling: tuple[float, float] | None,
) -> GenerationConfig:
    """KV-cached generation stopping on every end id: greedy, or for ``sampling`` =
    (temperature, top_p) plain ancestral sampling (no top-k, no repetition penalty)."""
    temperature, top_p = sampling or (None, None)
    return GenerationConfig(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens or None,
        do_sample=sampling is not None,
        temperature=temperature,
        top_p=top_p,
        top_k=0 if sampling is not None else None,
        eos_token_id=ends,
        pad_token_id=pad_id,
        bos_token_id=bos_id,
        use_cache=True,
    )


def generate_completions(
    model,
    tokenizer,
    prompt_input_ids: list[list[int]],
    *,
    max_new_tokens: int = 64,
    min_new_tokens: int = 0,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    do_sample: bool = True,
    sample_keys: Sequence[int] | None = None,
    progress: str | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt; returns completion token ids, in the prompts' order.

    Each completion ends with the first end token (:func:`end_token_ids`: the tokenizer's EOS and
    every EOS the model declares) if the model emitted one within ``max_new_tokens``: nothing
    after it, no padding. ``min_new_tokens`` forbids the end tokens before that many (benchmarks).
    Sampling is plain ancestral sampling from softmax(logits / temperature), nucleus-truncated at
    ``top_p`` (no top-k, no repetition penalty, nothing from the model's generation_config: the
    samples follow the model's own distribution, which on-policy methods assume).
    ``do_sample=False`` is greedy.

    Prompts are generated in length-sorted batches of ``batch_size`` (:func:`batch_plan`),
    left-padded, with the KV cache; results come back in the prompts' order. Each batch is
    seeded by :func:`batch_seed` from ``seed`` and the sample key of its first prompt
    (``sample_keys``, default: the prompts' positions), so the samples do not depend on the input
    order, and a process handed a union of the plan's batches (with their keys) samples exactly
    what the whole call would for them. They do depend on ``batch_size``. The global RNG is
    forked (callers' random state is untouched); the model is put in eval mode and restored
    afterwards. ``progress``: the label of a progress bar over the batches (None: no bar).

    Raises ``ValueError`` for ``batch_size`` or ``max_new_tokens`` < 1, ``min_new_tokens`` above
    ``max_new_tokens``, sampling at temperature <= 0, keys that are not one per prompt, an empty
    prompt, or no end token.
    """
    if batch_size < 1 or max_new_tokens < 1 or not 0 <= min_new_tokens <= max_new_tokens:
        raise ValueError("need batch_size, max_new_tokens >= 1 and 0 <= min_new_tokens <= max")
    if do_sample and temperature <= 0:
        raise ValueError(f"sampling needs temperature > 0 (got {temperature}); use greedy")
    keys = list(range(len(prompt_input_ids)) if sample_keys is None else sample_keys)
    if len(keys) != len(prompt_input_ids):
        raise ValueError(f"{len(keys)} sample keys for {len(prompt_input_ids)} prompts")
    generator = _unwrap_generator(model)
    ends = end_token_ids(generator, tokenizer)
    # No pad token: pad with an end id; a row's first end token is still its real end.
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else ends[0]
    sampling = (temperature, top_p) if do_sample else None
    settings = _settings(
        max_new_tokens, min_new_tokens, ends, pad_id, tokenizer.bos_token_id, sampling
    )
    device = next(generator.parameters()).device
    completions: list[list[int]] = [[] for _ in prompt_input_ids]
    plan = batch_plan(prompt_input_ids, batch_size, keys)
    devices = [device] if device.type == "cuda" else []
    with (
        _eval_mode(generator),
        torch.no_grad(),
        _only_settings(generator, settings),
        torch.random.fork_rng(devices=devices),
    ):
        for batch in tqdm(plan, desc=progress, disable=progress is None, leave=False):
            torch.manual_seed(batch_seed(seed, keys[batch[0]]))
            input_ids, attention_mask = left_pad([list(prompt_input_ids[i]) for i in batch], pad_id)
            out = generator.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=settings,
            )  # (B, P + new)
            for i, tokens in zip(batch, out[:, input_ids.shape[1] :].tolist(), strict=True):
                completions[i] = cut_at_end(tokens, ends)
    return completions


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt strings -> ids the way the data pipeline encodes them (one BOS when the tokenizer
    uses one, no EOS)."""
    encoder = PairEncoder(tokenizer, DataConfig(max_length=None, max_prompt_length=None))
    return [encoder.with_bos(ids) for ids in encoder.tokenize(list(prompts))]


def generate_text(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Convenience: prompt strings in, decoded completion strings out (end token and other
    special tokens removed).

    ``kwargs`` are :func:`generate_completions`'s.
    """
    ids = generate_completions(model, tokenizer, encode_prompts(tokenizer, prompts), **kwargs)
    ends = end_token_ids(model, tokenizer)
    return tokenizer.batch_decode([strip_end(t, ends) for t in ids], skip_special_tokens=True)
