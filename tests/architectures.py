"""Published model configurations, and offline builders for models and tokenizers of their shapes.

Each entry of :data:`ARCHITECTURES` copies the architecture fields of a model's published
``config.json`` (the hub id is named with it; ``architectures``, ``torch_dtype``,
``transformers_version`` and ``use_cache`` are left out). The
configs go through ``AutoConfig.for_model`` exactly as the downloaded file would, so old-style
``rope_theta``/``rope_scaling`` keys are converted by transformers itself. Layers are cut to 1 or 2
everywhere (a 2-core CPU runs every family in about two minutes), and four families also get a
narrower hidden size (``reduced``, with the reason) but keep their vocabulary and features.

Imported by the tests as ``from architectures import ...`` (pytest puts ``tests/`` on
``sys.path``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import AutoConfig, AutoModelForCausalLM, PreTrainedTokenizerFast
from transformers.initialization import no_init_weights


@dataclass(frozen=True)
class Arch:
    """One model family at its published shape, and how the tests train it."""

    hub_id: str  # where the config comes from
    config: dict  # the published config.json's architecture fields (with model_type)
    layers: int | None = None  # num_hidden_layers for the tests (None: the published depth)
    # Published fields replaced to fit the tests' time and memory (each entry says why); the
    # vocabulary and the family's features are never among them.
    reduced: dict = field(default_factory=dict)
    add_bos: bool = False  # the family's tokenizer prepends BOS to every encoding
    lora: bool = False  # train adapters: the full model's gradients + Adam state do not fit
    exact_path: bool = False  # dpokit must score it with full logits (a logit transform)
    dropout: bool = False  # dropout > 0 in the published config


ARCHITECTURES: dict[str, Arch] = {
    # meta-llama/Llama-3.2-1B: GQA 32/8, head_dim 64, tied head, llama3 rope scaling.
    "llama3.2-1b": Arch(
        hub_id="meta-llama/Llama-3.2-1B",
        config={
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 128000,
            "eos_token_id": 128001,
            "head_dim": 64,
            "hidden_act": "silu",
            "hidden_size": 2048,
            "initializer_range": 0.02,
            "intermediate_size": 8192,
            "max_position_embeddings": 131072,
            "mlp_bias": False,
            "num_attention_heads": 32,
            "num_hidden_layers": 16,
            "num_key_value_heads": 8,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_scaling": {
                "factor": 32.0,
                "high_freq_factor": 4.0,
                "low_freq_factor": 1.0,
                "original_max_position_embeddings": 8192,
                "rope_type": "llama3",
            },
            "rope_theta": 500000.0,
            "tie_word_embeddings": True,
            "vocab_size": 128256,
        },
        layers=1,
        add_bos=True,
        lora=True,
    ),
    # Qwen/Qwen2.5-0.5B-Instruct: GQA 14/2, tied head, qkv biases, sliding window configured
    # but off (use_sliding_window false).
    "qwen2.5-0.5b": Arch(
        hub_id="Qwen/Qwen2.5-0.5B-Instruct",
        config={
            "model_type": "qwen2",
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "hidden_act": "silu",
            "hidden_size": 896,
            "initializer_range": 0.02,
            "intermediate_size": 4864,
            "max_position_embeddings": 32768,
            "max_window_layers": 21,
            "num_attention_heads": 14,
            "num_hidden_layers": 24,
            "num_key_value_heads": 2,
            "rms_norm_eps": 1e-06,
            "rope_theta": 1000000.0,
            "sliding_window": 32768,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        layers=2,
    ),
    # Qwen/Qwen3-0.6B: q/k RMSNorm, head_dim 128 > hidden/heads, tied head.
    "qwen3-0.6b": Arch(
        hub_id="Qwen/Qwen3-0.6B",
        config={
            "model_type": "qwen3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 151643,
            "eos_token_id": 151645,
            "head_dim": 128,
            "hidden_act": "silu",
            "hidden_size": 1024,
            "initializer_range": 0.02,
            "intermediate_size": 3072,
            "max_position_embeddings": 40960,
            "max_window_layers": 28,
            "num_attention_heads": 16,
            "num_hidden_layers": 28,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-06,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": None,
            "tie_word_embeddings": True,
            "use_sliding_window": False,
            "vocab_size": 151936,
        },
        layers=1,
        lora=True,
    ),
    # google/gemma-2-2b: final-logit soft-capping (30), attention soft-capping (50), embeddings
    # scaled by sqrt(hidden), sliding window 4096 on alternate layers, tied head.
    "gemma2-2b": Arch(
        hub_id="google/gemma-2-2b",
        config={
            "model_type": "gemma2",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_logit_softcapping": 50.0,
            "bos_token_id": 2,
            "cache_implementation": "hybrid",
            "eos_token_id": 1,
            "final_logit_softcapping": 30.0,
            "head_dim": 256,
            "hidden_act": "gelu_pytorch_tanh",
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 2304,
            "initializer_range": 0.02,
            "intermediate_size": 9216,
            "max_position_embeddings": 8192,
            "num_attention_heads": 8,
            "num_hidden_layers": 26,
            "num_key_value_heads": 4,
            "pad_token_id": 0,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "vocab_size": 256000,
        },
        layers=1,
        # A 256000 x 2304 tied embedding alone is 2.4 GB in fp32: hidden 576 keeps the vocabulary
        # (the soft-capped exact path's memory scales with it), head_dim 256, heads 8/4 and both
        # soft-caps.
        reduced={"hidden_size": 576},
        add_bos=True,
        lora=True,
        exact_path=True,
    ),
    # google/gemma-3-1b-pt: scaled embeddings, q/k norms, sliding window 512 on 5 of every 6
    # layers (local rope base 10k, global 1M), no soft-capping, tied head.
    "gemma3-1b": Arch(
        hub_id="google/gemma-3-1b-pt",
        config={
            "model_type": "gemma3_text",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "attn_logit_softcapping": None,
            "bos_token_id": 2,
            "cache_implementation": "hybrid",
            "eos_token_id": 1,
            "final_logit_softcapping": None,
            "head_dim": 256,
            "hidden_activation": "gelu_pytorch_tanh",
            "hidden_size": 1152,
            "initializer_range": 0.02,
            "intermediate_size": 6912,
            "max_position_embeddings": 32768,
            "num_attention_heads": 4,
            "num_hidden_layers": 26,
            "num_key_value_heads": 1,
            "pad_token_id": 0,
            "query_pre_attn_scalar": 256,
            "rms_norm_eps": 1e-06,
            "rope_local_base_freq": 10000,
            "rope_scaling": None,
            "rope_theta": 1000000,
            "sliding_window": 512,
            "sliding_window_pattern": 6,
            "vocab_size": 262144,
        },
        layers=1,
        # 262144 x 1152 is 1.2 GB in fp32: hidden 576 keeps the vocabulary, the embedding scale
        # sqrt(hidden), head_dim 256, heads 4/1 and the 512-token window.
        reduced={"hidden_size": 576},
        add_bos=True,
        lora=True,
    ),
    # mistralai/Mistral-7B-v0.1: sliding window 4096, GQA 32/8, untied head.
    "mistral-7b": Arch(
        hub_id="mistralai/Mistral-7B-v0.1",
        config={
            "model_type": "mistral",
            "bos_token_id": 1,
            "eos_token_id": 2,
            "hidden_act": "silu",
            "hidden_size": 4096,
            "initializer_range": 0.02,
            "intermediate_size": 14336,
            "max_position_embeddings": 32768,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 8,
            "rms_norm_eps": 1e-05,
            "rope_theta": 10000.0,
            "sliding_window": 4096,
            "tie_word_embeddings": False,
            "vocab_size": 32000,
        },
        layers=1,
        # One layer at hidden 4096 is 480M parameters (1.9 GB): hidden 1024 with the published
        # head_dim 128 (hidden / heads) and heads 32/8.
        reduced={"hidden_size": 1024, "head_dim": 128},
        add_bos=True,
        lora=True,
    ),
    # microsoft/Phi-3-mini-4k-instruct: fused qkv_proj and gate_up_proj, sliding window 2047,
    # untied head, vocabulary padded to 32064.
    "phi3-mini": Arch(
        hub_id="microsoft/Phi-3-mini-4k-instruct",
        config={
            "model_type": "phi3",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 1,
            "embd_pdrop": 0.0,
            "eos_token_id": 32000,
            "hidden_act": "silu",
            "hidden_size": 3072,
            "initializer_range": 0.02,
            "intermediate_size": 8192,
            "max_position_embeddings": 4096,
            "num_attention_heads": 32,
            "num_hidden_layers": 32,
            "num_key_value_heads": 32,
            "original_max_position_embeddings": 4096,
            "pad_token_id": 32000,
            "resid_pdrop": 0.0,
            "rms_norm_eps": 1e-05,
            "rope_scaling": None,
            "rope_theta": 10000.0,
            "sliding_window": 2047,
            "tie_word_embeddings": False,
            "vocab_size": 32064,
        },
        layers=1,
        # One layer at hidden 3072 is 310M parameters (1.2 GB): hidden 1536 with 16 heads keeps
        # head_dim 96 (Phi-3 derives it from hidden / heads) and the fused projections.
        reduced={"hidden_size": 1536, "num_attention_heads": 16, "num_key_value_heads": 16},
        add_bos=True,
        lora=True,
    ),
    # openai-community/gpt2: Conv1D projections, learned positions, dropout 0.1, tied head.
    "gpt2": Arch(
        hub_id="openai-community/gpt2",
        config={
            "model_type": "gpt2",
            "activation_function": "gelu_new",
            "attn_pdrop": 0.1,
            "bos_token_id": 50256,
            "embd_pdrop": 0.1,
            "eos_token_id": 50256,
            "initializer_range": 0.02,
            "layer_norm_epsilon": 1e-05,
            "n_ctx": 1024,
            "n_embd": 768,
            "n_head": 12,
            "n_layer": 12,
            "n_positions": 1024,
            "resid_pdrop": 0.1,
            "summary_activation": None,
            "summary_first_dropout": 0.1,
            "summary_proj_to_labels": True,
            "summary_type": "cls_index",
            "summary_use_proj": True,
            "vocab_size": 50257,
        },
        layers=2,
        dropout=True,
    ),
    # facebook/opt-125m: learned positions (offset 2), dropout 0.1, ReLU, tied head; its
    # tokenizer prepends </s> (id 2) as BOS.
    "opt-125m": Arch(
        hub_id="facebook/opt-125m",
        config={
            "model_type": "opt",
            "activation_dropout": 0.0,
            "activation_function": "relu",
            "attention_dropout": 0.0,
            "bos_token_id": 2,
            "do_layer_norm_before": True,
            "dropout": 0.1,
            "eos_token_id": 2,
            "ffn_dim": 3072,
            "hidden_size": 768,
            "init_std": 0.02,
            "layerdrop": 0.0,
            "max_position_embeddings": 2048,
            "num_attention_heads": 12,
            "num_hidden_layers": 12,
            "pad_token_id": 1,
            "prefix": "</s>",
            "vocab_size": 50272,
            "word_embed_proj_dim": 768,
        },
        layers=2,
        add_bos=True,
        dropout=True,
    ),
    # HuggingFaceTB/SmolLM2-135M: a Llama with GQA 9/3, 30 layers, tied head.
    "smollm2-135m": Arch(
        hub_id="HuggingFaceTB/SmolLM2-135M",
        config={
            "model_type": "llama",
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": 0,
            "eos_token_id": 0,
            "hidden_act": "silu",
            "hidden_size": 576,
            "initializer_range": 0.041666666666666664,
            "intermediate_size": 1536,
            "is_llama_config": True,
            "max_position_embeddings": 8192,
            "num_attention_heads": 9,
            "num_hidden_layers": 30,
            "num_key_value_heads": 3,
            "pretraining_tp": 1,
            "rms_norm_eps": 1e-05,
            "rope_interleaved": False,
            "rope_scaling": None,
            "rope_theta": 100000,
            "tie_word_embeddings": True,
            "vocab_size": 49152,
        },
        layers=2,
    ),
}


def build_config(arch: Arch, **overrides):
    """The transformers config of ``arch``: its published fields, ``layers`` deep, with its
    ``reduced`` fields, then ``overrides``."""
    fields = dict(arch.config)
    model_type = fields.pop("model_type")
    if arch.layers is not None:
        fields["n_layer" if model_type == "gpt2" else "num_hidden_layers"] = arch.layers
    fields.update(arch.reduced)
    fields.update(overrides)
    return AutoConfig.for_model(model_type, **fields)


def build_model(config, seed: int = 0):
    """A randomly initialised causal LM of ``config``, built quickly enough for real shapes.

    Matrices (every parameter with 2+ dimensions) are drawn uniformly with the config's
    initializer standard deviation (transformers' normal init of a 256k x 2304 embedding takes
    tens of seconds on a small CPU); the rest (norms, biases) get the model's own init.
    """
    generator = torch.Generator().manual_seed(seed)
    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config)
    model.tie_weights()  # skipped with the init: tie first, or the tied head is filled twice
    std = getattr(config, "initializer_range", None) or getattr(config, "init_std", 0.02)
    bound = std * math.sqrt(3.0)  # U(-b, b) has standard deviation b / sqrt(3)
    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2:
                param.uniform_(-bound, bound, generator=generator)
                param._is_hf_initialized = True
    model.init_weights()  # the model's own init for what is left (skips the flagged matrices)
    return model.eval()


def special_ids(config) -> dict[str, int]:
    """bos/eos/pad ids from the config (the first one where a list is given)."""
    ids = {}
    for name in ("bos", "eos", "pad"):
        value = getattr(config, f"{name}_token_id", None)
        if isinstance(value, list):
            value = value[0]
        if value is not None:
            ids[name] = int(value)
    return ids


def build_tokenizer(config, words: list[str], add_bos: bool) -> PreTrainedTokenizerFast:
    """A word-level tokenizer with exactly ``config.vocab_size`` entries.

    Special tokens sit at the config's ids (``<eos>`` at eos_token_id, ...); ``words`` are spread
    over the whole id range, the last one at vocab_size - 1, so the data exercise embedding and
    head rows far from the start; every other id is a filler entry no text produces.
    """
    vocab_size = config.vocab_size
    ids = special_ids(config)
    tokens: dict[int, str] = {}
    for name, index in ids.items():
        tokens.setdefault(index, f"<{name}>")
    free = [i for i in range(vocab_size - 1, -1, -1) if i not in tokens]
    unk_id = free.pop()  # the lowest free id
    tokens[unk_id] = "<unk>"
    step = max(1, len(free) // (len(words) + 1))
    for k, word in enumerate(sorted(set(words))):
        tokens[free[k * step]] = word
    vocab = {tokens.get(i, f"<filler_{i}>"): i for i in range(vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    if add_bos:
        bos = tokens[ids["bos"]]
        backend.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, ids["bos"])]
        )
    names = {f"{name}_token": tokens[index] for name, index in ids.items()}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", **names)
    if len(tokenizer) != vocab_size:
        raise AssertionError(f"tokenizer has {len(tokenizer)} entries, config {vocab_size}")
    return tokenizer
