"""Loading tokenizers and models the way a user's checkpoint is loaded, plus LoRA."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pyarrow.compute as pc
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PretrainedConfig

from dpokit.config import ConfigError
from dpokit.distributed import no_split_modules
from dpokit.errors import ModelError
from dpokit.logprobs import CompletionScorer
from dpokit.mlp_chunks import chunk_mlps

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def loading_kwargs(config) -> dict[str, Any]:
    """The ``from_pretrained`` arguments of a run's models (policy and reference): the config's
    ``model_init_kwargs``, ``trust_remote_code`` (only when the user set it: an explicit opt-in)
    and ``attn_implementation`` (when set). ``config``: a :class:`~dpokit.config.TrainConfig`."""
    kwargs = dict(config.model_init_kwargs)
    if config.trust_remote_code:
        kwargs["trust_remote_code"] = True
    if config.attn_implementation is not None:
        kwargs["attn_implementation"] = config.attn_implementation
    return kwargs


def load_tokenizer(
    name_or_path: str, chat_template_file: str | None = None, trust_remote_code: bool = False
):
    """``AutoTokenizer`` plus the fixes a preference run needs, each logged.

    A tokenizer without a pad token gets EOS as pad: padding is always masked out of the loss and
    the attention, so the choice cannot change a number. ``trust_remote_code`` is passed on only
    when true (the user's explicit opt-in).
    """
    extra = {"trust_remote_code": True} if trust_remote_code else {}
    tokenizer = AutoTokenizer.from_pretrained(name_or_path, **extra)
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError(  # exit 4, the README's table: a model/tokenizer problem
                f"tokenizer of {name_or_path} has neither a pad nor an EOS token; set one "
                "(tokenizer.pad_token = ...) and save it"
            )
        logger.info("tokenizer has no pad token; using EOS %r for padding", tokenizer.eos_token)
        tokenizer.pad_token = tokenizer.eos_token
    if chat_template_file is not None:
        tokenizer.chat_template = Path(chat_template_file).read_text()
    tokenizer.padding_side = "right"
    check_special_ids(tokenizer, name_or_path, trust_remote_code)
    return tokenizer


def check_special_ids(tokenizer, name_or_path: str, trust_remote_code: bool = False) -> None:
    """The pad, EOS and BOS ids dpokit writes into every batch lie inside the model's embedding
    (``vocab_size`` of the config at ``name_or_path``; read from the config only, no weights).
    transformers 5 gives a Qwen2 tokenizer that lacks ``<|endoftext|>`` a new pad token with id
    ``len(vocab)``, past the embedding: the first padded forward would then fail deep in
    ``F.embedding``. Such a pad token is replaced by EOS (logged), as a tokenizer without one is:
    padding is masked out of the loss and attention, so the choice cannot change a number.

    Raises `ModelError` naming the token, its id and the vocabulary size for an EOS or BOS (or a
    pad with no usable EOS) outside the vocabulary. A path with no model config (a tokenizer
    alone) is not checked.
    """
    try:
        model_config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError):
        return
    vocab = getattr(model_config.get_text_config(), "vocab_size", None)
    eos_id = tokenizer.eos_token_id
    pad_id = tokenizer.pad_token_id
    inside = (lambda i: i is not None and 0 <= i < vocab) if vocab else (lambda i: True)
    if pad_id is not None and not inside(pad_id) and inside(eos_id):
        logger.warning(
            "tokenizer of %s: pad token %r has id %d, outside the model's vocabulary "
            "(vocab_size %d); padding with EOS %r instead",
            name_or_path, tokenizer.pad_token, pad_id, vocab, tokenizer.eos_token,
        )  # fmt: skip
        tokenizer.pad_token = tokenizer.eos_token
    for role in ("pad", "eos", "bos") if vocab else ():
        token_id = getattr(tokenizer, f"{role}_token_id")
        if token_id is not None and not 0 <= token_id < vocab:
            token = getattr(tokenizer, f"{role}_token")
            raise ModelError(
                f"tokenizer of {name_or_path}: its {role} token {token!r} has id {token_id}, "
                f"outside the model's vocabulary (vocab_size {vocab}): save the tokenizer with "
                f"{'an' if role == 'eos' else 'a'} {role} token the model has, or resize the "
                "model's embeddings (model.resize_token_embeddings(len(tokenizer)))"
            )


# Config fields that bound the positions a model can attend over, by model family.
POSITION_LIMITS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def max_positions(name_or_path: str) -> int | None:
    """The longest sequence the model's config admits (None if it names no bound or no config
    can be read here; then loading the model reports the problem)."""
    try:
        config = AutoConfig.from_pretrained(name_or_path)
    except (OSError, ValueError):
        return None
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in POSITION_LIMITS:
        value = getattr(text_config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def longest_sequence(dataset) -> int:
    """Tokens in the longest prompt + completion of prepared rows: the ``prompt_input_ids``
    column plus the longest of the other ``*input_ids`` columns, row by row (Arrow compute)."""
    table = dataset.data  # the whole Arrow table: rows dropped or held out only add empty lists
    lengths = {
        name: pc.list_value_length(table.column(name)).fill_null(0)
        for name in table.column_names
        if name.endswith("input_ids")
    }
    prompt = lengths.pop("prompt_input_ids", None)
    if not lengths:
        return int(pc.max(prompt).as_py() or 0) if prompt is not None else 0
    completion = pc.max_element_wise(*lengths.values())
    total = completion if prompt is None else pc.add(prompt, completion)
    return int(pc.max(total).as_py() or 0)


def check_positions(name_or_path: str, max_length: int | None, longest: int) -> None:
    """Refuse rows longer than the model's positions, from its config, before any weights load:
    past them learned position embeddings index out of range and RoPE models extrapolate to
    positions they never saw. A ``max_length`` beyond them (None: no bound) that no row reaches
    only warns."""
    limit = max_positions(name_or_path)
    if limit is None or (max_length is not None and max_length <= limit):
        return
    if longest > limit:
        raise ConfigError(
            f"max_length={max_length} exceeds the {limit} positions of {name_or_path} "
            f"(max_position_embeddings) and the longest row has {longest} tokens; set "
            f"max_length={limit} or less (and max_prompt_length below it): longer rows are then "
            "truncated and counted in the data summary"
        )
    logger.warning(
        "max_length=%s exceeds the %d positions of %s; the longest row has %d tokens, so none "
        "is affected (set max_length<=%d for data with longer rows)",
        max_length,
        limit,
        name_or_path,
        longest,
        limit,
    )


def resolve_dtype(name: str) -> torch.dtype:
    """``auto`` keeps fp32 master weights; mixed precision (bf16 autocast) does the speed-up."""
    return torch.float32 if name == "auto" else DTYPES[name]


# Dropout-like modules: each has a drop probability ``p``.
DROPOUT_MODULES = (
    torch.nn.Dropout,
    torch.nn.Dropout1d,
    torch.nn.Dropout2d,
    torch.nn.Dropout3d,
    torch.nn.AlphaDropout,
    torch.nn.FeatureAlphaDropout,
)


def is_dropout_setting(name: str, value) -> bool:
    """True for a config field or module attribute holding a drop probability: ``*dropout*``
    (``attention_dropout``, ``hidden_dropout_prob``, OPT's ``dropout``), GPT-2's ``*_pdrop`` and
    OPT's ``layerdrop`` (whole layers skipped in training), when it is a number (not a bool)."""
    named = "dropout" in name or name.endswith("pdrop") or name == "layerdrop"
    return named and isinstance(value, int | float) and not isinstance(value, bool)


def zero_config_dropout(config) -> list[str]:
    """Set every drop probability of a transformers config (and of its sub-configs, such as a
    multimodal model's ``text_config``) to 0.0. Returns the names that were not 0 already."""
    changed = []
    for key, value in list(vars(config).items()):
        if is_dropout_setting(key, value) and value != 0:
            setattr(config, key, 0.0)
            changed.append(key)
        elif isinstance(value, PretrainedConfig):  # a sub-config (text_config, ...)
            changed += zero_config_dropout(value)
    return changed


def switch_off_dropout(model: torch.nn.Module) -> list[str]:
    """Switch dropout off for training: every dropout module's ``p`` and every float drop
    probability a module copied from its config (Llama's ``attention_dropout``, which it hands
    to SDPA; OPT's ``dropout`` and ``layerdrop``) become 0, and so do the config's fields (GPT-Neo
    reads ``config.attention_dropout`` in its forward). peft's ``lora_dropout`` modules are left
    as configured: that dropout is the adapter's own regulariser, set by ``lora_dropout``.

    Returns the config fields that were changed (for the log). Eval mode needs none of this; it
    is for the policy, which trains in train mode while the reference scores in eval mode --
    with dropout on, the first loss would not be ln 2 and every reward would carry noise.
    """
    changed = zero_config_dropout(model.config) if hasattr(model, "config") else []
    for name, module in model.named_modules():
        if "lora_dropout" in name.split("."):
            continue
        if isinstance(module, DROPOUT_MODULES):
            module.p = 0.0
        for key, value in list(vars(module).items()):
            if is_dropout_setting(key, value):
                setattr(module, key, 0.0)
    return changed


def load_model(
    name_or_path: str,
    dtype: torch.dtype,
    gradient_checkpointing: bool = False,
    disable_dropout: bool = False,
    loading: Mapping[str, Any] | None = None,
    mlp_chunk_tokens: int | None = None,
    empty: bool = False,
):
    """A causal LM from a path or hub id in ``dtype``, without KV cache (training forwards).

    ``gradient_checkpointing``: layers recompute their activations in backward, and with
    ``mlp_chunk_tokens`` their MLPs do so one chunk of positions at a time
    (:func:`dpokit.mlp_chunks.chunk_mlps`).

    ``disable_dropout``: built with its config's drop probabilities at 0 and then passed
    through :func:`switch_off_dropout` (see there), so it trains without dropout.
    ``loading``: more ``from_pretrained`` arguments (:func:`loading_kwargs` of the run's config).
    ``empty``: build the same model from its config on the meta device, reading no weights (a
    sharded run's processes other than the first: their shards are filled from process 0 by
    :func:`dpokit.sharding.shard_scorer`, which also checks that the configs agree).
    """
    kwargs = dict(loading or {})
    if disable_dropout or empty:
        trust = bool(kwargs.get("trust_remote_code", False))
        revision = {"revision": kwargs["revision"]} if "revision" in kwargs else {}
        config = AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust, **revision)
        changed = zero_config_dropout(config) if disable_dropout else []
        if changed:
            logger.info("disable_dropout: %s set to 0 for %s", ", ".join(changed), name_or_path)
        kwargs["config"] = config
    if empty:
        model = empty_model(kwargs, dtype)
    else:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype, **kwargs)
    if disable_dropout:
        switch_off_dropout(model)
    model.config.use_cache = False  # no KV cache in training forwards
    if gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if mlp_chunk_tokens is not None:
            chunk_mlps(model, mlp_chunk_tokens)
    return model


