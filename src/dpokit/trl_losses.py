"""TRL 1.16's ``loss_type`` and the config fields its losses read: the one table that decides,
per TRL field and per component loss type, which dpokit key the field sets.

TRL's ``DPOTrainer._compute_loss`` (trl 1.16) applies ONE value of each field to every component
of a ``loss_type`` list that reads it: ``beta`` is IPO's tau and every other loss's beta,
``label_smoothing`` is rDPO's flip rate, EXO's epsilon and AOT's smoothing at once, the
f-divergence replaces the log-ratios of every loss of ``chosen_scores - rejected_scores``, WPO
weights every component (``sft`` included). A field a TRL config leaves out has TRL's default
(``label_smoothing`` 0.0, so TRL's ``robust`` alone is plain DPO), never dpokit's.

:data:`LOSS_FIELDS` says, for each field, its TRL default, the dpokit key it sets on each loss type
that reads it, and the values TRL refuses with a loss type (with TRL's reason).
:func:`translate_loss_type` runs a single ``loss_type`` and a list through the same table: a
single one becomes that method's hyperparameters, a list becomes method ``combined`` whose shared
keys carry each component's values. Read from trl 1.16's ``dpo_trainer.py`` (``_compute_loss``
and ``__init__``'s checks), ``dpo_config.py``, ``kto_config.py`` and ``experimental/cpo``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# TRL 1.16 loss_type -> (dpokit method, note). DPOConfig's 15 types, KTOConfig's and CPOConfig's.
LOSS_TYPES: dict[str, tuple[str | None, str]] = {
    "sigmoid": ("dpo", "DPO; TRL 1.16 ignores label_smoothing here (cDPO is method cdpo)"),
    "hinge": ("hinge", "RSO's hinge on the reference-normalised margin (not SLiC-HF: slic)"),
    "ipo": ("ipo", "beta is IPO's tau"),
    "exo_pair": ("exo_pair", "label_smoothing is EXO's epsilon (smoothing); TRL requires > 0"),
    "nca_pair": ("nca_pair", ""),
    "robust": ("rdpo", "label_smoothing is rDPO's flip rate (eps); TRL's default 0.0"),
    "bco_pair": ("bco_pair", "TRL 1.x: no running-mean baseline, so baseline=zero"),
    "sppo_hard": ("sppo_hard", ""),
    "aot": ("aot", "label_smoothing is AOT's smoothing; no use_weighting (TRL refuses it)"),
    "aot_unpaired": (
        "aot_unpaired",
        "label_smoothing is AOT's smoothing; no use_weighting (TRL refuses it)",
    ),
    "apo_zero": ("apo_zero", ""),
    "apo_down": ("apo_down", ""),
    "discopop": ("discopop", "discopop_tau is DiscoPOP's tau"),
    "sft": (
        "sft",
        "NLL per chosen token of the batch (sft_average=tokens); alone: `combined`, losses=sft",
    ),
    "sigmoid_norm": ("sigmoid_norm", "DPO on per-token averaged log-ratios"),
    "kto": ("kto", "KTOConfig"),
    "apo_zero_unpaired": (
        None,
        "dpokit has no unpaired APO; it offers kto (unpaired) and apo_zero (pairs)",
    ),
    "simpo": ("cpo_simpo", "CPOConfig's simpo: CPO-SimPO (simpo_gamma is gamma)"),
    "alphapo": (None, "dpokit has no AlphaPO; it offers cpo, cpo_simpo and simpo"),
}

# DPOConfig's loss types (trl 1.16 DPOTrainer._compute_loss), in TRL's order.
DPO_LOSS_TYPES = (
    "sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm",
)  # fmt: skip
# The losses of `chosen_scores - rejected_scores`: the ones TRL 1.16 allows an f-divergence on
# ("sft" reads no log-ratio, so any divergence leaves it unchanged).
F_DIVERGENCE_LOSS_TYPES = (
    "sigmoid", "sigmoid_norm", "hinge", "ipo", "exo_pair", "robust", "discopop", "sft",
)  # fmt: skip
_F_DIVERGENCE_REFUSED = (
    "TRL 1.16 allows an f-divergence only with loss types "
    + ", ".join(sorted(F_DIVERGENCE_LOSS_TYPES))
    + " (the others have no valid f-divergence generalization)"
)
_WEIGHTING_REFUSED = (
    "TRL 1.16 refuses WPO weighting with aot and aot_unpaired: they sort the samples, which would "
    "misalign the per-pair weights"
)


_ALPHAPO = (
    "TRL CPOConfig's alpha is AlphaPO's reward shape, which dpokit does not have (dpokit's "
    "alpha is CPO's NLL weight, TRL's cpo_alpha); dpokit offers cpo, cpo_simpo and simpo"
)
# CPOConfig's own fields: with one of them, loss_type sigmoid/hinge/ipo is CPO's, not DPO's.
CPO_FIELDS = ("cpo_alpha", "simpo_gamma", "alpha")
_CPO_TYPES = {"sigmoid": "cpo"}  # "cpo": CPOConfig's sigmoid, not a loss_type name of TRL's
_METHOD_OF = {**{t: method for t, (method, _) in LOSS_TYPES.items()}, "cpo": "cpo"}


def _is_true(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() == "true")


@dataclass(frozen=True)
class LossField:
    """One TRL config field that the loss reads.

    Attributes:
        trl: TRL's name (``"label_smoothing"``).
        default: TRL 1.16's default, used where a TRL config leaves the field out.
        keys: TRL loss type -> the dpokit hyperparameter the field sets on that component; a loss
            type absent here does not read the field (TRL ignores it there).
        refuses: TRL loss type -> (``bad(value)``, why): values TRL refuses with that loss type.
    """

    trl: str
    default: Any
    keys: Mapping[str, str]
    refuses: Mapping[str, tuple[Callable[[Any], bool], str]] = field(default_factory=dict)


_BETA_READERS = (*(t for t in DPO_LOSS_TYPES if t not in ("sft", "ipo")), "kto", "simpo", "cpo")
_EVERY_PAIR_LOSS = tuple(t for t in DPO_LOSS_TYPES if t != "sft")

LOSS_FIELDS: tuple[LossField, ...] = (
    LossField("beta", 0.1, {**dict.fromkeys(_BETA_READERS, "beta"), "ipo": "tau"}),
    LossField(
        "label_smoothing",
        0.0,
        {
            "robust": "eps",
            "exo_pair": "smoothing",
            "aot": "smoothing",
            "aot_unpaired": "smoothing",
            "simpo": "label_smoothing",
            "cpo": "label_smoothing",
        },
        {
            "exo_pair": (
                lambda v: float(v) == 0.0,
                "TRL 1.16 requires label_smoothing > 0 with exo_pair (the EXO paper uses 1e-3)",
            )
        },
    ),
    LossField("discopop_tau", 0.05, {"discopop": "tau"}),
    LossField(
        "f_divergence_type",
        "reverse_kl",
        {t: "f_divergence_type" for t in F_DIVERGENCE_LOSS_TYPES if t != "sft"},
        {
            t: (lambda v: str(v).strip().lower() != "reverse_kl", _F_DIVERGENCE_REFUSED)
            for t in _EVERY_PAIR_LOSS
            if t not in F_DIVERGENCE_LOSS_TYPES
        },
    ),
    LossField(
        "f_alpha_divergence_coef",
        0.5,
        {t: "f_alpha_divergence_coef" for t in F_DIVERGENCE_LOSS_TYPES if t != "sft"},
    ),
    LossField(
        "use_weighting",
        False,
        {t: "use_weighting" for t in DPO_LOSS_TYPES if t not in ("aot", "aot_unpaired")},
        {t: (_is_true, _WEIGHTING_REFUSED) for t in ("aot", "aot_unpaired")},
    ),
    # TRL's None is "off", dpokit's 1.0; sft reads the plain log-probs in both.
    LossField("ld_alpha", 1.0, dict.fromkeys(_EVERY_PAIR_LOSS, "ld_alpha")),
    LossField("cpo_alpha", 1.0, {"simpo": "alpha", "cpo": "alpha"}),
    LossField("simpo_gamma", 0.5, {"simpo": "gamma"}),
    # CPOConfig's `alpha` is AlphaPO's reward shape (TRL's NLL weight is cpo_alpha), not
    # dpokit's `alpha` (cpo's NLL weight): read here so that it never lands on dpokit's key.
    LossField(
        "alpha",
        0.0,
        {},
        {t: (lambda v: float(v) != 0.0, _ALPHAPO) for t in ("simpo", "cpo")},
    ),
)
FIELD_BY_NAME: dict[str, LossField] = {f.trl: f for f in LOSS_FIELDS}
FIELD_NAMES = frozenset(FIELD_BY_NAME)

# Settings a loss type always has in TRL 1.16, whatever the config says.
FIXED: dict[str, dict[str, Any]] = {
    "bco_pair": {"baseline": "zero"},  # TRL 1.x's bco_pair has no running-mean baseline
    "sft": {"sft_average": "tokens"},  # TRL's sft: -mean over the batch's chosen tokens
    "simpo": {"nll_average": "tokens"},  # CPOConfig's NLL: cross-entropy over the batch's tokens
    "cpo": {"nll_average": "tokens"},
}


def loss_type_names(value: Any) -> list[str]:
    """``loss_type`` (a name or a list) as TRL 1.16 loss type names, lower case.

    Raises ``ValueError`` for a name that is not a TRL 1.16 loss type, or one dpokit has no
    method for (naming what dpokit offers), or an empty list.
    """
    names = [value] if isinstance(value, str) else list(value or [])
    if not names:
        raise ValueError("an empty list: give at least one loss type")
    keys = []
    for name in names:
        key = str(name).strip().lower()
        if key not in LOSS_TYPES:
            raise ValueError(f"{name!r} is not a TRL 1.16 loss_type ({', '.join(LOSS_TYPES)})")
        if LOSS_TYPES[key][0] is None:
            raise ValueError(f"{name!r} has no dpokit equivalent: {LOSS_TYPES[key][1]}")
        keys.append(key)
    return keys


def field_settings(types: list[str], given: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per loss type of ``types``: the dpokit hyperparameters the TRL fields in ``given`` (or
    TRL's defaults, where a field is left out and its dpokit key is not given either) set.

    Returns ``{loss type: {dpokit key: value}}`` (the fixed settings of :data:`FIXED` included).
    Raises ``ValueError`` with TRL's reason for a value TRL refuses with one of ``types``, and
    for a field given together with its dpokit key at a different value. Logs a warning for a
    field given at a non-default value that no component of ``types`` reads (TRL ignores it).
    """
    out: dict[str, dict[str, Any]] = {t: dict(FIXED.get(t, {})) for t in types}
    for spec in LOSS_FIELDS:
        present = spec.trl in given
        value = given[spec.trl] if present else spec.default
        if value is None:
            value = spec.default  # ld_alpha: None (TRL's default) is off
        for t in types:
            bad, why = spec.refuses.get(t, (lambda v: False, ""))
            if bad(value):
                shown = f"{spec.trl}={value!r}" if present else f"{spec.trl} left at {value!r}"
                raise ValueError(f"{shown} with loss_type {t}: {why}")
        readers = [t for t in types if t in spec.keys]
        if present and not readers and value != spec.default:
            logger.warning(ignored_field(spec.trl, value, types))
        for t in readers:
            key = spec.keys[t]
            if key in given and key != spec.trl and key not in FIELD_NAMES:
                if present and given[key] != value:
                    raise ValueError(
                        f"{spec.trl}={value!r} is {key} for loss_type {t}, but {key}="
                        f"{given[key]!r} is given"
                    )
                continue  # the dpokit key given: it wins over TRL's default
            out[t][key] = value
    return out


