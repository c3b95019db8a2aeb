"""The method table: every method as data, so the engine never needs ``if method == ...``.

A :class:`MethodSpec` says what a method computes (its loss function and an adapter ``compute``
that picks its inputs from :class:`~dpokit.losses.base.LossInputs`), which hyperparameters it takes
(with defaults, types and valid ranges), and what the engine must provide around it: a reference
model, per-token averages, token-level KL, scores, a data format, the per-batch step that trains
it (a key of :data:`dpokit.steps.STEPS`) and, for methods that are several runs, the recipe that
chains them (a key of :data:`dpokit.recipes.RECIPES`). This module only names them: the losses
layer imports neither.

Notation in formulas: ``nls(z) = -log sigmoid(z)``, ``rho = logp(y) - ref(y)`` (summed over
completion tokens), ``h = rho_w - rho_l``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import Tensor

from dpokit.losses.base import LossInputs, LossOutput
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.dpop import dpop_loss
from dpokit.losses.hyperparameters import Hyperparameter, resolve_hyperparameters
from dpokit.losses.hyperparameters import resolve as _resolve  # _make_compute's name for it
from dpokit.losses.ipo import ipo_loss
from dpokit.losses.kto import kto_loss
from dpokit.losses.odpo import odpo_data_kl, odpo_loss, odpo_offsets
from dpokit.losses.options import takes_pairwise_options, with_pairwise_options
from dpokit.losses.rdpo import rdpo_loss
from dpokit.losses.simpo import simpo_loss
from dpokit.losses.slic import slic_loss
from dpokit.losses.spin import spin_loss
from dpokit.losses.tdpo import tdpo_loss

REFERENCE_KINDS = ("none", "logps", "online")
DATA_KINDS = ("pairs", "unpaired", "sft", "multiturn_pairs")
STEP_KINDS = ("pairwise", "kto", "slic", "segment", "sft")
RECIPE_KINDS = ("spin", "stepwise")


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
            averaging is its ``average`` hyperparameter instead.
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

    def defaults(self) -> dict[str, Any]:
        """Default value of every hyperparameter."""
        return {name: hp.default for name, hp in self.hyperparameters.items()}


# ---- adapters: LossInputs + resolved hyperparameters -> LossOutput -------------------------------

_POLICY_PAIR = ("policy_chosen_logps", "policy_rejected_logps")
_REFERENCE_PAIR = ("reference_chosen_logps", "reference_rejected_logps")


def _per_token(name: str, inputs: LossInputs, *logps: Tensor) -> tuple[Tensor, ...]:
    """Divide (chosen, rejected[, ref chosen, ref rejected]) sums by the completion lengths.

    Policy and reference use the same lengths: both score the same tokens.
    """
    chosen_lengths, rejected_lengths = inputs.require(name, "chosen_lengths", "rejected_lengths")
    if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
        raise ValueError(f"method {name}: completion lengths must be >= 1 to average log-probs")
    lengths = (chosen_lengths, rejected_lengths) * (len(logps) // 2)
    return tuple(lp / n.to(lp.dtype) for lp, n in zip(logps, lengths, strict=True))


def _compute_dpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    return dpo_loss(*inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR), beta=hp["beta"])


def _compute_dpop(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    logps = inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR)
    return dpop_loss(*logps, beta=hp["beta"], lam=hp["lam"])


def _compute_rdpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    logps = inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR)
    return rdpo_loss(*logps, beta=hp["beta"], eps=hp["eps"])


def _compute_ipo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    pc, pr, rc, rr = inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR)
    if hp["average"]:
        pc, pr, rc, rr = _per_token(name, inputs, pc, pr, rc, rr)
    return ipo_loss(pc, pr, rc, rr, tau=hp["tau"])


def _compute_odpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    logps = inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR)
    score_chosen, score_rejected = inputs.require(name, "score_chosen", "score_rejected")
    offsets = odpo_offsets(score_chosen, score_rejected, alpha=hp["alpha"], form=hp["form"])
    out = odpo_loss(*logps, offsets.to(logps[0].dtype), beta=hp["beta"])
    kl = odpo_data_kl(*logps)  # (B,) on the data's completions, not on policy samples
    if hp["kl_coef"] > 0:
        out.losses = out.losses + hp["kl_coef"] * kl
    out.metrics["kl/data"] = kl.detach()
    return out


def _compute_tdpo(
    name: str, inputs: LossInputs, hp: Mapping[str, Any], *, loss: Callable[..., LossOutput]
) -> LossOutput:
    logps = inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR)
    seq_kl = inputs.require(name, "chosen_seq_kl", "rejected_seq_kl")
    # tdpo1 has no alpha; its loss ignores the value it gets.
    alpha = hp.get("alpha", 0.5)
    return loss(*logps, *seq_kl, beta=hp["beta"], alpha=alpha)


def _compute_simpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    chosen, rejected = _per_token(name, inputs, *inputs.require(name, *_POLICY_PAIR))
    return simpo_loss(chosen, rejected, beta=hp["beta"], gamma=hp["gamma"])


def _compute_slic(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    chosen, rejected = inputs.require(name, *_POLICY_PAIR)
    if hp["target"] == "chosen":
        target = chosen  # "direct" variant: y_ref = y_w
    else:
        (target,) = inputs.require(name, "policy_target_logps")
    return slic_loss(chosen, rejected, target, delta=hp["delta"], lam=hp["lam"])


def _compute_kto(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    policy, reference, desirable = inputs.require(
        name, "policy_logps", "reference_logps", "desirable"
    )
    if hp["kl_baseline"] == "zero":
        kl_baseline = 0.0
    else:
        (kl_baseline,) = inputs.require(name, "kl_baseline")
    return kto_loss(
        policy,
        reference,
        desirable,
        kl_baseline,
        beta=hp["beta"],
        desirable_weight=hp["desirable_weight"],
        undesirable_weight=hp["undesirable_weight"],
    )


def _compute_spin(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    # chosen = human answer, rejected = the opponent's sample, reference = the opponent.
    return spin_loss(*inputs.require(name, *_POLICY_PAIR, *_REFERENCE_PAIR), lam=hp["lam"])


def _make_compute(
    name: str,
    adapter: Callable[[str, LossInputs, Mapping[str, Any]], LossOutput],
    hyperparameters: Mapping[str, Hyperparameter],
) -> Callable[..., LossOutput]:
    def compute(inputs: LossInputs, hparams: Mapping[str, Any] | None = None) -> LossOutput:
        # Resolving again is cheap, and lets callers pass partial or unparsed hyperparameters.
        return adapter(name, inputs, _resolve(name, hyperparameters, hparams))

    compute.__name__ = compute.__qualname__ = f"compute_{name}"
    compute.__doc__ = f"Loss of method {name} from LossInputs and (partial) hyperparameters."
    return compute


# ---- the table -------------------------------------------------------------------------------

_BETA = Hyperparameter(0.1, float, "inverse temperature of the implicit reward", 0.0, low_open=True)


def _spec(
    name: str,
    adapter: Callable[[str, LossInputs, Mapping[str, Any]], LossOutput],
    hyperparameters: Mapping[str, Hyperparameter],
    **fields: Any,
) -> MethodSpec:
    hyperparameters = MappingProxyType(dict(hyperparameters))
    fields.setdefault("averaged_logps", False)
    fields.setdefault("token_kl", False)
    fields.setdefault("scores", False)
    fields.setdefault("data", "pairs")
    spec = MethodSpec(
        name=name,
        compute=_make_compute(name, adapter, hyperparameters),
        hyperparameters=hyperparameters,
        **fields,
    )
    assert spec.reference in REFERENCE_KINDS and spec.data in DATA_KINDS, spec
    assert spec.step in STEP_KINDS and spec.recipe in (None, *RECIPE_KINDS), spec
    assert (spec.recipe is None) == (spec.stage_count is None), spec
    assert spec.stage_count is None or spec.stage_count in hyperparameters, spec
    return spec


# The variant is bound here, in the table: the loss never receives a method name.
_TDPO1 = functools.partial(tdpo_loss, variant="tdpo1")
_TDPO2 = functools.partial(tdpo_loss, variant="tdpo2")

_TDPO_COMMON = dict(
    paper="Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999",
    reference="online",
    token_kl=True,
)

_SPECS = [
    _spec(
        "dpo",
        _compute_dpo,
        {"beta": _BETA},
        title="Direct Preference Optimization (DPO)",
        paper="Rafailov et al. 2023, arXiv:2305.18290",
        formula="nls(beta * h)",
        loss=dpo_loss,
        reference="logps",
    ),
    _spec(
        "dpop",
        _compute_dpop,
        {
            "beta": _BETA,
            "lam": Hyperparameter(
                50.0, float, "weight of the penalty max(0, ref(y_w) - logp(y_w)), inside beta", 0.0
            ),
        },
        title="DPO-Positive (Smaug)",
        paper="Pal et al. 2024, Smaug: Fixing Failure Modes of Preference Optimisation with "
        "DPO-Positive, arXiv:2402.13228",
        formula="nls(beta * (h - lam * max(0, ref(y_w) - logp(y_w))))",
        loss=dpop_loss,
        reference="logps",
    ),
    _spec(
        "slic",
        _compute_slic,
        {
            "delta": Hyperparameter(1.0, float, "margin of the calibration hinge", 0.0),
            "lam": Hyperparameter(0.1, float, "weight of the -logp(y_ref) regularizer", 0.0),
            "target": Hyperparameter(
                "chosen",
                str,
                "y_ref of the regularizer: the chosen answer, or one sample per prompt of the "
                "reference/SFT model, drawn before training and cached in the run directory",
                choices=("chosen", "reference_sample"),
            ),
            "temperature": Hyperparameter(
                1.0, float, "target=reference_sample: y_ref's sampling temperature; 0 = greedy", 0.0
            ),
            "max_new_tokens": Hyperparameter(
                256, int, "target=reference_sample: longest y_ref, in tokens", 1
            ),
            "generation_batch_size": Hyperparameter(
                16, int, "target=reference_sample: prompts per generate() call", 1
            ),
        },
        title="Sequence Likelihood Calibration (SLiC-HF)",
        paper="Zhao et al. 2023, SLiC-HF, arXiv:2305.10425",
        formula="max(0, delta - logp(y_w) + logp(y_l)) - lam * logp(y_ref)",
        loss=slic_loss,
        reference="none",
        step="slic",
    ),
    _spec(
        "tdpo1",
        functools.partial(_compute_tdpo, loss=_TDPO1),
        {"beta": _BETA},
        title="Token-level DPO, variant 1 (TDPO1)",
        formula="nls(beta * (h - (D_l - D_w))), D = sum_t KL(ref || policy) over the vocabulary",
        loss=_TDPO1,
        **_TDPO_COMMON,
    ),
    _spec(
        "tdpo2",
        functools.partial(_compute_tdpo, loss=_TDPO2),
        {
            "beta": _BETA,
            "alpha": Hyperparameter(0.5, float, "weight of the token-level KL margin", 0.0),
        },
        title="Token-level DPO, variant 2 (TDPO2, recommended)",
        formula="nls(beta * (h - alpha * (D_l - sg(D_w)))), D = sum_t KL(ref || policy)",
        loss=_TDPO2,
        **_TDPO_COMMON,
    ),
    _spec(
        "kto",
        _compute_kto,
        {
            "beta": _BETA,
            "desirable_weight": Hyperparameter(
                1.0, float, "lam_D; keep lam_D*n_D / (lam_U*n_U) in [1, 4/3]", 0.0, low_open=True
            ),
            "undesirable_weight": Hyperparameter(1.0, float, "lam_U", 0.0, low_open=True),
            "kl_baseline": Hyperparameter(
                "batch",
                str,
                "z0: estimated from mismatched pairs of the batch, or zero (KTO right after SFT "
                "on the same data)",
                choices=("batch", "zero"),
            ),
        },
        title="Kahneman-Tversky Optimization (KTO)",
        paper="Ethayarajh et al. 2024, arXiv:2402.01306",
        formula="lam_D * (1 - sigmoid(beta * (rho - z0))) if desirable else "
        "lam_U * (1 - sigmoid(beta * (z0 - rho)))",
        loss=kto_loss,
        reference="logps",
        data="unpaired",
        step="kto",
    ),
    _spec(
        "ipo",
        _compute_ipo,
        {
            "tau": Hyperparameter(
                0.1, float, "regularization strength (beta elsewhere)", 0.0, low_open=True
            ),
            "average": Hyperparameter(
                True, bool, "average log-probs per completion token (the IPO authors) or sum"
            ),
        },
        title="Identity Preference Optimization (IPO)",
        paper="Azar et al. 2023, A General Theoretical Paradigm to Understand Learning from "
        "Human Preferences, arXiv:2310.12036",
        formula="(h - 1 / (2 * tau))**2, h from per-token averages when average=true",
        loss=ipo_loss,
        reference="logps",
    ),
    _spec(
        "spin",
        _compute_spin,
        {
            "lam": Hyperparameter(0.1, float, "DPO's beta for SPIN", 0.0, low_open=True),
            "iterations": Hyperparameter(
                3, int, "self-play rounds: generate with the current model, then train", 1
            ),
            "keep_previous": Hyperparameter(
                False, bool, "also train on the previous iteration's generations (authors' code)"
            ),
            "temperature": Hyperparameter(
                1.0, float, "sampling temperature of the generated answers; 0 = greedy", 0.0
            ),
            "top_p": Hyperparameter(1.0, float, "nucleus sampling mass", 0.0, 1.0, low_open=True),
            "max_new_tokens": Hyperparameter(256, int, "longest generated answer, in tokens", 1),
            "generation_batch_size": Hyperparameter(16, int, "prompts per generate() call", 1),
        },
        title="Self-Play Fine-Tuning (SPIN)",
        paper="Chen et al. 2024, arXiv:2401.01335",
        formula="nls(lam * h), y_w = human answer, y_l = own sample, ref = previous iterate",
        loss=spin_loss,
        reference="logps",
        data="sft",
        recipe="spin",
        stage_count="iterations",
    ),
    _spec(
        "segment_dpo",
        _compute_dpo,
        {"beta": _BETA},
        title="Segment-level DPO (SDPO)",
        paper="Kong et al. 2025, SDPO: Segment-Level Direct Preference Optimization for Social "
        "Agents, arXiv:2501.01821",
        formula="nls(beta * h), log-probs summed over the agent turns of the segment only",
        loss=dpo_loss,
        reference="logps",
        data="multiturn_pairs",
        step="segment",
    ),
    _spec(
        "stepwise_dpo",
        _compute_dpo,
        {
            "beta": _BETA,
            "chunks": Hyperparameter(
                2, int, "number of data chunks (training runs; ignored with a `chunk` column)", 1
            ),
            "order": Hyperparameter(
                "data",
                str,
                "chunks without a `chunk` column: in data order, or easy_to_hard (largest "
                "starting-model margin ref(y_w) - ref(y_l) first)",
                choices=("data", "easy_to_hard"),
            ),
        },
        title="Stepwise DPO (sDPO)",
        paper="Kim et al. 2024, sDPO: Don't Use Your Data All at Once, arXiv:2403.19270",
        formula="nls(beta * h), ref = the model after the previous data chunk",
        loss=dpo_loss,
        reference="logps",
        recipe="stepwise",
        stage_count="chunks",
    ),
    _spec(
        "simpo",
        _compute_simpo,
        {
            "beta": Hyperparameter(2.0, float, "reward scale (paper: 2.0-10)", 0.0, low_open=True),
            "gamma": Hyperparameter(
                1.0,
                float,
                "ABSOLUTE target margin, as in the paper's equation; the reference code's "
                "gamma_beta_ratio is gamma / beta",
                0.0,
            ),
        },
        title="Simple Preference Optimization (SimPO)",
        paper="Meng et al. 2024, arXiv:2405.14734",
        formula="nls(beta * (logp(y_w)/|y_w| - logp(y_l)/|y_l|) - gamma)",
        loss=simpo_loss,
        reference="none",
        averaged_logps=True,
    ),
    _spec(
        "odpo",
        _compute_odpo,
        {
            "beta": _BETA,
            "alpha": Hyperparameter(1.0, float, "scale of the offset", 0.0),
            "form": Hyperparameter(
                "difference",
                str,
                "offset alpha*log(s_w - s_l) or alpha*log(s_w / s_l)",
                choices=("difference", "ratio"),
            ),
            "kl_coef": Hyperparameter(
                0.0,
                float,
                "weight of the seed's optional + kl_coef * KL(policy || ref) term, estimated as "
                "(rho_w + rho_l) / 2 on the data's completions (not on policy samples)",
                0.0,
            ),
        },
        title="DPO with an offset (ODPO)",
        paper="Amini et al. 2024, Direct Preference Optimization with an Offset, arXiv:2402.10571",
        formula="nls(beta * h - alpha * log(s_w - s_l)) [+ kl_coef * (rho_w + rho_l) / 2]",
        loss=odpo_loss,
        reference="logps",
        scores=True,
    ),
    _spec(
        "rdpo",
        _compute_rdpo,
        {
            "beta": _BETA,
            "eps": Hyperparameter(0.1, float, "assumed label-flip rate", 0.0, 0.5, high_open=True),
        },
        title="Provably robust DPO (rDPO)",
        paper="Chowdhury et al. 2024, Provably Robust DPO, arXiv:2403.00409",
        formula="((1 - eps) * nls(beta * h) - eps * nls(-beta * h)) / (1 - 2 * eps)",
        loss=rdpo_loss,
        reference="logps",
    ),
]

# The options of every pairwise method with a reference (nll_weight, ld_alpha, use_weighting;
# f-DPO's on the losses of rho_w - rho_l of summed log-probs): dpokit.losses.options.
_F_DIVERGENCE = ("dpo", "rdpo", "stepwise_dpo", "spin")
_SPECS = [
    with_pairwise_options(s, f_divergence=s.name in _F_DIVERGENCE)
    if takes_pairwise_options(s)
    else s
    for s in _SPECS
]

METHODS: Mapping[str, MethodSpec] = MappingProxyType({spec.name: spec for spec in _SPECS})

_ALIASES = {"slic_hf": "slic"}
_AMBIGUOUS = {
    "sdpo": "method 'sdpo' is ambiguous: use 'segment_dpo' (SDPO, segment-level DPO for "
    "multi-turn dialogues, arXiv:2501.01821) or 'stepwise_dpo' (sDPO, DPO over data chunks with "
    "a moving reference, arXiv:2403.19270)",
    "tdpo": "method 'tdpo' is ambiguous: use 'tdpo2' (recommended) or 'tdpo1'",
}
_AMBIGUOUS["s_dpo"] = _AMBIGUOUS["sdpo"]


def get_method(name: str) -> MethodSpec:
    """The :class:`MethodSpec` called ``name`` (case-insensitive, ``-`` read as ``_``).

    Raises ``ValueError`` for an unknown name (listing the valid ones) and for ``"sdpo"``, which
    could mean segment-level DPO or stepwise DPO.
    """
    key = str(name).strip().lower().replace("-", "_")
    if key in _AMBIGUOUS:
        raise ValueError(_AMBIGUOUS[key])
    key = _ALIASES.get(key, key)
    if key not in METHODS:
        close = difflib.get_close_matches(key, list(METHODS), n=3)
        hint = f" Did you mean {', '.join(close)}?" if close else ""
        raise ValueError(f"unknown method {name!r}.{hint} Valid methods: {', '.join(METHODS)}")
    return METHODS[key]


__all__ = [
    "METHODS",
    "Hyperparameter",
    "MethodSpec",
    "get_method",
    "resolve_hyperparameters",
]
