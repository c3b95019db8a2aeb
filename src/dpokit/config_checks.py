"""The checks of a run configuration: each key alone (:func:`check_field`, from the field's
metadata), then the keys together and the method (:func:`check_combinations`). :func:`validate`
runs both; :class:`~dpokit.config.TrainConfig` calls it on every construction.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpokit.errors import ConfigError
from dpokit.losses import MethodSpec, get_method, resolve_hyperparameters
from dpokit.losses.hyperparameters import check_value, normalise_choice

logger = logging.getLogger("dpokit.config")

NONE_WORDS = ("none", "null", "~", "")  # `max_length=none` unsets an optional key
# report_to -> the packages accelerate's tracker may use (any one of them will do).
TRACKER_PACKAGES = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}


def validate(config: Any) -> None:
    """``config`` is a :class:`~dpokit.config.TrainConfig` (not imported: it imports this).

    Convert and check every field in place; raise :class:`ConfigError` on any value that
    cannot work, naming the valid values or choices."""
    warmup_fraction(config)
    for f in dataclasses.fields(config):
        setattr(config, f.name, check_field(f.name, getattr(config, f.name), f.metadata))
    try:
        spec = get_method(config.method)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    config.method = spec.name
    try:
        config.method_args = resolve_hyperparameters(spec, config.method_args)
        spec = spec.bind(config.method_args)  # combined: its components' needs, checked
    except ValueError as err:
        raise ConfigError(f"method {spec.name}: {err}") from None
    check_combinations(config, spec)


def warmup_fraction(config: Any) -> None:
    """``warmup_steps`` below 1 is a share of the run's optimizer steps, as transformers 5's
    ``TrainingArguments.warmup_steps`` reads it (that version has no ``warmup_ratio``): it
    becomes ``warmup_ratio`` (rounded up into steps, :func:`dpokit.optim.resolve_warmup`)."""
    value = config.warmup_steps
    if isinstance(value, float) and 0.0 < value < 1.0:
        logger.info("warmup_steps=%s is below 1: a ratio of the steps (warmup_ratio)", value)
        config.warmup_ratio, config.warmup_steps = value, None


def _yaml_word(value: bool, choices: tuple[str, ...]) -> Any:
    """The choice YAML read as a boolean: ``mixed_precision: no`` arrives as False, ``resume:
    true`` as True; a str key takes the word among its choices (else the bool is refused)."""
    words = ("true", "yes", "on") if value else ("false", "no", "off")
    return next((word for word in words if word in choices), value)


def check_field(key: str, value: Any, metadata: Mapping[str, Any]) -> Any:
    """``value`` of config key ``key`` converted to the type in its field ``metadata`` (see
    ``_key``) and checked against its range or choices, by the converter that checks method
    hyperparameters (:func:`dpokit.losses.hyperparameters.check_value`).

    Raises:
        ConfigError: for None where the key needs a value, a value of the wrong type, NaN or
            infinity for a float key, a number out of range or a string not among the choices.
    """
    if isinstance(value, str) and metadata["optional"] and value.strip().lower() in NONE_WORDS:
        value = None  # `max_length=none` on the command line unsets an optional key
    if value is None:
        if metadata["optional"]:
            return None
        raise ConfigError(f"config key {key!r} needs a value")
    bounds = {name: metadata[name] for name in ("low", "high", "low_open", "high_open")}
    if isinstance(value, bool) and metadata["type"] is str:
        value = _yaml_word(value, metadata["choices"] or ())
    try:
        converted = check_value(key, value, metadata["type"], **bounds)
    except ValueError as err:
        raise ConfigError(f"config key {err}") from None
    choices = metadata["choices"]
    if choices is not None:
        converted = normalise_choice(converted)
        if converted not in choices:
            raise ConfigError(f"{key}={value!r} is not one of: {', '.join(choices)}")
    return converted


def no_eval_data(what: str) -> str:
    """The one line for an evaluation asked for (``what``) without held-out data: a careful user
    who sets ``eval_steps`` expects evaluations, so it is refused rather than silently skipped."""
    return (
        f"{what} evaluates on held-out data, but the run has none: give eval_data=FILE (or "
        "--eval-data FILE), or eval_fraction=0.1 to hold out a share of `data`; or unset "
        "eval_steps"
    )


def check_tracker(report_to: str) -> None:
    """``report_to`` names a tracker whose package is installed; else `ConfigError` naming the
    package to install. accelerate would only warn and train with no tracking at all. Checked
    when a run builds its accelerator (before data or model load), not on every config: a
    config may be written on a machine without the tracker for a run elsewhere."""
    wanted = TRACKER_PACKAGES if report_to == "all" else {report_to: TRACKER_PACKAGES[report_to]}
    missing = {
        name: packages
        for name, packages in wanted.items()
        if not any(importlib.util.find_spec(package) for package in packages)
    }
    if report_to == "all" and len(missing) < len(wanted):
        return  # "all": every tracker that is installed
    if missing:
        names = ", ".join(missing)
        what = f"{names} is not" if len(missing) == 1 else f"none of {names} is"
        install = " or ".join(f"pip install {packages[0]}" for packages in missing.values())
        raise ConfigError(
            f"report_to={report_to}: {what} installed, so nothing would be tracked: {install},"
            " or set report_to=none (metrics.jsonl is always written)"
        )


def check_combinations(config: Any, spec: MethodSpec) -> None:
    """The checks that involve several keys, the method or the file system (each key alone has
    passed :func:`check_field`)."""
    if config.packing_length is not None and config.packing not in ("auto", "padding_free"):
        raise ConfigError(
            f"packing_length applies to packing=padding_free only (packing={config.packing!r})"
        )
    if (
        config.max_length is not None
        and config.max_prompt_length is not None
        and config.max_prompt_length >= config.max_length
    ):
        raise ConfigError(
            f"max_prompt_length ({config.max_prompt_length}) must be < max_length "
            f"({config.max_length}) so that every completion keeps at least one token"
        )
    if config.eval_steps and not config.eval_data and not config.eval_fraction:
        raise ConfigError(no_eval_data(f"eval_steps={config.eval_steps}"))
    if config.chat_template and not Path(config.chat_template).is_file():
        raise ConfigError(f"chat_template={config.chat_template!r}: no such file")
    dedicated = {"dtype", "torch_dtype", "attn_implementation", "trust_remote_code"}
    if dedicated & set(config.model_init_kwargs):
        raise ConfigError(
            f"model_init_kwargs: {sorted(dedicated & set(config.model_init_kwargs))} have their "
            "own config keys (dtype, attn_implementation, trust_remote_code): set those"
        )
    if config.reference_mode == "adapter" and not config.lora:
        raise ConfigError("reference_mode=adapter needs lora=true (the reference is LoRA off)")
    if config.reference_mode == "none" and spec.reference != "none":
        raise ConfigError(f"method {spec.name} needs a reference model; reference_mode=none")
    if spec.reference == "online" and config.reference_mode == "precomputed":
        raise ConfigError(
            f"method {spec.name} needs the reference's full token distributions each step "
            "(token-level KL); cached sequence log-probs are not enough: use reference_mode=auto"
        )
