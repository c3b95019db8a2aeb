"""Run configuration: one dataclass with defaults, loaded from YAML and ``key=value`` overrides.

Everything is validated here, before any model or dataset is touched, so a typo costs a second and
not a model load: unknown keys (with the closest valid names), wrong types, values out of range and
unknown methods all raise :class:`ConfigError`.

Method hyperparameters (``beta``, ``lam``, ``eps`` ...) may be given at the top level or under
``method_args``; which keys a method accepts comes from its entry in :data:`dpokit.losses.METHODS`.
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import EXIT_CONFIG, UserError
from dpokit.losses import get_method, resolve_hyperparameters

CHOICES: dict[str, tuple[str, ...]] = {
    "optimizer": ("adamw", "rmsprop"),
    "lr_scheduler": ("linear", "cosine", "constant"),
    "mixed_precision": ("auto", "no", "bf16", "fp16"),
    "dtype": ("auto", "float32", "bfloat16", "float16"),
    "reference_mode": ("auto", "model", "adapter", "precomputed", "none"),
    "truncation": ("truncate", "error"),
    "identical_pairs": ("keep", "drop"),
    "bad_scores": ("drop", "error"),
    "report_to": ("none", "tensorboard", "wandb", "all"),
    "nonfinite": ("stop", "skip"),
    "packing": ("auto", "none", "shared_prompt", "padding_free"),
}


class ConfigError(UserError, ValueError):
    """A run configuration that cannot work; raised before anything is loaded (exit code 2)."""

    exit_code = EXIT_CONFIG


@dataclass
class TrainConfig:
    """Everything a ``dpokit train`` run needs. Field comments are the ``--help`` text."""

    # What to train
    method: str = "dpo"  # a name from `dpokit methods`
    model: str = ""  # local path or hub id of the starting policy
    data: str = ""  # JSONL/JSON/Parquet/CSV file, saved dataset dir, or hub dataset name
    reference: str | None = None  # reference model path/id; default: the starting policy
    method_args: dict[str, Any] = field(default_factory=dict)  # method hyperparameters
    output_dir: str = "runs/dpokit"

    # Data
    data_split: str | None = None  # split to read from a multi-split dataset (default: train)
    eval_data: str | None = None  # held-out file; otherwise eval_fraction of `data`
    eval_fraction: float = 0.0
    max_length: int | None = 1024  # prompt + completion tokens; none: no bound
    max_prompt_length: int | None = 512  # none: max_length - 1
    truncation: str = "truncate"  # over-long rows: truncate (counted) or error
    identical_pairs: str = "keep"  # chosen == rejected: keep (counted) or drop (counted)
    bad_scores: str = "error"  # ODPO ties / reversed scores: drop (counted) or error
    chat_template: str | None = None  # Jinja template file overriding the tokenizer's
    num_proc: int | None = None  # tokenization processes

    # Reference model
    reference_mode: str = "auto"  # auto | model | adapter (LoRA off) | precomputed | none
    reference_cache_dir: str | None = None  # default ~/.cache/dpokit/reference_logps

    # Model
    dtype: str = "auto"  # weights dtype; auto = float32 (mixed precision does the rest)
    mixed_precision: str = "auto"  # auto = bf16 on GPUs that support it, fp32 on CPU
    gradient_checkpointing: bool = False
    logps_chunk_size: int = 1024  # completion positions per LM-head chunk
    logps_saved_softmax_mb: int = 512  # LM-head softmax kept for backward, not recomputed; 0: none

    # Speed (the measurements behind these defaults: PERFORMANCE.md)
    packing: str = "auto"  # pairs: auto | none (2 rows/pair) | shared_prompt | padding_free
    packing_length: int | None = None  # padding_free: tokens per packed row (None: one row)
    group_by_length: bool = False  # shuffled batches of similar lengths (less padding)
    fused_optimizer: bool = True  # AdamW as one fused kernel over all parameters
    lora: bool = False
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.0
    lora_target_modules: str = "all-linear"  # comma list of module names, or all-linear
    merge_lora: bool = False  # also write the merged full model at the end

    # Optimisation
    batch_size: int = 4  # pairs per process per micro-batch
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-6
    optimizer: str = "adamw"
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    lr_scheduler: str = "linear"
    warmup_ratio: float = 0.1
    warmup_steps: int | None = None  # overrides warmup_ratio
    max_grad_norm: float = 1.0  # 0 disables clipping
    num_epochs: float = 1.0
    max_steps: int | None = None  # optimizer steps; overrides num_epochs
    seed: int = 42
    shuffle: bool = True

    # Logging, evaluation, checkpoints
    logging_steps: int = 1
    eval_steps: int | None = None
    save_steps: int | None = None
    save_total_limit: int = 2
    resume: bool = False  # continue from the newest complete checkpoint in output_dir
    report_to: str = "none"
    progress: bool = True
    nonfinite: str = "stop"  # NaN/inf loss: stop (after a checkpoint) or skip the batch

    def __post_init__(self) -> None:
        validate(self)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a mapping; method hyperparameters may sit at the top level."""
        values = dict(values)
        method_args = dict(values.pop("method_args", None) or {})
        known = {f.name: f for f in dataclasses.fields(cls)}
        method_name = values.get("method", cls.method)
        method_keys = _method_keys(method_name)
        kwargs: dict[str, Any] = {}
        for key, value in values.items():
            key = key.replace("-", "_")
            if key in known:
                kwargs[key] = _coerce(key, value, known[key].type)
            elif key in method_keys:
                method_args[key] = value
            else:
                raise ConfigError(_unknown_key_message(key, list(known) + sorted(method_keys)))
        kwargs["method_args"] = method_args
        return cls(**kwargs)

    @classmethod
    def load(
        cls, path: str | Path | None = None, overrides: list[str] | None = None, **values: Any
    ) -> TrainConfig:
        """YAML file, then keyword values, then ``key=value`` strings (later ones win)."""
        merged: dict[str, Any] = {}
        if path is not None:
            loaded = _read_yaml(Path(path)) or {}
            if not isinstance(loaded, dict):
                raise ConfigError(f"{path}: a config file must be a YAML mapping")
            merged.update(loaded)
        merged.update({k: v for k, v in values.items() if v is not None})
        for item in overrides or []:
            key, sep, raw = item.partition("=")
            if not sep or not key:
                raise ConfigError(f"override {item!r} is not of the form key=value")
            try:
                merged[key.strip()] = yaml.safe_load(raw) if raw.strip() else None
            except yaml.YAMLError as err:
                raise ConfigError(
                    f"override {item!r}: the value is not valid YAML ({_yaml_problem(err)})"
                ) from None
        return cls.from_dict(merged)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))