def empty_model(kwargs: dict[str, Any], dtype: torch.dtype):
    """The model ``from_pretrained(**kwargs)`` would build, on the meta device (parameters and
    buffers have shapes and dtypes but no storage) and in eval mode as ``from_pretrained``
    leaves it. ``kwargs`` holds the ``config`` and the other ``from_pretrained`` arguments;
    those that shape the model (``attn_implementation``, ``trust_remote_code``) are passed on."""
    shaping = {k: kwargs[k] for k in ("attn_implementation", "trust_remote_code") if k in kwargs}
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(kwargs["config"], dtype=dtype, **shaping)
    return model.eval()


def apply_lora(model, r: int, alpha: int, dropout: float, target_modules: str):
    """Wrap ``model`` with a fresh LoRA adapter (``peft``); only adapter weights train."""
    from peft import LoraConfig, get_peft_model

    targets = target_modules if target_modules == "all-linear" else target_modules.split(",")
    lora_config = LoraConfig(
        r=r, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, task_type="CAUSAL_LM"
    )
    model = get_peft_model(model, lora_config)
    for adapter in model.peft_config.values():  # as given ("llama"): loads from that cwd only
        base = adapter.base_model_name_or_path
        if base and Path(base).is_dir():
            adapter.base_model_name_or_path = str(Path(base).resolve())
    if model.base_model.model.config.use_cache:
        model.base_model.model.config.use_cache = False
    return model


