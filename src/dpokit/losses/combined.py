"""The ``combined`` row of the method table: several pairwise objectives, weighted, in one run.

``losses="dpo,bco_pair,sft" loss_weights="0.8,0.2,1.0"`` is MPO (Wang et al., 2024,
arXiv:2411.10442; TRL ``loss_type: [sigmoid, bco_pair, sft]``). Each component is a row of the
table that trains on pairs with the pairwise step in a single run, or ``sft``: the chosen answer's
NLL per completion token. Hyperparameters are shared by name: ``beta=0.2`` sets the beta of every
component that has one; a name left unset keeps each component's own default.

The row's needs depend on the components (``losses=cpo,sft`` needs no reference, MPO needs one
and BCO's running baseline), so the table row is bound to its hyperparameters by
:meth:`MethodSpec.bind` before a run; :func:`combined_row` builds it from the other rows.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor

from dpokit.losses import adapters
from dpokit.losses.base import LossInputs, LossOutput
from dpokit.losses.combine import combine_losses
from dpokit.losses.hyperparameters import Hyperparameter, resolve
from dpokit.losses.options import wpo_weighted
from dpokit.losses.spec import REFERENCE_KINDS, MethodSpec, make_spec, replace_spec

NAME = "combined"
SFT = "sft"  # the NLL component; not a row of the table
SFT_KEYS = ("use_weighting",)  # WPO weights the sft term too (TRL 1.16 weights every component)
_OWN = ("losses", "loss_weights", "sft_average", "component_args")
# Keys the pairwise step reads once for the whole batch: never per component.
_BATCH_WIDE = ("ld_alpha", "use_weighting", "f_divergence_type", "f_alpha_divergence_coef")
# Options that act on the whole objective when set (their value when off): TRL 1.16 applies them
# to every component and refuses a list with a component that cannot take them, and so does
# dpokit rather than apply them to some components only.
WHOLE_OBJECTIVE = {"use_weighting": False, "f_divergence_type": "reverse_kl"}


@dataclass(frozen=True)
class Component:
    """One term of a combined objective: its name, row (None for ``sft``), weight and the
    hyperparameters it gets (the shared values it takes; the rest are its defaults)."""

    name: str
    spec: MethodSpec | None
    weight: float
    hyperparameters: dict[str, Any]


def combinable(spec: MethodSpec) -> str | None:
    """Why ``spec`` cannot be a component (one run of the pairwise step on pairs), or None."""
    if spec.recipe is not None:
        return (
            f"{spec.name} is several runs (recipe {spec.recipe}) whose reference changes between "
            "them; a combined objective is one run with one reference"
        )
    if spec.data != "pairs" or spec.step != "pairwise":
        return (
            f"{spec.name} trains on {spec.data!r} data with the {spec.step!r} step; a combined "
            "objective trains on 'pairs' with the 'pairwise' step"
        )
    return None


def _parse_names(text: str, rows: Mapping[str, MethodSpec], table: Mapping[str, MethodSpec]):
    names = [part.strip().lower().replace("-", "_") for part in str(text).split(",")]
    names = [name for name in names if name]
    if not names:
        raise ValueError("losses must name at least one component, e.g. 'dpo,sft'")
    valid = ", ".join([*rows, SFT])
    for name in names:
        if name == NAME:
            raise ValueError("losses: a combined objective cannot contain 'combined'")
        if name in table and name not in rows:
            raise ValueError(f"losses: component {combinable(table[name])}")
        if name not in rows and name != SFT:
            raise ValueError(f"losses: unknown component {name!r}; valid: {valid}")
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ValueError(f"losses: {', '.join(duplicates)} given twice; give each once")
    return names


def _parse_weights(text: str, names: list[str]) -> list[float]:
    parts = [part.strip() for part in str(text).split(",") if part.strip()]
    if not parts:
        return [1.0] * len(names)  # TRL's default
    if len(parts) != len(names):
        raise ValueError(
            f"loss_weights has {len(parts)} value(s) for {len(names)} losses "
            f"({', '.join(names)}); give one weight per component"
        )
    weight = Hyperparameter(1.0, float, "weight", 0.0)
    pairs = zip(names, parts, strict=True)
    return [weight.parse(f"loss_weights[{name!r}]", part) for name, part in pairs]


def plan(
    hp: Mapping[str, Any] | None,
    rows: Mapping[str, MethodSpec],
    table: Mapping[str, MethodSpec],
    shared: Mapping[str, Hyperparameter],
) -> list[Component]:
    """The components of ``hp`` (combined's hyperparameters, possibly partial or unparsed).

    Raises ``ValueError``: an unknown or non-combinable component (named, with why), a component
    given twice, weights not one per component or negative, a shared hyperparameter set that no
    component takes, a value out of a component's range.
    """
    hp = resolve(NAME, {**_own_hyperparameters(), **shared}, hp)
    names = _parse_names(hp["losses"], rows, table)
    weights = _parse_weights(hp["loss_weights"], names)
    given = {key: value for key, value in hp.items() if key not in _OWN and value is not None}
    used = {key for name in names if name in rows for key in rows[name].hyperparameters}
    used |= set(SFT_KEYS) if SFT in names else set()
    unused = sorted(set(given) - used)
    if unused:
        raise ValueError(
            f"{', '.join(unused)} is set but no component of losses={hp['losses']!r} takes it"
        )
    _check_whole_objective(given, names, rows)
    per_component = _parse_component_args(hp["component_args"], names, rows)
    components = []
    for name, weight in zip(names, weights, strict=True):
        spec = rows.get(name)
        keys = SFT_KEYS if spec is None else spec.hyperparameters
        own = {k: v for k, v in given.items() if k in keys} | per_component.get(name, {})
        if spec is not None:
            own = resolve(name, spec.hyperparameters, own)  # the component's own range checks
        else:
            own["average"] = hp["sft_average"]
        components.append(Component(name, spec, weight, own))
    return components


def _parse_component_args(
    text: str, names: list[str], rows: Mapping[str, MethodSpec]
) -> dict[str, dict[str, str]]:
    """``"ipo.tau=0.1,discopop.tau=0.05"`` -> ``{"ipo": {"tau": "0.1"}, ...}`` (values parsed
    later by each component's table). Raises ``ValueError`` for an item not ``name.key=value``, a
    name not among the components, a key the component does not take, a batch-wide option."""
    out: dict[str, dict[str, str]] = {}
    for item in (part.strip() for part in str(text or "").split(",")):
        if not item:
            continue
        left, sep, value = item.partition("=")
        name, dot, key = left.strip().partition(".")
        if not sep or not dot:
            raise ValueError(f"component_args: {item!r} is not component.key=value")
        if name not in names or name not in rows:
            raise ValueError(f"component_args: {name!r} is not a component with hyperparameters")
        if key not in rows[name].hyperparameters:
            valid = ", ".join(rows[name].hyperparameters)
            raise ValueError(f"component_args: {name} has no {key!r}; valid: {valid}")
        if key in _BATCH_WIDE:
            raise ValueError(f"component_args: {key} is one for the whole objective; set {key}")
        out.setdefault(name, {})[key] = value.strip()
    return out


def _check_whole_objective(
    given: Mapping[str, Any], names: list[str], rows: Mapping[str, MethodSpec]
) -> None:
    """Raise ``ValueError`` when an option of :data:`WHOLE_OBJECTIVE` is on and a component
    cannot take it (naming the components that can), instead of applying it to some only; and
    when ``nll_weight`` would add the same NLL term once per component."""
    takers = [n for n in names if n != SFT and "nll_weight" in rows[n].hyperparameters]
    if given.get("nll_weight") and len(takers) > 1:
        raise ValueError(
            f"nll_weight={given['nll_weight']} would add the chosen answer's NLL once per "
            f"component ({', '.join(takers)}): add it once as the sft component instead "
            "(losses=...,sft with its weight in loss_weights)"
        )
    for key, off in WHOLE_OBJECTIVE.items():
        if key not in given or given[key] == off:
            continue
        lacking = [n for n in names if n != SFT and key not in rows[n].hyperparameters]
        if lacking:
            takers = [name for name, spec in rows.items() if key in spec.hyperparameters]
            raise ValueError(
                f"{key}={given[key]!r} applies to every component, and {', '.join(lacking)} "
                f"cannot take it; components that can: {', '.join(takers)}, sft"
            )


def compute_combined(
    name: str,
    inputs: LossInputs,
    hp: Mapping[str, Any],
    *,
    rows: Mapping[str, MethodSpec],
    table: Mapping[str, MethodSpec],
    shared: Mapping[str, Hyperparameter],
) -> LossOutput:
    """``sum_k weight_k * loss_k`` per example (:func:`~dpokit.losses.combine.combine_losses`:
    ``loss/<component>`` logged unweighted); every component reads the same ``inputs``."""
    outputs, weights = {}, {}
    for part in plan(hp, rows, table, shared):
        if part.spec is None:
            outputs[part.name] = adapters.compute_sft_term(part.name, inputs, part.hyperparameters)
            if part.hyperparameters.get("use_weighting"):
                outputs[part.name] = wpo_weighted(outputs[part.name], inputs, NAME)
        else:
            outputs[part.name] = part.spec.compute(inputs, part.hyperparameters)
        weights[part.name] = part.weight
    return combine_losses(outputs, weights)


def _baseline_rewards(
    inputs: LossInputs, hp: Mapping[str, Any] | None, *, component: str, **tables: Any
) -> Tensor | None:
    for part in plan(hp, **tables):
        if part.name == component:
            return part.spec.baseline_rewards(inputs, part.hyperparameters)
    return None


def _bind(spec: MethodSpec, hp: Mapping[str, Any], **tables: Any) -> MethodSpec:
    """The combined row for ``hp``: the strongest reference any component needs, and the
    token-KL, scores, averaging and baseline needs of its components."""
    components = plan(hp, **tables)
    specs = [part.spec for part in components if part.spec is not None]
    reference = max((s.reference for s in specs), key=REFERENCE_KINDS.index, default="none")
    stateful = [s.name for s in specs if s.baseline_rewards is not None]
    baseline = None
    if stateful:
        baseline = functools.partial(_baseline_rewards, component=stateful[0], **tables)
    terms = " + ".join(f"{part.weight:g} * {part.name}" for part in components)
    return replace_spec(
        spec,
        title=f"Combined objective: {terms}",
        formula=f"{terms} (per example; sft = -logp(y_w) / |y_w|)",
        reference=reference,
        averaged_logps=any(s.averaged_logps for s in specs),
        token_kl=any(s.token_kl for s in specs),
        scores=any(s.scores for s in specs),
        baseline_rewards=baseline,
    )


def _own_hyperparameters() -> dict[str, Hyperparameter]:
    return {
        "losses": Hyperparameter(
            "dpo,sft",
            str,
            "comma list of components: methods that train on pairs in one run, and sft (the "
            "chosen answer's NLL per token); MPO: dpo,bco_pair,sft",
        ),
        "loss_weights": Hyperparameter(
            "",
            str,
            "comma list of weights >= 0, one per component; empty: all 1 (MPO: 0.8,0.2,1.0)",
        ),
        "component_args": Hyperparameter(
            "",
            str,
            "values for one component only, over the shared ones: comma list of "
            "component.key=value (ipo.tau=0.1,discopop.tau=0.05)",
        ),
        "sft_average": Hyperparameter(
            "answer",
            str,
            "sft component: NLL per token of each chosen answer, then the mean over pairs "
            "(answer; RPO), or per chosen token of the whole micro-batch (tokens; TRL 1.16's sft)",
            choices=("answer", "tokens"),
        ),
    }


def shared_hyperparameters(rows: Mapping[str, MethodSpec]) -> dict[str, Hyperparameter]:
    """Every hyperparameter name of the combinable ``rows``, with default None (= each
    component's own default). A name must have one type across rows (asserted)."""
    shared: dict[str, Hyperparameter] = {}
    for spec in rows.values():
        for key, hp in spec.hyperparameters.items():
            assert key not in shared or shared[key].type is hp.type, (key, spec.name)
            shared.setdefault(key, hp)
    return {
        key: Hyperparameter(
            None,
            hp.type,
            "set for every component that takes it ("
            + ", ".join(name for name, spec in rows.items() if key in spec.hyperparameters)
            + "); unset: each component's own default",
            choices=hp.choices,
        )
        for key, hp in shared.items()
    }


def combined_row(table: Mapping[str, MethodSpec]) -> MethodSpec:
    """The ``combined`` row, bound to its default hyperparameters, over the rows of ``table``
    that can be components (:func:`combinable`)."""
    rows = {name: spec for name, spec in table.items() if combinable(spec) is None}
    shared = shared_hyperparameters(rows)
    tables = dict(rows=rows, table=table, shared=shared)
    row = make_spec(
        NAME,
        functools.partial(compute_combined, **tables),
        {**_own_hyperparameters(), **shared},
        title="Combined objective",
        paper="TRL loss_type list + loss_weights; MPO: Wang et al. 2024, Enhancing the "
        "Reasoning Ability of Multimodal Large Language Models via Mixed Preference "
        "Optimization, arXiv:2411.10442",
        formula="sum_k weight_k * loss_k",
        loss=combine_losses,
        reference="logps",
        binder=functools.partial(_bind, **tables),
    )
    return row.bind({})


__all__ = ["Component", "combinable", "combined_row", "compute_combined", "plan"]