def ignored_field(name: str, value: Any, types: list[str]) -> str:
    """The warning for a TRL field that no loss type of ``types`` reads (TRL 1.16 ignores it)."""
    shown = ", ".join(types)
    note = ""
    if name == "label_smoothing" and "sigmoid" in types:
        note = " (TRL before 1.0 read it as cDPO: use method cdpo with smoothing)"
    return f"{name}={value} ignored: TRL 1.16 ignores it under loss_type {shown}{note}"


def translate_loss_type(value: Any, given: Mapping[str, Any]) -> dict[str, Any]:
    """``loss_type`` (with the TRL fields of :data:`LOSS_FIELDS` in ``given``) -> dpokit keys.

    One loss type: ``method`` and that method's hyperparameters. A list (or ``loss_weights``, or
    ``sft`` alone): method ``combined`` with ``losses``, ``loss_weights`` and, as its shared keys,
    every component's values from :func:`field_settings` (``component_args`` for a key that two
    components need at different values: IPO's ``tau`` from ``beta``, DiscoPOP's from
    ``discopop_tau``). Raises ``ValueError`` (see
    :func:`loss_type_names`, :func:`field_settings`) and for ``loss_weights`` not one per loss
    type.
    """
    types = _cpo_types(loss_type_names(value), given)
    weights = given.get("loss_weights") or [1.0] * len(types)
    if isinstance(weights, str | int | float):
        weights = [w for w in str(weights).split(",") if w.strip()]
    if len(weights) != len(types):
        raise ValueError(f"{len(weights)} loss_weights for {len(types)} loss types")
    types, weights = _merge_repeats(types, [float(w) for w in weights])
    per_type = field_settings(types, given)
    if types != ["sft"] and len(types) == 1 and "loss_weights" not in given and weights == [1]:
        return {"method": _METHOD_OF[types[0]], **per_type[types[0]]}
    methods = [_METHOD_OF[t] for t in types]
    out: dict[str, Any] = {
        "method": "combined",
        "losses": ",".join(methods),
        "loss_weights": ",".join(str(w) for w in weights),
    }
    shared, per_component = _share(types, per_type)
    out.update(shared)
    if per_component:
        out["component_args"] = ",".join(
            f"{_METHOD_OF[t]}.{key}={value}" for t, key, value in per_component
        )
    return out