def is_peft_model(model) -> bool:
    """True for a peft model (LoRA adapters that can be switched off)."""
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def build_scorer(model, empty: bool = False, **kwargs) -> CompletionScorer:
    """``CompletionScorer(model, **kwargs)``; ``empty``: ``model`` was built on the meta device
    by :func:`load_model` and gets process 0's weights when it is sharded, before any forward.

    CompletionScorer reads an LM head weight on the meta device as offloaded by accelerate and
    picks the exact path for it (with a warning), while process 0 would pick the chunked one and
    the processes' FSDP collectives would then differ. So an empty model's scorer is built while
    the head weight is a stand-in of the same shape and dtype that holds one element (an
    expanded scalar), and the meta parameter (tied or not) is put back afterwards.
    """
    head = model.get_output_embeddings() if empty else None
    inner = getattr(head, "original_module", head)  # peft's modules_to_save wrapper
    weight = getattr(inner, "weight", None)
    if weight is None or not weight.is_meta:
        return CompletionScorer(model, **kwargs)
    stand_in = torch.zeros((), dtype=weight.dtype).expand(weight.shape)
    inner.weight = torch.nn.Parameter(stand_in, requires_grad=weight.requires_grad)
    try:
        return CompletionScorer(model, **kwargs)
    finally:
        inner.weight = weight


