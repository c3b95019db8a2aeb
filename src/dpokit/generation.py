"""Sampling completions from a causal LM: batched, left-padded, seeded, stopped at EOS.

On-policy data (the demo's pairs, SPIN's opponent answers) and evaluation (judge reward, win rate,
KL on samples) all draw completions here. Prompts arrive as token ids exactly as the data pipeline
built them (BOS included when the tokenizer uses one), so a sample is scored on the same tokens it
was generated from.
"""

from __future__ import annotations

import contextlib

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


def left_pad(
    prompt_input_ids: list[list[int]], pad_token_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every row's last prompt token sits in the last column.

    Returns ``input_ids`` (B, P) and ``attention_mask`` (B, P), 0 on the padding.
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


def cut_at_eos(tokens: list[int], eos_token_id: int) -> list[int]:
    """The tokens up to and including the first EOS (all of them when there is none)."""
    if eos_token_id in tokens:
        return tokens[: tokens.index(eos_token_id) + 1]
    return tokens


def generate_completions(
    model,
    tokenizer,
    prompt_input_ids: list[list[int]],
    *,
    max_new_tokens: int = 64,
    temperature: float = 1.0,
    top_p: float = 1.0,
    batch_size: int = 16,
    seed: int = 0,
    do_sample: bool = True,
    first_index: int = 0,
    progress: str | None = None,
) -> list[list[int]]:
    """Sample one completion per prompt; returns completion token ids, in the prompts' order.

    Each completion ends with EOS if the model emitted it within ``max_new_tokens`` (nothing after
    it, no padding). Sampling is plain ancestral sampling from softmax(logits / temperature),
    nucleus-truncated at ``top_p`` (no top-k, no repetition penalty: the samples follow the
    model's own distribution, which on-policy methods assume). ``do_sample=False`` is greedy.

    Deterministic for a ``seed`` (and ``batch_size``): the global RNG is forked, so callers' random
    state is untouched. ``first_index``: the position of ``prompt_input_ids[0]`` in a longer prompt
    list, so that a process generating one batch of it samples what the whole call would. The
    model is put in eval mode and restored afterwards. ``progress``: the label of a progress bar
    over the batches (None: no bar).
    """
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError("batch_size and max_new_tokens must be >= 1")
    generator = _unwrap_generator(model)
    eos_id = tokenizer.eos_token_id
    if eos_id is None:
        raise ValueError("the tokenizer has no eos_token: generation could never stop")
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos_id
    settings = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=do_sample,
        temperature=temperature if do_sample else None,
        top_p=top_p if do_sample else None,
        top_k=0 if do_sample else None,
        eos_token_id=eos_id,
        pad_token_id=pad_id,
        bos_token_id=tokenizer.bos_token_id,
        use_cache=True,
    )
    device = next(generator.parameters()).device
    devices = [device] if device.type == "cuda" else []
    completions: list[list[int]] = []
    with _eval_mode(generator), torch.no_grad(), torch.random.fork_rng(devices=devices):
        starts = range(0, len(prompt_input_ids), batch_size)
        for start in tqdm(starts, desc=progress, disable=progress is None, leave=False):
            # Seed per batch: batch k's samples do not depend on how long earlier batches ran.
            torch.manual_seed(seed * 1_000_003 + first_index + start)
            batch = prompt_input_ids[start : start + batch_size]
            input_ids, attention_mask = left_pad([list(ids) for ids in batch], pad_id)
            out = generator.generate(
                input_ids=input_ids.to(device),
                attention_mask=attention_mask.to(device),
                generation_config=settings,
            )  # (B, P + new)
            new_tokens = out[:, input_ids.shape[1] :].tolist()
            completions.extend(cut_at_eos(tokens, eos_id) for tokens in new_tokens)
    return completions


def encode_prompts(tokenizer, prompts: list[str]) -> list[list[int]]:
    """Prompt strings -> ids the way the data pipeline encodes them (one BOS when the tokenizer
    uses one, no EOS)."""
    encoder = PairEncoder(tokenizer, DataConfig(max_length=None, max_prompt_length=None))
    return [encoder.with_bos(ids) for ids in encoder.tokenize(list(prompts))]


def generate_text(model, tokenizer, prompts: list[str], **kwargs) -> list[str]:
    """Convenience: prompt strings in, decoded completion strings out (special tokens removed).

    ``kwargs`` are :func:`generate_completions`'s.
    """
    ids = generate_completions(model, tokenizer, encode_prompts(tokenizer, prompts), **kwargs)
    return tokenizer.batch_decode(ids, skip_special_tokens=True)
