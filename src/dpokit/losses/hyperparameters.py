"""Typed settings: the one converter for method hyperparameters and ``TrainConfig`` keys.

A value arrives as YAML gives it, as a ``key=value`` string from the command line, or as a Python
object. :func:`convert` turns it into the declared type (or says it cannot), :func:`check_value`
adds the range and choice checks, and :class:`Hyperparameter` declares one method hyperparameter
with them. :mod:`dpokit.config` checks every ``TrainConfig`` field with the same two functions.
"""

from __future__ import annotations

import difflib
import math
import numbers
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from dpokit.losses.base import check_choice, check_range, describe_range

TRUE_WORDS = ("true", "yes", "on", "1")
FALSE_WORDS = ("false", "no", "off", "0")

__all__ = [
    "FALSE_WORDS",
    "TRUE_WORDS",
    "Hyperparameter",
    "check_value",
    "convert",
    "describe_value",
    "normalise_choice",
    "resolve",
    "resolve_hyperparameters",
]


def convert(value: Any, kind: type) -> Any:
    """``value`` as ``kind`` (``bool``, ``int``, ``float``, ``str`` or ``dict``), or ``None``.

    ``None`` means "cannot be converted"; no valid setting is ``None`` (optional settings are
    handled by the caller before conversion). Bools are never numbers and numbers are never bools,
    except 0/1. Strings as the command line gives them are parsed: ``"1e-3"`` -> 0.001, ``"4"`` or
    ``"4.0"`` -> int 4, ``"yes"``/``"off"`` -> bool. ``"nan"``/``"inf"`` convert to floats: finite-
    ness is a range question (:func:`check_value`). Paths and numbers convert to ``str``.
    """
    if kind is bool:
        return _to_bool(value)
    if kind is str:
        if isinstance(value, str):
            return value
        if isinstance(value, os.PathLike):
            return os.fspath(value)
        is_number = isinstance(value, numbers.Real) and not isinstance(value, bool)
        return str(value) if is_number else None
    if kind is dict:
        return dict(value) if isinstance(value, Mapping) else None
    if kind in (int, float):
        return _to_number(value, kind)
    raise TypeError(f"no conversion to {kind!r}; settings are bool, int, float, str or dict")


def _to_bool(value: Any) -> bool | None:
    if isinstance(value, bool):
        return value
    if isinstance(value, numbers.Integral) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in TRUE_WORDS + FALSE_WORDS:
        return value.strip().lower() in TRUE_WORDS
    return None


def _to_number(value: Any, kind: type) -> int | float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, str):
        text = value.strip()
        try:  # exact for integers beyond 2**53, which a float would round
            return kind(int(text))
        except ValueError:
            pass
        try:
            value = float(text)
        except ValueError:
            return None
    if not isinstance(value, numbers.Real):
        return None
    if kind is int:
        if isinstance(value, numbers.Integral):
            return int(value)
        return int(value) if math.isfinite(value) and float(value).is_integer() else None
    return float(value)


def normalise_choice(value: str) -> str:
    """How a string is matched against a list of choices: stripped and lower-cased."""
    return value.strip().lower()


def describe_value(
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
) -> str:
    """``"float > 0"``, ``"float in [0, 0.5)"``, ``"one of 'a', 'b'"``, ``"bool"``."""
    if choices is not None:
        return "one of " + ", ".join(map(repr, choices))
    if kind in (float, int) and (low is not None or high is not None):
        interval = describe_range(low, high, low_open=low_open, high_open=high_open)
        return f"{kind.__name__} {interval}"
    return kind.__name__


