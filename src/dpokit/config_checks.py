"""The checks of a run configuration: each key alone (:func:`check_field`, from the field's
metadata), then the keys together and the method (:func:`check_combinations`). :func:`validate`
runs both; :class:`~dpokit.config.TrainConfig` calls it on every construction.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dpokit.errors import ConfigError
from dpokit.losses import MethodSpec, get_method, resolve_hyperparameters
from dpokit.losses.hyperparameters import check_value, normalise_choice

NONE_WORDS = ("none", "null", "~", "")  # `max_length=none` unsets an optional key


def validate(config: Any) -> None:
    """``config`` is a :class:`~dpokit.config.TrainConfig` (not imported: it imports this).

    Convert and check every field in place; raise :class:`ConfigError` on any value that
    cannot work, naming the valid values or choices."""
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
