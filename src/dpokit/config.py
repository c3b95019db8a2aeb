"""Run configuration: one dataclass with defaults, loaded from YAML and ``key=value`` overrides.

Everything is validated here, before any model or dataset is touched, so a typo costs a second and
not a model load: unknown keys (with the closest valid names), wrong types, values out of range and
unknown methods all raise :class:`ConfigError`.

Method hyperparameters (``beta``, ``lam``, ``eps`` ...) may be given at the top level or under
``method_args``; which keys a method accepts comes from its entry in :data:`dpokit.losses.METHODS`.

Each ``TrainConfig`` field carries its one-line help, group, type and range or choices as field
metadata; one loop (:func:`validate`) converts and checks every field with the converter that
checks method hyperparameters (:mod:`dpokit.losses.hyperparameters`), so both accept the same
spellings (``1e-6``, ``yes``/``off``, ``4.0`` for an int) and both refuse NaN and infinity.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.config_checks import validate
from dpokit.errors import ConfigError
from dpokit.losses import MethodSpec, get_method
from dpokit.trl_names import METHOD_ALIASES
from dpokit.trl_translate import (
    ignored_method_name,
    merge_settings,
    method_alias,
    translate,
    unknown_keys_message,
)
from dpokit.yaml_config import read_yaml, yaml_problem

logger = logging.getLogger(__name__)

GROUPS = ("run", "data", "optimisation", "reference", "memory", "logging")


def _key(
    default: Any,
    group: str,
    help: str,
    *,
    kind: type | None = None,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
    optional: bool = False,
) -> Any:
    """A TrainConfig field: its default, and as metadata what the check loop and ``--help`` read.

    ``kind`` defaults to the default's type; a field whose default is None (or ``optional``) also
    accepts None, written ``none`` or ``null`` on the command line.
    Numbers may have a range ``low``..``high`` (``*_open``: that end excluded), strings
    ``choices``.
    """
    assert group in GROUPS, group
    metadata = {
        "help": help,
        "group": group,
        "type": kind or type(default),
        "optional": optional or default is None,
        "low": low,
        "high": high,
        "low_open": low_open,
        "high_open": high_open,
        "choices": choices,
    }
    if isinstance(default, dict):
        return field(default_factory=lambda: dict(default), metadata=metadata)
    return field(default=default, metadata=metadata)


_POSITIVE = dict(low=0.0, low_open=True)
_FRACTION = dict(low=0.0, high=1.0, high_open=True)  # [0, 1)


@dataclass
class TrainConfig:
    """Everything a ``dpokit train`` run needs.

    Each field's metadata (``dataclasses.fields(TrainConfig)[i].metadata``) has ``help`` (one
    line), ``group`` (one of :data:`GROUPS`), ``type`` (bool, int, float, str or dict),
    ``optional`` (None allowed), ``low``/``high``/``low_open``/``high_open`` (the range of a
    number, None: unbounded) and ``choices`` (a string's valid values, or None);
    :func:`validate` converts and checks every field with them (:func:`check_field`).
    """

    method: str = _key("dpo", "run", "a name from `dpokit methods`")
    model: str = _key("", "run", "local path or hub id of the starting policy")
    data: str = _key(
        "", "data", "JSONL/JSON/Parquet/CSV file, saved dataset dir, or hub dataset name"
    )
    reference: str | None = _key(
        None, "reference", "reference model path/id; default: the starting policy", kind=str
    )
    method_args: dict[str, Any] = _key(
        {}, "run", "method hyperparameters (they may also be given at the top level)"
    )
    output_dir: str = _key("runs/dpokit", "run", "run directory: checkpoints, metrics, model")

    data_split: str | None = _key(
        None, "data", "split to read from a multi-split dataset (default: train)", kind=str
    )
    eval_data: str | None = _key(
        None, "data", "held-out file; otherwise eval_fraction of `data`", kind=str
    )
    eval_fraction: float = _key(0.0, "data", "share of `data` held out for eval", **_FRACTION)
    # TRL's dataset_test_split and per_device_eval_batch_size (dpokit.trl_names)
    eval_data_split: str | None = _key(
        None, "data", "split of eval_data to read (a multi-split dataset)", kind=str
    )
    eval_batch_size: int | None = _key(
        None,
        "optimisation",
        "examples per process per eval batch (None: batch_size)",
        kind=int,
        low=1,
    )
    max_length: int | None = _key(
        1024, "data", "prompt + completion tokens; none: no bound", low=2, optional=True
    )
    max_prompt_length: int | None = _key(
        512, "data", "prompt tokens kept (< max_length); none: max_length - 1", low=1, optional=True
    )
    truncation: str = _key(
        "truncate",
        "data",
        "over-long rows: truncate (counted) or error",
        choices=("truncate", "error"),
    )
    identical_pairs: str = _key(
        "keep",
        "data",
        "chosen == rejected: keep (counted) or drop (counted)",
        choices=("keep", "drop"),
    )
    bad_scores: str = _key(
        "error",
        "data",
        "ODPO ties / reversed scores: drop (counted) or error",
        choices=("drop", "error"),
    )
    chat_template: str | None = _key(
        None, "data", "Jinja template file overriding the tokenizer's", kind=str
    )
    num_proc: int | None = _key(None, "data", "tokenization processes", kind=int)

    reference_mode: str = _key(
        "auto",
        "reference",
        "the reference: auto (none for reference-free methods, a model for TDPO, else "
        "precomputed), model (frozen copy), adapter (LoRA off), precomputed (log-probs cached on "
        "disk) or none",
        choices=("auto", "model", "adapter", "precomputed", "none"),
    )
    reference_cache_dir: str | None = _key(
        None,
        "reference",
        "pre-computed reference log-probs; default ~/.cache/dpokit/reference_logps",
        kind=str,
    )
    sync_ref_model: bool = _key(
        False,
        "reference",
        "TR-DPO (arXiv:2404.09656): move the reference toward the policy every "
        "ref_model_sync_steps optimizer steps (an online reference; dpokit.reference_sync)",
    )
    ref_model_mixup_alpha: float = _key(
        0.6,
        "reference",
        "TR-DPO: ref <- alpha * policy + (1 - alpha) * ref at each sync; 1 = hard copy",
        low=0.0,
        high=1.0,
    )
    ref_model_sync_steps: int = _key(
        512, "reference", "TR-DPO: optimizer steps between syncs", low=1
    )

    dtype: str = _key(
        "auto",
        "run",
        "weights dtype; auto = float32 (mixed precision does the rest)",
        choices=("auto", "float32", "bfloat16", "float16"),
    )
    # Model loading, passed to every from_pretrained (policy, reference, tokenizer; TRL names)
    attn_implementation: str | None = _key(
        None,
        "run",
        "attention kernel (eager, sdpa, flash_attention_2; None: the model's)",
        kind=str,
    )
    model_init_kwargs: dict[str, Any] = _key(
        {}, "run", "more from_pretrained arguments for the policy and reference (e.g. revision)"
    )
    trust_remote_code: bool = _key(
        False, "run", "run the model's own Python code from the hub (explicit opt-in)"
    )
    mixed_precision: str = _key(
        "auto",
        "memory",
        "auto = bf16 on GPUs that support it, fp32 on CPU",
        choices=("auto", "no", "bf16", "fp16"),
    )
    sharding: str = _key(
        "auto",
        "memory",
        "fsdp: dpokit shards weights, grads, optimizer (PyTorch FSDP2; CPU or GPU); "
        "auto: as the accelerate config says; none",
        choices=("auto", "none", "fsdp"),
    )
    gradient_checkpointing: bool = _key(
        False, "memory", "recompute activations in backward instead of keeping them"
    )
    logps_chunk_size: int = _key(1024, "memory", "completion positions per LM-head chunk", low=1)
    logps_saved_softmax_mb: int = _key(
        512, "memory", "LM-head softmax kept for backward, not recomputed; 0: none", low=0
    )
    decoder_pass_tokens: int | None = _key(
        8192,
        "memory",
        "the decoder runs rows in groups of at most this many tokens (a longer row alone); "
        "with gradient checkpointing one group's layer is recomputed at a time. None: one pass",
        low=1,
        optional=True,
    )
    mlp_chunk_tokens: int | None = _key(
        2048,
        "memory",
        "with gradient checkpointing, each layer's MLP runs over chunks of this many positions, "
        "recomputed one chunk at a time in backward (dpokit.mlp_chunks). None: whole rows",
        low=1,
        optional=True,
    )

    # Speed (the measurements behind these defaults: PERFORMANCE.md)
    packing: str = _key(
        "auto",
        "memory",
        "pairs: auto | none (2 rows/pair) | shared_prompt | padding_free",
        choices=("auto", "none", "shared_prompt", "padding_free"),
    )
    packing_length: int | None = _key(
        None, "memory", "padding_free: tokens per packed row (None: one row)", kind=int, low=1
    )
    group_by_length: bool = _key(
        False, "data", "shuffled batches of similar lengths (less padding)"
    )
    fused_optimizer: bool = _key(
        True, "optimisation", "AdamW as one fused kernel over all parameters"
    )
    disable_dropout: bool = _key(
        True,
        "optimisation",
        "dropout off in the policy and every reference (LoRA's lora_dropout is kept)",
    )
    lora: bool = _key(False, "optimisation", "train a LoRA adapter instead of every weight")
    lora_r: int = _key(16, "optimisation", "LoRA rank", low=1)
    lora_alpha: int = _key(32, "optimisation", "LoRA scale numerator (scale = alpha / r)")
    lora_dropout: float = _key(0.0, "optimisation", "dropout on the LoRA input", **_FRACTION)
    lora_target_modules: str = _key(
        "all-linear", "optimisation", "comma list of module names, or all-linear"
    )
    merge_lora: bool = _key(False, "run", "also write the merged full model at the end")

    batch_size: int = _key(4, "optimisation", "pairs per process per micro-batch", low=1)
    gradient_accumulation_steps: int = _key(
        1, "optimisation", "micro-batches per optimizer step", low=1
    )
    learning_rate: float = _key(1e-6, "optimisation", "peak learning rate", **_POSITIVE)
    optimizer: str = _key("adamw", "optimisation", "optimizer", choices=("adamw", "rmsprop"))
    weight_decay: float = _key(0.0, "optimisation", "decoupled weight decay", low=0.0)
    adam_beta1: float = _key(0.9, "optimisation", "AdamW's beta1", **_FRACTION)
    adam_beta2: float = _key(0.999, "optimisation", "AdamW's beta2", **_FRACTION)
    lr_scheduler: str = _key(
        "linear",
        "optimisation",
        "learning-rate schedule after warmup",
        choices=("linear", "cosine", "constant"),
    )
    warmup_ratio: float = _key(
        0.1, "optimisation", "share of the optimizer steps spent warming up", **_FRACTION
    )
    warmup_steps: int | None = _key(
        None,
        "optimisation",
        "warmup optimizer steps (below 1: a ratio, as transformers 5); overrides warmup_ratio",
        kind=int,
        low=0,
    )
    max_grad_norm: float = _key(1.0, "optimisation", "gradient clipping; 0 disables it", low=0.0)
    num_epochs: float = _key(1.0, "optimisation", "passes over the data", **_POSITIVE)
    max_steps: int | None = _key(
        None, "optimisation", "optimizer steps; overrides num_epochs", kind=int, low=1
    )
    seed: int = _key(42, "run", "seed of the data order, dropout and sampling")
    shuffle: bool = _key(True, "data", "shuffle the training rows each epoch")

    logging_steps: int = _key(1, "logging", "optimizer steps between metric lines", low=1)
    eval_steps: int | None = _key(
        None, "logging", "optimizer steps between evaluations (None: at the end)", kind=int, low=1
    )
    # transformers' TrainingArguments default (save_strategy="steps", save_steps=500): a run
    # killed after step 500 resumes; a checkpoint is also saved at the last step.
    save_steps: int | None = _key(
        500,
        "logging",
        "optimizer steps between checkpoints, also saved at the last step (none: final only)",
        kind=int,
        low=1,
        optional=True,
    )
    save_total_limit: int = _key(2, "logging", "checkpoints kept", low=1)
    # Run directory ownership (dpokit.rundir): a fresh run needs an empty output_dir.
    resume: str = _key(
        "false",
        "run",
        "true: continue the run in output_dir (refused if its settings differ); force: anyway",
        choices=("false", "true", "force"),
    )
    overwrite: bool = _key(False, "run", "clear the earlier run in output_dir when this one starts")
    report_to: str = _key(
        "none",
        "logging",
        "metric trackers besides metrics.jsonl",
        choices=("none", "tensorboard", "wandb", "all"),
    )
    progress: bool = _key(True, "logging", "show a progress bar")
    nonfinite: str = _key(
        "stop",
        "optimisation",
        "NaN/inf loss: stop (after a checkpoint) or skip the batch",
        choices=("stop", "skip"),
    )

    def __post_init__(self) -> None:
        validate(self)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; method hyperparameters may sit at the top level, and TRL's
        names (:mod:`dpokit.trl_names`) stand for dpokit's keys.

        Raises :class:`ConfigError` listing EVERY unknown key (each with its closest names,
        TRL's included) and every TRL name without a dpokit meaning, at once.
        """
        values, problems = translate(values)
        method_args = dict(values.pop("method_args", None) or {})
        known = {f.name for f in dataclasses.fields(cls)}
        spec = _method_spec(values.get("method", cls.method))
        method_keys = set(spec.hyperparameters)
        kwargs: dict[str, Any] = {}
        unknown: list[str] = []
        for key, value in values.items():
            alias = method_alias(key, spec.name, method_keys)
            if key in known:
                kwargs[key] = value  # converted and checked by validate()
            elif key in method_keys:
                method_args[key] = value
            elif alias is not None:
                if alias in values and values[alias] != value:
                    problems.append(
                        f"{key}={value!r} is {alias} for {spec.name}, but {alias}="
                        f"{values[alias]!r} is given"
                    )
                method_args[alias] = value
            elif key in METHOD_ALIASES:
                if value not in (None, 0, 0.0):
                    logger.warning(ignored_method_name(key, value, spec.name))
            else:
                unknown.append(key)
        if problems or unknown:
            raise ConfigError(
                unknown_keys_message(unknown, problems, known | method_keys, spec.name)
            )
        kwargs["method_args"] = method_args
        return cls(**kwargs)

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: list[str] | None = None, **values: Any
    ) -> TrainConfig:
        """YAML file, then keyword values, then ``key=value`` strings (later ones win, whether a
        key is spelt dpokit's way or TRL's)."""
        merged: dict[str, Any] = {}
        if path is not None:
            loaded = read_yaml(Path(path)) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: a config file must be a YAML mapping")
            merge_settings(merged, loaded)
        merge_settings(merged, {k: v for k, v in values.items() if v is not None})
        command_line: dict[str, Any] = {}  # one source: two spellings of a setting are refused
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            try:
                command_line[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"override {item!r}: the value is not valid YAML ({yaml_problem(err)})"
                ) from None
        merge_settings(merged, command_line)
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        """Every key and its value, as :meth:`from_dict` takes them."""
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        """Write the config as YAML that :meth:`load` reads back to an equal config."""
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _method_spec(method_name: Any) -> MethodSpec:
    try:
        return get_method(str(method_name))
    except ValueError as err:
        raise ConfigError(str(err)) from None