def _read_yaml(path: Path) -> Any:
    """A YAML file's content; `ConfigError` naming the file (and line, column) if it cannot be
    read, is not UTF-8 or is not valid YAML."""
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as err:
        raise ConfigError(f"{path}: cannot read the config file: {err.strerror}") from None
    except UnicodeDecodeError as err:
        line = err.object[: err.start].count(b"\n") + 1
        raise ConfigError(
            f"{path}, line {line}: not UTF-8 text (byte {err.object[err.start]:#04x})"
        ) from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {_yaml_problem(err)}") from None


def _yaml_problem(err: Exception) -> str:
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    return " ".join(part for part in (context, problem) if part) or str(err).splitlines()[0]


def _method_keys(method_name: str) -> set[str]:
    try:
        return set(get_method(str(method_name)).hyperparameters)
    except ValueError as err:
        raise ConfigError(str(err)) from None


def _unknown_key_message(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=3)
    hint = f" Did you mean {', '.join(close)}?" if close else ""
    return f"unknown config key {key!r}.{hint} Valid keys: {', '.join(valid)}"


def _coerce(key: str, value: Any, annotation: Any) -> Any:
    """Convert YAML/CLI values to the field's type, refusing what cannot be converted."""
    hint = typing.get_type_hints(TrainConfig)[key] if isinstance(annotation, str) else annotation
    options = typing.get_args(hint) if _is_union(hint) else (hint,)
    if (
        isinstance(value, str)
        and value.strip().lower() in ("none", "null")
        and (type(None) in options)
    ):
        value = None  # `max_length=none` on the command line unsets an optional key
    if value is None:
        if type(None) in options:
            return None
        raise ConfigError(f"config key {key!r} needs a value")
    for option in options:
        if option is type(None):
            continue
        converted = _convert(value, option)
        if converted is not _FAIL:
            return converted
    names = " or ".join(getattr(o, "__name__", str(o)) for o in options if o is not type(None))
    raise ConfigError(f"config key {key!r} must be {names}, got {value!r}")


_FAIL = object()


def _is_union(hint: Any) -> bool:
    return typing.get_origin(hint) in (typing.Union, types.UnionType)


