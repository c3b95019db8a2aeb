"""TRL's configuration names, read as dpokit's: one table, one translation.

A TRL user's YAML (``DPOConfig``/``KTOConfig``/``CPOConfig`` + ``ModelConfig`` +
``ScriptArguments``, trl 1.16) or ``key=value`` list is translated here into dpokit's
:class:`~dpokit.config.TrainConfig` keys before validation. Every TRL name is mapped ONCE, in
:data:`ALIASES` (one :class:`Alias` row per name, also the source of ``docs/trl.md``'s table) and,
for ``loss_type`` and the fields its losses read (``beta``, ``label_smoothing``, ``discopop_tau``,
f-divergence, WPO ...), in :mod:`dpokit.trl_losses` (one table, per field and per component loss
type, for a single loss type and a list alike). For a method given the dpokit way, names whose
meaning depends on the method (``beta`` for IPO and SPIN ...) are in :data:`METHOD_ALIASES`
(derived from that table) and applied once the method is known; :mod:`dpokit.trl_translate`
applies the tables.

A TRL name with no dpokit meaning is refused by name, with the reason (:data:`REFUSED`); one whose
value is what dpokit does anyway (``eval_strategy: steps``, ``push_to_hub: false`` ...) is
accepted and reported as ignored (:data:`SAME_BEHAVIOUR`). This module imports nothing from the
layers above ``losses``: it maps names to names and values to values.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from dpokit.trl_losses import LOSS_FIELDS, LOSS_TYPES, method_aliases, translate_loss_type

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Alias:
    """One TRL name: the dpokit key it sets (``target``) and how its value carries over.

    ``convert(value, given)``, where present, returns the dpokit settings it stands for (a dict:
    several keys for ``bf16``, none for a value that is dpokit's default) or raises ``ValueError``
    with the reason; ``given`` is the whole mapping (for names read together, like
    ``dataset_test_split`` with ``eval_strategy``). Without it the value passes unchanged.
    """

    trl: str
    target: str
    note: str = ""
    convert: Callable[[Any, Mapping[str, Any]], dict[str, Any]] | None = None


def _same(target: str) -> Callable[[Any, Mapping[str, Any]], dict[str, Any]]:
    return lambda value, given: {target: value}


def _true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


def _steps(target: str) -> Callable[[Any, Mapping[str, Any]], dict[str, Any]]:
    """``logging_steps``/``save_steps``/``eval_steps``: TRL also takes a float in (0, 1) (a share
    of the training steps), which dpokit does not."""

    def convert(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(value, float) and 0 < value < 1:
            raise ValueError(
                f"a share of the training steps ({value}) is not supported: give steps"
            )
        return {target: value}

    return convert


def _warmup_steps(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    # transformers 5 (TRL 1.16) has no warmup_ratio: warmup_steps in (0, 1) is the ratio
    if isinstance(value, float) and 0 < value < 1:
        return {"warmup_ratio": value}
    return {"warmup_steps": value}


def _max_steps(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    return {"max_steps": None if value in (-1, "-1") else value}  # TRL's -1: not set


def _report_to(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    names = [value] if isinstance(value, str) else list(value or [])
    names = sorted({str(n).strip().lower() for n in names} - {"none"})
    if not names:
        return {"report_to": "none"}
    if names == ["tensorboard", "wandb"] or names == ["all"]:
        return {"report_to": "all"}
    if len(names) == 1 and names[0] in ("tensorboard", "wandb"):
        return {"report_to": names[0]}
    raise ValueError(f"{names} is not supported: dpokit reports to tensorboard and/or wandb")


def _scheduler(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    name = str(value).strip().lower()
    if name in ("linear", "cosine", "constant_with_warmup"):
        return {"lr_scheduler": "constant" if name == "constant_with_warmup" else name}
    if name == "constant":  # transformers' "constant" has no warmup at all
        return {"lr_scheduler": "constant", "warmup_steps": 0}
    raise ValueError(f"{value!r} has no dpokit schedule (linear, cosine, constant_with_warmup)")


def _precompute(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    # false is TRL's default (a reference model in memory); dpokit's `auto` gives the same numbers
    return {"reference_mode": "precomputed"} if _true(value) else {}


def _precision(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    bf16, fp16 = _true(given.get("bf16", False)), _true(given.get("fp16", False))
    if bf16 and fp16:
        raise ValueError("bf16 and fp16 are both true: choose one")
    return {"mixed_precision": "bf16" if bf16 else "fp16" if fp16 else "no"}


def _lora_targets(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    if value is None:
        return {}  # TRL's None: peft's per-architecture default; dpokit's default is all-linear
    if isinstance(value, str):
        return {"lora_target_modules": value}
    return {"lora_target_modules": ",".join(str(v) for v in value)}


def _resume(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    if value is None or value is False or str(value).strip().lower() in ("false", "none", ""):
        return {}
    if _true(value):
        return {"resume": True}
    raise ValueError(
        f"a checkpoint path ({value!r}) is not supported: dpokit resumes from the newest complete "
        "checkpoint in output_dir (resume=true)"
    )


def _completion_length(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    # dpokit bounds prompt + completion (max_length), not the completion alone.
    if value is None or "max_length" in given:
        if value is not None:
            logger.warning(
                "max_completion_length=%s ignored: dpokit bounds prompt + completion by "
                "max_length (given)",
                value,
            )
        return {}
    prompt = given.get("max_prompt_length", 512)
    return {"max_length": int(prompt) + int(value)}


def _test_split(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    # TRL's scripts read the test split only when eval_strategy is not "no" (its default).
    strategy = str(given.get("eval_strategy", "no")).strip().lower()
    data = given.get("dataset_name", given.get("data"))
    if strategy == "no" or value is None or not data:
        return {}
    return {"eval_data": data, "eval_data_split": value}


def _eval_strategy(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    if str(value).strip().lower() not in ("no", "steps"):
        raise ValueError(
            f"{value!r} is not supported: dpokit evaluates every eval_steps (eval_strategy: steps)"
        )
    return {}


def _optim(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    name = str(value).strip().lower()
    if name in ("adamw_torch", "adamw_torch_fused", "adamw_hf"):
        return {"optimizer": "adamw"}
    if name == "rmsprop":
        return {"optimizer": "rmsprop"}
    raise ValueError(f"{value!r} is not supported: dpokit has adamw and rmsprop")


def _sampling(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    name = str(value).strip().lower()
    if name not in ("random", "sequential"):
        raise ValueError(f"{value!r} is not supported: random (shuffle) or sequential (data order)")
    return {"shuffle": name == "random"}


def _padding_free(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    return {"packing": "padding_free"} if _true(value) else {}


def _lift_model_kwargs(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """``model_init_kwargs``: ``torch_dtype``/``dtype`` and ``attn_implementation`` inside it
    become dpokit's keys; ``trust_remote_code`` inside it is refused (explicit top-level opt-in)."""
    kwargs = dict(value or {})
    if "trust_remote_code" in kwargs:
        raise ValueError("set trust_remote_code at the top level: it is an explicit opt-in")
    out: dict[str, Any] = {}
    for name in ("torch_dtype", "dtype"):
        if name in kwargs:
            out["dtype"] = kwargs.pop(name)
    if "attn_implementation" in kwargs:
        out["attn_implementation"] = kwargs.pop("attn_implementation")
    out["model_init_kwargs"] = kwargs
    return out


ALIASES: tuple[Alias, ...] = (
    Alias("model_name_or_path", "model", "", _same("model")),
    Alias("dataset_name", "data", "a hub name, a file or a saved dataset", _same("data")),
    Alias("dataset_train_split", "data_split", "", _same("data_split")),
    Alias(
        "dataset_test_split",
        "eval_data + eval_data_split",
        "read only with eval_strategy: steps, as TRL's scripts do",
        _test_split,
    ),
    Alias(
        "eval_strategy",
        "eval_strategy",
        "no or steps; steps reads dataset_test_split",
        _eval_strategy,
    ),
    Alias("per_device_train_batch_size", "batch_size", "", _same("batch_size")),
    Alias("per_device_eval_batch_size", "eval_batch_size", "", _same("eval_batch_size")),
    Alias("num_train_epochs", "num_epochs", "", _same("num_epochs")),
    Alias("max_steps", "max_steps", "-1 = not set", _max_steps),
    Alias(
        "warmup_steps",
        "warmup_steps",
        "a float in (0, 1) is the ratio = warmup_ratio",
        _warmup_steps,
    ),
    Alias(
        "lr_scheduler_type",
        "lr_scheduler",
        "linear, cosine; constant_with_warmup = constant; constant = constant, no warmup",
        _scheduler,
    ),
    Alias("optim", "optimizer", "adamw_torch(_fused) = adamw, rmsprop", _optim),
    Alias(
        "loss_type",
        "method",
        "see the loss_type table; a list = method combined",
        translate_loss_type,
    ),
    Alias("loss_weights", "loss_weights", "with a list of loss_types (method combined)", None),
    Alias(
        "precompute_ref_log_probs",
        "reference_mode",
        "true = precomputed; false = auto (a reference model or cached log-probs: same numbers)",
        _precompute,
    ),
    Alias("use_peft", "lora", "", _same("lora")),
    Alias("lora_r", "lora_r", "", _same("lora_r")),
    Alias("lora_alpha", "lora_alpha", "", _same("lora_alpha")),
    Alias("lora_dropout", "lora_dropout", "TRL's default 0.05, dpokit's 0", _same("lora_dropout")),
    Alias(
        "lora_target_modules",
        "lora_target_modules",
        "a list becomes a comma list; TRL's None (peft's default) = dpokit's all-linear",
        _lora_targets,
    ),
    Alias("bf16", "mixed_precision", "true = bf16", _precision),
    Alias("fp16", "mixed_precision", "true = fp16", _precision),
    Alias("torch_dtype", "dtype", "older ModelConfig name of dtype", _same("dtype")),
    Alias("dtype", "dtype", "", _same("dtype")),
    Alias("gradient_checkpointing", "gradient_checkpointing", "", _same("gradient_checkpointing")),
    Alias(
        "label_smoothing",
        "(per method)",
        "robust: eps; exo_pair, aot, aot_unpaired: smoothing; cpo: label_smoothing; "
        "elsewhere ignored by TRL 1.16 (warned; never cDPO)",
        None,
    ),
    Alias(
        "max_completion_length",
        "max_length",
        "max_length = max_prompt_length + it, unless max_length is given",
        _completion_length,
    ),
    Alias("dataset_num_proc", "num_proc", "", _same("num_proc")),
    Alias("resume_from_checkpoint", "resume", "true only; a path is refused", _resume),
    Alias("output_dir", "output_dir", "", _same("output_dir")),
    Alias("logging_steps", "logging_steps", "whole steps only", _steps("logging_steps")),
    Alias("save_steps", "save_steps", "whole steps only", _steps("save_steps")),
    Alias("eval_steps", "eval_steps", "whole steps only", _steps("eval_steps")),
    Alias("report_to", "report_to", "a list: tensorboard and/or wandb", _report_to),
    Alias("seed", "seed", "", _same("seed")),
    Alias(
        "train_sampling_strategy",
        "shuffle",
        "random = true; sequential (KTOConfig's default) = false",
        _sampling,
    ),
    Alias(
        "disable_tqdm", "progress", "true = progress false", lambda v, g: {"progress": not _true(v)}
    ),
    Alias("padding_free", "packing", "true = padding_free (exact, any attention)", _padding_free),
    Alias("attn_implementation", "attn_implementation", "", _same("attn_implementation")),
    Alias(
        "model_init_kwargs",
        "model_init_kwargs",
        "torch_dtype/dtype and attn_implementation inside it become those keys",
        _lift_model_kwargs,
    ),
    Alias(
        "trust_remote_code",
        "trust_remote_code",
        "explicit opt-in, off by default; reaches model, reference and tokenizer",
        _same("trust_remote_code"),
    ),
)
ALIAS_BY_NAME: dict[str, Alias] = {alias.trl: alias for alias in ALIASES}

# Method hyperparameters under their TRL (or paper) names, for a method given the dpokit way
# (`method: ipo` with `beta`): TRL name -> {dpokit method -> key}; "*" means every method that
# has that key. The loss fields come from dpokit.trl_losses.LOSS_FIELDS (the table `loss_type`
# reads too); the rest are names of methods TRL's DPOConfig does not have.
METHOD_ALIASES: dict[str, dict[str, str]] = method_aliases()
METHOD_ALIASES["beta"]["spin"] = "lam"
METHOD_ALIASES["label_smoothing"].update(cdpo="smoothing", cpo="label_smoothing")
METHOD_ALIASES["cpo_alpha"]["cpo"] = "alpha"
METHOD_ALIASES["rpo_alpha"] = {"*": "nll_weight"}

# TRL names whose TRL default is what dpokit does: accepted at that value, refused otherwise.
SAME_BEHAVIOUR: dict[str, tuple[tuple[Any, ...], str]] = {
    "push_to_hub": ((False,), "dpokit writes save_pretrained output to output_dir/final"),
    "dataset_streaming": ((False,), "dpokit reads the whole dataset"),
    "activation_offloading": ((False,), "use gradient_checkpointing=true to save activations"),
    "truncation_mode": (
        ("keep_start",),
        "dpokit also keeps the completion's start; it keeps a prompt's end only where the "
        "prompt alone exceeds max_length (TRL would leave no completion)",
    ),
    "lora_task_type": (("CAUSAL_LM",), "dpokit trains causal LMs"),
    "use_rslora": ((False,), "dpokit's LoRA scale is lora_alpha / lora_r"),
    "use_dora": ((False,), "dpokit trains plain LoRA adapters"),
    "load_in_8bit": ((False,), "dpokit loads unquantised weights"),
    "load_in_4bit": ((False,), "dpokit loads unquantised weights"),
    "gradient_checkpointing_kwargs": (
        ({"use_reentrant": False},),
        "dpokit uses use_reentrant=False",
    ),
    "save_strategy": (("steps", "no"), "dpokit saves every save_steps (None: final model only)"),
    "logging_strategy": (("steps",), "dpokit logs every logging_steps"),
    "do_train": ((True,), "dpokit train trains"),
    "do_eval": ((True, False), "dpokit evaluates when there are eval data"),
    "adam_epsilon": ((1e-8,), "dpokit's AdamW has eps 1e-8"),
    "lr_scheduler_kwargs": (({}, None), "dpokit's schedules take no extra arguments"),
    "tf32": ((None, False), "dpokit leaves TF32 matmuls off"),
    "save_only_model": ((False,), "dpokit checkpoints hold the optimizer state, to resume"),
    "data_seed": ((None,), "dpokit's data order follows seed"),
    "eval_on_start": ((False,), "dpokit evaluates every eval_steps and at the end"),
    "bf16_full_eval": ((False,), "dpokit evaluates in the training precision"),
    "fp16_full_eval": ((False,), "dpokit evaluates in the training precision"),
    "ignore_bias_buffers": ((False,), "dpokit has no DDP bias-buffer workaround"),
}
# TRL names that change nothing trained (display, hub bookkeeping): accepted, reported ignored.
COSMETIC = (
    "log_level",
    "logging_first_step",
    "logging_dir",
    "run_name",
    "hub_model_id",
    "overwrite_output_dir",
    "precompute_ref_batch_size",
    "pad_to_multiple_of",
    "dataloader_num_workers",
    "remove_unused_columns",
    "hub_strategy",
    "ddp_timeout",
    "torch_empty_cache_steps",
    "pad_token",  # padded positions are masked out of every log-prob
)
# TRL names with no dpokit meaning, refused with the reason.
REFUSED: dict[str, str] = {
    "dataset_config": "save the dataset configuration you want with save_to_disk and pass its path",
    "model_revision": "pass a local path or pin the revision in model_init_kwargs: {revision: ...}",
    "lora_modules_to_save": "dpokit trains the LoRA adapter only",
    "lora_target_parameters": "dpokit targets modules (lora_target_modules)",
    "bnb_4bit_quant_type": "dpokit loads unquantised weights",
    "use_bnb_nested_quant": "dpokit loads unquantised weights",
    "bnb_4bit_quant_storage": "dpokit loads unquantised weights",
    "router_aux_loss_coef": "dpokit adds no MoE auxiliary loss",
    "deepspeed": "launch with accelerate and a config from configs/accelerate/",
    "fsdp": "launch with accelerate and a config from configs/accelerate/",
    "torch_compile": "dpokit does not compile the model",
    "use_liger_kernel": "dpokit's chunked LM head already avoids the B x T x V logits",
    "ref_adapter_name": "reference_mode=adapter is the base model with the adapter switched off",
    "model_adapter_name": "dpokit trains one adapter",
    "generate_during_eval": "use dpokit eval --prompts",
}


TRL_NAMES = frozenset(
    [
        *ALIAS_BY_NAME,
        *METHOD_ALIASES,
        *(f.trl for f in LOSS_FIELDS),
        *SAME_BEHAVIOUR,
        *COSMETIC,
        *REFUSED,
        "loss_weights",
    ]
)
LOSS_FIELD_NAMES = frozenset(f.trl for f in LOSS_FIELDS)
__all__ = [
    "ALIASES",
    "ALIAS_BY_NAME",
    "COSMETIC",
    "LOSS_FIELD_NAMES",
    "LOSS_TYPES",
    "METHOD_ALIASES",
    "REFUSED",
    "SAME_BEHAVIOUR",
    "TRL_NAMES",
    "Alias",
]
