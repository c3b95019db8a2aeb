"""Applying the TRL name table (:mod:`dpokit.trl_names`): TRL names -> dpokit keys, merging
settings from several sources, method-dependent names, and the one message for every unknown key.
"""

from __future__ import annotations

import difflib
import logging
from collections.abc import Mapping
from typing import Any

from dpokit.errors import ConfigError
from dpokit.losses import METHODS
from dpokit.losses.combined import NAME
from dpokit.losses.options import OPTION_LIMITS
from dpokit.trl_names import (
    ALIAS_BY_NAME,
    COSMETIC,
    LOSS_FIELD_NAMES,
    METHOD_ALIASES,
    REFUSED,
    SAME_BEHAVIOUR,
    TRL_NAMES,
)

logger = logging.getLogger(__name__)


def target(name: str) -> str:
    """The dpokit key a TRL name sets (the name itself for a dpokit key), so that a later source
    (the command line) replaces an earlier one (the YAML) under either spelling."""
    alias = ALIAS_BY_NAME.get(name)
    if alias is None or name in ("label_smoothing", "loss_weights", "dataset_test_split"):
        return name
    return alias.target.split(" ")[0]


def translate(values: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``values`` with TRL names replaced by dpokit keys; returns (translated, problems).

    ``problems`` holds one message per TRL name that has no dpokit meaning or a value dpokit
    cannot honour, so the caller reports them together with any unknown keys. A TRL name and its
    dpokit key both given with different values is a problem too. With ``loss_type``, the
    fields its losses read (``beta``, ``label_smoothing`` ...; ``dpokit.trl_losses.LOSS_FIELDS``)
    are read with it, per component; without it, method-dependent names
    (:data:`METHOD_ALIASES`) are left for :func:`method_alias`.
    """
    out: dict[str, Any] = {}
    problems: list[str] = []
    source: dict[str, str] = {}  # dpokit key -> the name that set it
    given = {str(k).replace("-", "_"): v for k, v in values.items()}
    for key, value in given.items():
        if key in ALIAS_BY_NAME and key not in METHOD_ALIASES and key != "loss_weights":
            try:
                settings = ALIAS_BY_NAME[key].convert(value, given)
            except (ValueError, TypeError) as err:
                problems.append(f"TRL's {key}={value!r}: {err}")
                continue
        elif key in SAME_BEHAVIOUR:
            accepted, reason = SAME_BEHAVIOUR[key]
            if value not in accepted:
                problems.append(f"TRL's {key}={value!r} has no dpokit equivalent: {reason}")
            continue
        elif key in COSMETIC:
            logger.info("TRL's %s ignored: it changes nothing that is trained", key)
            continue
        elif key in REFUSED:
            problems.append(f"TRL's {key} has no dpokit equivalent: {REFUSED[key]}")
            continue
        elif key in (*LOSS_FIELD_NAMES, "loss_weights") and "loss_type" in given:
            continue  # read with loss_type (dpokit.trl_losses), once per component
        elif key == "ld_alpha" and value is None:
            continue  # TRL's default: no length desensitising (dpokit's 1.0)
        else:
            settings = {key: value}
        for name, setting in settings.items():
            if name in out and out[name] != setting:
                problems.append(
                    f"{source[name]}={given[source[name]]!r} and {key}={value!r} both set {name}: "
                    "give one"
                )
                continue
            out[name], source[name] = setting, key
    older = ("max_prompt_length", "max_completion_length")  # TRL < 1.0's bounds
    if _trl_flavoured(given) and not any(name in given for name in older):
        # TRL 1.16's DPO/KTO configs bound the whole sequence only (max_length, default 1024 as
        # dpokit's; truncation keep_start): dpokit's prompt bound (512) would cut prompts TRL keeps
        # and refuse a TRL max_length <= 512.
        out.setdefault("max_prompt_length", None)
    return out, problems


def _trl_flavoured(given: Mapping[str, Any]) -> bool:
    """True when ``given`` uses a name only TRL spells that way (``model_name_or_path`` ...)."""
    return any(
        key in ALIAS_BY_NAME and ALIAS_BY_NAME[key].target.split(" ")[0] != key for key in given
    )


def method_alias(name: str, method: str, method_keys: set[str]) -> str | None:
    """The hyperparameter of ``method`` that the TRL name ``name`` stands for, or None."""
    table = METHOD_ALIASES.get(name, {})
    key = table.get(method, table.get("*"))
    return key if key in method_keys else None


def ignored_method_name(name: str, value: Any, method: str) -> str | None:
    """A warning for a method-dependent TRL name that TRL 1.16 ignores under ``method``; None if
    it is not such a name. ``label_smoothing`` under sigmoid is NOT cDPO in TRL 1.16."""
    if name == "label_smoothing":
        note = " (TRL before 1.0 read it as cDPO: use method cdpo with smoothing)"
        extra = note if method == "dpo" else ""
        return f"label_smoothing={value} ignored: TRL 1.16 ignores it under method {method}{extra}"
    if name in METHOD_ALIASES:
        return f"{name}={value} ignored: it has no meaning for method {method}"
    return None


def unknown_keys_message(
    unknown: list[str], problems: list[str], valid: set[str], method: str | None = None
) -> str:
    """One message for every unknown key and every TRL name dpokit cannot honour (``problems``,
    from :func:`translate`).

    A key that is a hyperparameter of other methods than ``method`` is told apart: it names the
    methods that take it (and why ``method`` does not, where :data:`OPTION_LIMITS` says).
    Any other key gets up to three close names among ``valid`` (the dpokit keys) and the TRL
    names, shown with the key they set.
    """
    candidates = sorted(valid) + sorted(TRL_NAMES - valid)

    def hint(key: str) -> str:
        close = difflib.get_close_matches(key, [c for c in candidates if c != key], 3, 0.7)
        return ", ".join(c if c in valid else f"{c} (TRL: {target(c)})" for c in close)

    parts = [not_taken(key, method) for key in unknown if _holders(key)]
    unknown = [key for key in unknown if not _holders(key)]
    if len(unknown) == 1:
        close = hint(unknown[0])
        parts.append(
            f"unknown config key {unknown[0]!r}." + (f" Did you mean {close}?" if close else "")
        )
    elif unknown:
        listed = [
            f"{key!r}" + (f" (did you mean {hint(key)}?)" if hint(key) else "") for key in unknown
        ]
        parts.append(f"{len(unknown)} unknown config keys: {', '.join(listed)}")
    suffix = " (`dpokit train --help` lists every key)" if unknown else ""
    return "; ".join([*parts, *problems]) + suffix


def _holders(key: str) -> list[str]:
    """The methods that have hyperparameter ``key`` (``combined``'s shared copies left out:
    combined only where it alone has the key, like ``loss_weights``)."""
    holders = [n for n, spec in METHODS.items() if key in spec.hyperparameters and n != NAME]
    return holders or ([NAME] if key in METHODS[NAME].hyperparameters else [])


def not_taken(key: str, method: str | None) -> str:
    """``"'f_divergence_type' is a hyperparameter of method(s) dpo, ..., not of method nca_pair
    (why)"``: the message for a known key that the chosen method does not take."""
    holders = _holders(key)
    why = f" ({OPTION_LIMITS[key]})" if key in OPTION_LIMITS else ""
    where = f", not of method {method}" if method else ""
    return f"{key!r} is a hyperparameter of method(s) {', '.join(holders)}{where}{why}"


def merge_settings(merged: dict[str, Any], new: Mapping[str, Any]) -> None:
    """``merged`` updated with ``new`` (one source: a YAML file, the keyword values or the
    command line); a key replaces an EARLIER source's spelling of the same setting
    (``model=`` on the command line replaces the YAML's ``model_name_or_path``).

    Two spellings of one setting in the same source both stay, so that :func:`translate` refuses
    them when they differ and reads names that go together (``bf16`` with ``fp16``) together.
    Raises :class:`ConfigError` when a method replaces a TRL ``loss_type`` whose meaning would be
    lost (CPOConfig's ``hinge``/``ipo`` by method cpo or cpo_simpo: dpokit has no such CPO).
    """
    names = {str(key).replace("-", "_"): value for key, value in new.items()}
    for name, value in names.items():
        earlier = [k for k in merged if k not in names and target(k) == target(name)]
        for old in earlier:
            _check_replacement(old, merged[old], name, value)
            del merged[old]
        merged[name] = value


def _check_replacement(old: str, old_value: Any, name: str, value: Any) -> None:
    loss_type = str(old_value).strip().lower() if old == "loss_type" else ""
    method = str(value).strip().lower() if name == "method" else ""
    if loss_type in ("hinge", "ipo") and method in ("cpo", "cpo_simpo"):
        raise ConfigError(
            f"method={value} replaces loss_type={old_value}: dpokit's {method} has no {loss_type} "
            f"loss (TRL CPOConfig's {loss_type} is not in dpokit); use method {method} with its "
            f"own loss, or loss_type {loss_type} without CPO (DPOConfig's, with a reference)"
        )
