"""Tiny, real Hugging Face models and tokenizers built offline.

Tests, the demo and the benchmarks need models that go through exactly the loading path a user's
checkpoint takes (``AutoTokenizer`` / ``AutoModelForCausalLM.from_pretrained`` on a directory), but
nothing can be downloaded. These helpers train a byte-level BPE tokenizer on a handful of texts with
``tokenizers``, build a Llama- or Qwen2-style causal LM from a config, and ``save_pretrained`` both.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast

# A Zephyr-like template: every turn ends with EOS, so a completion's EOS is part of its turn.
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}{{ eos_token }}\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>"]


def build_tiny_tokenizer(
    texts: Iterable[str],
    save_dir: str | Path | None = None,
    vocab_size: int = 512,
    add_bos: bool = False,
    chat_template: str | None = CHAT_TEMPLATE,
) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer on ``texts``; optionally save it with ``save_pretrained``.

    ``add_bos=True`` makes it prepend ``<s>`` to every encoding, as Llama tokenizers do, so code
    that must avoid a double BOS can be tested against it.
    """
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(texts), trainer)
    if add_bos:
        bos_id = backend.token_to_id("<s>")
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", bos_id)]
        )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
    )
    if chat_template is not None:
        tokenizer.chat_template = chat_template
    if save_dir is not None:
        tokenizer.save_pretrained(str(save_dir))
    return tokenizer


def build_tiny_model(
    tokenizer,
    save_dir: str | Path | None = None,
    arch: str = "llama",
    hidden_size: int = 32,
    num_layers: int = 2,
    num_heads: int = 4,
    max_positions: int = 512,
    seed: int = 0,
    tie_word_embeddings: bool = False,
):
    """Build a randomly initialised causal LM of the given family sized for ``tokenizer``."""
    config = AutoConfig.for_model(
        arch,
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=hidden_size * 2,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=max(1, num_heads // 2),
        max_position_embeddings=max_positions,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=tie_word_embeddings,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    if save_dir is not None:
        model.save_pretrained(str(save_dir))
    return model
