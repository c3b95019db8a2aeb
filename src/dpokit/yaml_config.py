"""Reading a YAML config file: one clear line for every way it can be wrong.

PyYAML's ``safe_load`` keeps the last of two equal keys in one mapping without a word, and its
errors are tracebacks; :func:`read_yaml` refuses a repeated key and names the file, line and
column of any problem.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from dpokit.errors import ConfigError

__all__ = ["read_yaml", "yaml_problem"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""


def _unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"key {key!r} is given twice", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _unique_mapping)


def read_yaml(path: Path) -> Any:
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
        return yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f", line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML: {yaml_problem(err)}") from None


def yaml_problem(err: Exception) -> str:
    """A PyYAML error in a few words: its context and problem, else its first line."""
    problem = getattr(err, "problem", None)
    context = getattr(err, "context", None)
    return " ".join(part for part in (context, problem) if part) or str(err).splitlines()[0]
