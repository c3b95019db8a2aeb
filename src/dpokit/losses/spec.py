"""What one row of the method table is: :class:`MethodSpec`, and the helper that builds a row.

The rows themselves live in :mod:`dpokit.losses.registry` (the seed's methods),
:mod:`dpokit.losses.catalogue` (TRL 1.16's loss types and the reference-free methods) and
:mod:`dpokit.losses.combined` (weighted sums of several); the adapters that feed each loss from
:class:`~dpokit.losses.base.LossInputs` in :mod:`dpokit.losses.adapters`.

Notation in formulas: ``nls(z) = -log sigmoid(z)``, ``rho = logp(y) - ref(y)`` (summed over
completion tokens), ``h = rho_w - rho_l``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import Tensor

from dpokit.losses.base import LossInputs, LossOutput
from dpokit.losses.hyperparameters import Hyperparameter, resolve

REFERENCE_KINDS = ("none", "logps", "online")
DATA_KINDS = ("pairs", "unpaired", "sft", "multiturn_pairs")
STEP_KINDS = ("pairwise", "kto", "slic", "segment", "sft")
RECIPE_KINDS = ("spin", "stepwise")

Adapter = Callable[[str, LossInputs, Mapping[str, Any]], LossOutput]
# (LossInputs, hyperparameters) -> the rewards a running baseline averages, or None (no update).
BaselineRewards = Callable[[LossInputs, Mapping[str, Any]], "Tensor | None"]

BETA = Hyperparameter(0.1, float, "inverse temperature of the implicit reward", 0.0, low_open=True)


@dataclass(frozen=True)
class MethodSpec:
    """One row of the method table. See the module docstring for the notation of ``formula``.

    Attributes:
        name: the table key (``"dpo"``, ``"segment_dpo"``, ...).
        title: human name, e.g. ``"DPO-Positive (Smaug)"``.
        paper: authors, year and arXiv id.
        formula: one-line ASCII equation of the per-example loss.
        loss: the public pure loss function.
        compute: ``compute(inputs, hyperparameters) -> LossOutput``; picks its inputs from the
            :class:`LossInputs`, fills default hyperparameters, converts and checks the given ones.
        hyperparameters: name -> :class:`Hyperparameter`.
        reference: ``"none"``; ``"logps"`` (sequence log-probs, online or pre-computed); or
            ``"online"`` (full-vocabulary reference logits every step, for token-level KL).
        averaged_logps: the loss takes per-token averaged policy log-probs (SimPO). IPO's
            averaging is its ``average`` hyperparameter instead. The adapter divides the sums
            by ``chosen_lengths``/``rejected_lengths`` itself; the engine always passes sums.
        token_kl: needs ``chosen_seq_kl`` / ``rejected_seq_kl`` (TDPO).
        scores: needs ``score_chosen`` / ``score_rejected`` (ODPO).
        data: the kind of rows the user gives: ``"pairs"``, ``"unpaired"`` (KTO), ``"sft"``
            (SPIN) or ``"multiturn_pairs"`` (segment DPO).
        step: key of the per-batch step the engine runs (:data:`dpokit.steps.STEPS`):
            ``"pairwise"``, ``"kto"`` (z0 from mismatched pairs), ``"slic"`` (y_ref rows),
            ``"segment"`` (segment masks) or ``"sft"``. For a recipe method, the step of each run.
        recipe: key of the recipe that chains several runs (:data:`dpokit.recipes.RECIPES`):
            ``"spin"`` (generate/train rounds), ``"stepwise"`` (data chunks with a moving
            reference); ``None``: one run.
        stage_count: for a recipe method, the hyperparameter that gives its number of runs
            (``"iterations"``, ``"chunks"``); else ``None``.
        baseline_rewards: ``None``, or the method reads a running reward baseline (BCO): then
            ``baseline_rewards(inputs, hyperparameters)`` gives the ``(N,)`` rewards the engine
            folds into its one :class:`~dpokit.losses.bco.RewardBaseline` once per training
            micro-batch, before the loss (``None`` from it: no update, e.g. ``baseline=zero``),
            and the engine passes the baseline's value as ``LossInputs.reward_baseline``.
        binder: ``None``, or ``binder(spec, hyperparameters) -> MethodSpec``: a row whose needs
            depend on its hyperparameters (``combined``) returns the row for those; see
            :meth:`bind`.
    """

    name: str
    title: str
    paper: str
    formula: str
    loss: Callable[..., LossOutput]
    compute: Callable[[LossInputs, Mapping[str, Any]], LossOutput]
    hyperparameters: Mapping[str, Hyperparameter]
    reference: str
    averaged_logps: bool
    token_kl: bool
    scores: bool
    data: str
    step: str = "pairwise"
    recipe: str | None = None
    stage_count: str | None = None
    baseline_rewards: BaselineRewards | None = None
    binder: Callable[[MethodSpec, Mapping[str, Any]], MethodSpec] | None = None

    def defaults(self) -> dict[str, Any]:
        """Default value of every hyperparameter."""
        return {name: hp.default for name, hp in self.hyperparameters.items()}

    def bind(self, hyperparameters: Mapping[str, Any] | None = None) -> MethodSpec:
        """The row the engine runs for these hyperparameters: ``self`` for every method whose
        needs are fixed; for ``combined``, a row whose reference, data, scores and baseline are
        those its components need. Raises ``ValueError`` for components that cannot run together.
        """
        if self.binder is None:
            return self
        return self.binder(self, hyperparameters or {})


def make_compute(
    name: str, adapter: Adapter, hyperparameters: Mapping[str, Hyperparameter]
) -> Callable[..., LossOutput]:
    """``compute(inputs, hparams=None)``: resolve (partial, possibly unparsed) hyperparameters of
    method ``name``, then call ``adapter(name, inputs, resolved)``."""

    def compute(inputs: LossInputs, hparams: Mapping[str, Any] | None = None) -> LossOutput:
        # Resolving again is cheap, and lets callers pass partial or unparsed hyperparameters.
        return adapter(name, inputs, resolve(name, hyperparameters, hparams))

    compute.__name__ = compute.__qualname__ = f"compute_{name}"
    compute.__doc__ = f"Loss of method {name} from LossInputs and (partial) hyperparameters."
    return compute


def make_spec(
    name: str,
    adapter: Adapter,
    hyperparameters: Mapping[str, Hyperparameter],
    **fields: Any,
) -> MethodSpec:
    """One row: ``fields`` are :class:`MethodSpec`'s (``title``, ``paper``, ``formula``,
    ``loss``, ``reference``, ...); ``averaged_logps``, ``token_kl``, ``scores`` default to
    False and ``data`` to ``"pairs"``. Asserts that the kinds named exist."""
    hyperparameters = MappingProxyType(dict(hyperparameters))
    fields.setdefault("averaged_logps", False)
    fields.setdefault("token_kl", False)
    fields.setdefault("scores", False)
    fields.setdefault("data", "pairs")
    spec = MethodSpec(
        name=name,
        compute=make_compute(name, adapter, hyperparameters),
        hyperparameters=hyperparameters,
        **fields,
    )
    check_spec(spec)
    return spec


def check_spec(spec: MethodSpec) -> None:
    """Assert that ``spec`` names existing kinds and a consistent recipe."""
    assert spec.reference in REFERENCE_KINDS and spec.data in DATA_KINDS, spec
    assert spec.step in STEP_KINDS and spec.recipe in (None, *RECIPE_KINDS), spec
    assert (spec.recipe is None) == (spec.stage_count is None), spec
    assert spec.stage_count is None or spec.stage_count in spec.hyperparameters, spec


def replace_spec(spec: MethodSpec, **changes: Any) -> MethodSpec:
    """``spec`` with some fields changed (``dataclasses.replace``), checked again."""
    new = dataclasses.replace(spec, **changes)
    check_spec(new)
    return new


__all__ = [
    "BETA",
    "DATA_KINDS",
    "RECIPE_KINDS",
    "REFERENCE_KINDS",
    "STEP_KINDS",
    "Adapter",
    "MethodSpec",
    "check_spec",
    "make_compute",
    "make_spec",
    "replace_spec",
]