def _share(
    types: list[str], per_type: Mapping[str, Mapping[str, Any]]
) -> tuple[dict[str, Any], list[tuple[str, str, Any]]]:
    """Each component's settings as combined's shared keys, where every component that sets a
    key sets the same value; a key set to different values (IPO's ``tau`` from ``beta``,
    DiscoPOP's ``tau`` from ``discopop_tau``) goes per component: ``(type, key, value)``."""
    values: dict[str, set[str]] = {}
    for t in types:
        for key, value in per_type[t].items():
            values.setdefault(key, set()).add(repr(value))
    shared = {k: v for t in types for k, v in per_type[t].items() if len(values[k]) == 1}
    apart = [(t, k, v) for t in types for k, v in per_type[t].items() if len(values[k]) > 1]
    return shared, apart


def _merge_repeats(types: list[str], weights: list[float]) -> tuple[list[str], list[float]]:
    """A loss type listed twice is one component whose weight is the sum (TRL adds each entry's
    ``weight * mean(loss)``, the same loss twice)."""
    merged: dict[str, float] = {}
    for t, w in zip(types, weights, strict=True):
        merged[t] = merged.get(t, 0.0) + w
    return list(merged), list(merged.values())


def _cpo_types(types: list[str], given: Mapping[str, Any]) -> list[str]:
    """``types`` read as CPOConfig's when ``given`` has a CPOConfig field (``cpo_alpha`` ...):
    ``sigmoid`` is then CPO's loss (the internal type ``cpo``, method cpo). Raises
    ``ValueError`` for CPOConfig's hinge and ipo, which dpokit does not have."""
    if len(types) != 1 or not any(name in given for name in CPO_FIELDS):
        return types
    if types[0] in ("hinge", "ipo"):
        raise ValueError(
            f"with {', '.join(n for n in CPO_FIELDS if n in given)} this is TRL CPOConfig's "
            f"{types[0]} loss (reference-free), which dpokit does not have; dpokit offers CPO's "
            "sigmoid (method cpo), simpo (cpo_simpo), and DPOConfig's "
            f"{types[0]} with a reference (method {LOSS_TYPES[types[0]][0]}, no CPO fields)"
        )
    return [_CPO_TYPES.get(types[0], types[0])]


def method_aliases() -> dict[str, dict[str, str]]:
    """TRL field -> {dpokit method -> its key}, where the key is not the field's own name: how a
    TRL field reads under a method given the dpokit way (``method: ipo`` with ``beta``)."""
    table: dict[str, dict[str, str]] = {}
    for spec in LOSS_FIELDS:
        for t, key in spec.keys.items():
            if key != spec.trl:
                table.setdefault(spec.trl, {})[_METHOD_OF[t]] = key
    return table


__all__ = [
    "DPO_LOSS_TYPES",
    "FIELD_BY_NAME",
    "FIXED",
    "F_DIVERGENCE_LOSS_TYPES",
    "LOSS_FIELDS",
    "LOSS_TYPES",
    "LossField",
    "field_settings",
    "ignored_field",
    "loss_type_names",
    "method_aliases",
    "translate_loss_type",
]