def build_policy(
    config, dtype: torch.dtype, sharding: str | None, empty: bool = False
) -> CompletionScorer:
    """The policy to train: ``config.model`` in ``dtype`` (LoRA adapters added with
    ``config.lora``) wrapped in a :class:`~dpokit.logprobs.CompletionScorer`.

    ``config``: the run's :class:`~dpokit.config.TrainConfig`; ``sharding``: ``"fsdp"``,
    ``"zero3"`` or None (:func:`dpokit.distributed.parameter_sharding`); ``empty``: on the meta
    device, no weights read (:func:`load_model`; dpokit's FSDP2 on processes other than 0).
    """
    model = load_model(
        config.model,
        dtype,
        config.gradient_checkpointing,
        disable_dropout=config.disable_dropout,
        loading=loading_kwargs(config),
        mlp_chunk_tokens=config.mlp_chunk_tokens,
        empty=empty,
    )
    if config.lora:  # after disable_dropout: the adapter's lora_dropout is the user's setting
        model = apply_lora(
            model,
            config.lora_r,
            config.lora_alpha,
            config.lora_dropout,
            config.lora_target_modules,
        )
    # Sharded parameters are whole only inside their module's forward: score through the full
    # model (the exact path) rather than reading the LM head weight (dpokit.distributed).
    policy = build_scorer(
        model,
        empty,
        chunk_size=config.logps_chunk_size,
        fast=False if sharding else None,
        saved_softmax_mb=config.logps_saved_softmax_mb,
        pass_tokens=config.decoder_pass_tokens,
    )
    if sharding == "fsdp":  # accelerate's auto-wrap reads the layer classes off it
        policy._no_split_modules = no_split_modules(model)
    return policy