def check_value(
    name: str,
    value: Any,
    kind: type,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """``value`` converted to ``kind`` by :func:`convert` and checked; returns the converted value.

    Numbers must be finite and in the range ``low``..``high`` (``low_open``/``high_open`` make an
    end exclusive); strings with ``choices`` are matched after :func:`normalise_choice` and the
    normalised string is returned.

    Raises:
        ValueError: naming ``name`` and the valid values, when ``value`` cannot be converted, is
            NaN or infinite, is out of range or is not one of ``choices``.
    """
    bounds = dict(low=low, high=high, low_open=low_open, high_open=high_open)
    description = describe_value(kind, **bounds, choices=choices)
    converted = convert(value, kind)
    if converted is None:
        raise ValueError(f"{name} must be {description}, got {value!r}")
    if choices is not None:
        converted = normalise_choice(converted)
        check_choice(name, converted, choices)
    elif kind in (float, int):
        if not math.isfinite(converted):
            raise ValueError(f"{name} must be a finite {description}, got {value!r}")
        check_range(name, converted, **bounds)
    return converted


@dataclass(frozen=True)
class Hyperparameter:
    """One hyperparameter of a method: default, type, help text and valid values.

    ``type`` is ``float``, ``int``, ``bool`` or ``str``. Numbers may have a range (``low``/``high``,
    ``low_open``/``high_open`` for exclusive ends); strings may have ``choices``.
    """

    default: Any
    type: type
    help: str
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    choices: tuple[str, ...] | None = None

    def _bounds(self) -> dict[str, Any]:
        return dict(
            low=self.low,
            high=self.high,
            low_open=self.low_open,
            high_open=self.high_open,
            choices=self.choices,
        )

    def describe(self) -> str:
        """``"float > 0"``, ``"float in [0, 0.5)"``, ``"one of 'a', 'b'"``, ``"bool"``."""
        return describe_value(self.type, **self._bounds())

    def parse(self, name: str, value: Any) -> Any:
        """Convert ``value`` (a CLI string like ``"0.2"``/``"true"`` included) and check it.

        A hyperparameter whose default is None is optional: None stays None (``combined``'s
        shared names, unset). Raises ``ValueError`` naming ``name`` and the valid values (see
        :func:`check_value`).
        """
        if value is None and self.default is None:
            return None
        return check_value(name, value, self.type, **self._bounds())


class HasHyperparameters(Protocol):
    """What :func:`resolve_hyperparameters` reads of a method (a ``MethodSpec``)."""

    name: str
    hyperparameters: Mapping[str, Hyperparameter]


def resolve_hyperparameters(
    spec: HasHyperparameters, overrides: Mapping[str, Any] | None = None
) -> dict[str, Any]:
    """All of ``spec``'s hyperparameters: defaults, replaced by ``overrides`` converted and checked.

    Keys may use ``-`` for ``_``. Raises ``ValueError`` on an unknown key (listing the valid ones)
    or a value of the wrong type or out of range (giving the valid range), so configuration errors
    surface before any model is loaded.
    """
    return resolve(spec.name, spec.hyperparameters, overrides)


def resolve(
    method: str,
    hyperparameters: Mapping[str, Hyperparameter],
    overrides: Mapping[str, Any] | None,
) -> dict[str, Any]:
    """:func:`resolve_hyperparameters` given the method's name and hyperparameters separately
    (for building a method's ``compute`` before its ``MethodSpec`` exists)."""
    given = {str(key).replace("-", "_"): value for key, value in (overrides or {}).items()}
    unknown = sorted(set(given) - set(hyperparameters))
    if unknown:
        hints = []
        for key in unknown:
            close = difflib.get_close_matches(key, list(hyperparameters), n=1)
            if close:
                hints.append(f"{key!r}: did you mean {close[0]!r}?")
        hint = f" ({'; '.join(hints)})" if hints else ""
        raise ValueError(
            f"unknown hyperparameter(s) {', '.join(map(repr, unknown))} for method "
            f"{method}{hint}; valid: {', '.join(hyperparameters) or 'none'}"
        )
    return {
        name: hp.parse(name, given[name]) if name in given else hp.default
        for name, hp in hyperparameters.items()
    }
