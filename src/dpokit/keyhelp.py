"""The text of ``dpokit train --help``: every config key with its type, default and description,
grouped as :data:`dpokit.config.GROUPS`, and a method's hyperparameters.

Everything is read from the field metadata of :class:`~dpokit.config.TrainConfig` (``_key``) and
from the method table (:data:`dpokit.losses.METHODS`), so a new key or hyperparameter appears here
by itself.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from dpokit.config import GROUPS, TrainConfig
from dpokit.losses import get_method
from dpokit.losses.hyperparameters import describe_value
from dpokit.trl_names import METHOD_ALIASES
from dpokit.trl_translate import method_alias

_NAME_WIDTH = 28
_TYPE_WIDTH = 18


def _default(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _line(name: str, default: Any, kind: str, text: str) -> str:
    head = f"  {name}={_default(default)}"
    head = head.ljust(_NAME_WIDTH) if len(head) < _NAME_WIDTH else head + "  "
    kind = kind.ljust(_TYPE_WIDTH) if len(kind) < _TYPE_WIDTH else kind + " "
    return f"{head}{kind} {text}".rstrip()


def _type_text(metadata) -> str:
    kind = describe_value(
        metadata["type"],
        metadata["low"],
        metadata["high"],
        low_open=metadata["low_open"],
        high_open=metadata["high_open"],
        choices=metadata["choices"],
    )
    if metadata["choices"]:
        kind = "|".join(metadata["choices"])
    return f"{kind} or none" if metadata["optional"] else kind


def config_keys_help() -> str:
    """Every ``TrainConfig`` key, one line each (``name=default  type  description``), under a
    heading per group (run, data, optimisation, reference, memory, logging)."""
    fields = [f for f in dataclasses.fields(TrainConfig) if f.name != "method_args"]
    blocks = []
    for group in GROUPS:
        lines = [f"{group}:"]
        for f in fields:
            if f.metadata["group"] != group:
                continue
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()
            lines.append(_line(f.name, default, _type_text(f.metadata), f.metadata["help"]))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)


def method_help(method: str) -> str:
    """The hyperparameters of ``method`` (type, default, description), as ``key=value`` lines.

    Raises ``ValueError`` for an unknown method (the message lists the valid ones).
    """
    spec = get_method(method)
    lines = [f"method {spec.name} ({spec.title}): {spec.formula}"]
    for name, hp in spec.hyperparameters.items():
        lines.append(_line(name, hp.default, hp.describe(), hp.help))
    if not spec.hyperparameters:
        lines.append("  (no hyperparameters)")
    keys = set(spec.hyperparameters)
    for trl in METHOD_ALIASES:
        key = method_alias(trl, spec.name, keys)
        if key is not None:
            lines.append(f"  {trl}=... is read as {key} (TRL's name)")
    return "\n".join(lines)


def train_help(method: str | None = None, hyperparameters: bool = True) -> str:
    """The epilog of ``dpokit train --help``: the config keys by group, then the hyperparameters
    of ``method`` (default: TrainConfig's default method) unless ``hyperparameters`` is false."""
    text = (
        "config keys (set as key=value after the flags, or in the --config YAML; TRL's names "
        "such as per_device_train_batch_size are read too, see docs/trl.md):\n\n"
        + config_keys_help()
    )
    if not hyperparameters:
        return text
    name = method or TrainConfig.method
    try:
        methods = method_help(name)
    except ValueError as err:
        methods = str(err)
    return (
        f"{text}\n\nmethod hyperparameters (key=value; `--method X --help` shows method X's, "
        f"`dpokit methods -v` all of them):\n{methods}"
    )
