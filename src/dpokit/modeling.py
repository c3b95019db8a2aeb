"""Loading tokenizers and models the way a user's checkpoint is loaded, plus LoRA."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(name_or_path: str, chat_template_file: str | None = None):
    """``AutoTokenizer`` plus the fixes a preference run needs, each logged.

    A tokenizer without a pad token gets EOS as pad: padding is always masked out of the loss and
    the attention, so the choice cannot change a number.
    """
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError(
                f"tokenizer of {name_or_path} has neither a pad nor an EOS token; set one "
                "(tokenizer.pad_token = ...) and save it"
            )
        logger.info("tokenizer has no pad token; using EOS %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template_file is not None:
        tokenizer.chat_template = Path(chat_template_file).read_text()
    tokenizer.padding_side = "right"
    return tokenizer


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` keeps fp32 master weights; mixed precision (bf16 autocast) does the speed-up."""
    return torch.float32 if name == "auto" else DTYPES[name]


def load_model(name_or_path: str, dtype: torch.dtype, gradient_checkpointing: bool = False):
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype)
    model.config.use_cache = False  # no KV cache in training forwards
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: str):
    """Wrap ``model`` with a fresh LoRA adapter (``peft``); only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else target_modules.split(",")
    lora_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora_config)
    if model.base_model.model.config.use_cache:
        model.base_model.model.config.use_cache = False
    return model


def is_peft_model(model) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")