def _convert(value: Any, target: Any) -> Any:
    origin = typing.get_origin(target) or target
    if origin is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "yes", "no", "1", "0"):
            return value.lower() in ("true", "yes", "1")
        return _FAIL
    if origin is int:
        if isinstance(value, bool):
            return _FAIL
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(value)
            except ValueError:
                return _FAIL
        return _FAIL
    if origin is float:
        if isinstance(value, bool):
            return _FAIL
        try:
            return float(value)
        except (TypeError, ValueError):
            return _FAIL
    if origin is str:
        return value if isinstance(value, str) else str(value)
    if origin is dict:
        return dict(value) if isinstance(value, dict) else _FAIL
    return value


def validate(config: TrainConfig) -> None:
    """Raise :class:`ConfigError` on any value that cannot work, naming the valid choices."""
    try:
        spec = get_method(config.method)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config.method = spec.name
    try:
        config.method_args = resolve_hyperparameters(spec, config.method_args)
    except ValueError as err:
        raise ConfigError(f"method {spec.name}: {err}") from None
    for key, choices in CHOICES.items():
        value = getattr(config, key)
        if value not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    positive = ("batch_size", "gradient_accumulation_steps")
    for key in positive + ("logging_steps", "save_total_limit", "logps_chunk_size", "lora_r"):
        if getattr(config, key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {getattr(config, key)}")
    for key, least in (("max_length", 2), ("max_prompt_length", 1)):
        value = getattr(config, key)
        if value is not None and value < least:
            raise ConfigError(f"{key} must be >= {least} or none (no bound), got {value}")
    if config.logps_saved_softmax_mb < 0:
        raise ConfigError(
            f"logps_saved_softmax_mb must be >= 0 (0: recompute all), "
            f"got {config.logps_saved_softmax_mb}"
        )
    if config.packing_length is not None and config.packing_length < 1:
        raise ConfigError(f"packing_length must be >= 1, got {config.packing_length}")
    if config.packing_length is not None and config.packing not in ("auto", "padding_free"):
        raise ConfigError(
            f"packing_length applies to packing=padding_free only (packing={config.packing!r})"
        )
    for key in ("max_steps", "eval_steps", "save_steps", "warmup_steps"):
        value = getattr(config, key)
        if value is not None and value < (0 if key == "warmup_steps" else 1):
            raise ConfigError(f"{key} must be positive, got {value}")
    if (
        config.max_length is not None
        and config.max_prompt_length is not None
        and config.max_prompt_length >= config.max_length
    ):
        raise ConfigError(
            f"max_prompt_length ({config.max_prompt_length}) must be < max_length "
            f"({config.max_length}) so that every completion keeps at least one token"
        )
    if config.chat_template and not Path(config.chat_template).is_file():
        raise ConfigError(f"chat_template={config.chat_template!r}: no such file")
    if config.learning_rate <= 0:
        raise ConfigError(f"learning_rate must be > 0, got {config.learning_rate}")
    if not 0.0 <= config.eval_fraction < 1.0:
        raise ConfigError(f"eval_fraction must be in [0, 1), got {config.eval_fraction}")
    if not 0.0 <= config.warmup_ratio < 1.0:
        raise ConfigError(f"warmup_ratio must be in [0, 1), got {config.warmup_ratio}")
    if config.num_epochs <= 0:
        raise ConfigError(f"num_epochs must be > 0, got {config.num_epochs}")
    if config.max_grad_norm < 0:
        raise ConfigError(f"max_grad_norm must be >= 0, got {config.max_grad_norm}")
    if config.reference_mode == "adapter" and not config.lora:
        raise ConfigError("reference_mode=adapter needs lora=true (the reference is LoRA off)")
    if config.reference_mode == "none" and spec.reference != "none":
        raise ConfigError(f"method {spec.name} needs a reference model; reference_mode=none")
    if spec.reference == "online" and config.reference_mode == "precomputed":
        raise ConfigError(
            f"method {spec.name} needs the reference's full token distributions each step "
            "(token-level KL); cached sequence log-probs are not enough: use reference_mode=auto"
        )


def config_help() -> str:
    """One line per config key with its default, for ``dpokit train --help``."""
    lines = []
    for f in dataclasses.fields(TrainConfig):
        default = f.default if f.default is not dataclasses.MISSING else "{}"
        choices = CHOICES.get(f.name)
        extra = f" (one of {', '.join(choices)})" if choices else ""
        lines.append(f"  {f.name}={default}{extra}")
    return "\n".join(lines)
