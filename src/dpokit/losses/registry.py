"""The method table: every method as data, so the engine never needs ``if method == ...``.

A :class:`MethodSpec` says what a method computes (its loss function and an adapter ``compute``
that picks its inputs from :class:`~dpokit.losses.base.LossInputs`), which hyperparameters it takes
(with defaults, types and valid ranges), and what the engine must provide around it: a reference
model, per-token averages, token-level KL, scores, a data format, the per-batch step that trains
it (a key of :data:`dpokit.steps.STEPS`) and, for methods that are several runs, the recipe that
chains them (a key of :data:`dpokit.recipes.RECIPES`). This module only names them: the losses
layer imports neither.

The table is in three parts: the seed's methods here, TRL 1.16's loss types and the
reference-free methods in :mod:`dpokit.losses.catalogue`, and ``combined`` (weighted sums of the
others) from :mod:`dpokit.losses.combined`. :class:`MethodSpec` is defined in
:mod:`dpokit.losses.spec`, the adapters in :mod:`dpokit.losses.adapters`.

Notation in formulas: ``nls(z) = -log sigmoid(z)``, ``rho = logp(y) - ref(y)`` (summed over
completion tokens), ``h = rho_w - rho_l``.
"""

from __future__ import annotations

import difflib
import functools
from collections.abc import Mapping
from types import MappingProxyType

from dpokit.losses import adapters
from dpokit.losses.catalogue import CATALOGUE
from dpokit.losses.combined import combined_row
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.dpop import dpop_loss
from dpokit.losses.hyperparameters import Hyperparameter, resolve_hyperparameters
from dpokit.losses.ipo import ipo_loss
from dpokit.losses.kto import kto_loss
from dpokit.losses.odpo import odpo_loss
from dpokit.losses.options import takes_pairwise_options, with_pairwise_options
from dpokit.losses.rdpo import rdpo_loss
from dpokit.losses.simpo import simpo_loss
from dpokit.losses.slic import slic_loss
from dpokit.losses.spec import (
    BETA,
    DATA_KINDS,
    RECIPE_KINDS,
    REFERENCE_KINDS,
    STEP_KINDS,
    MethodSpec,
    make_spec,
)
from dpokit.losses.spin import spin_loss
from dpokit.losses.tdpo import tdpo_loss

# ---- the table -------------------------------------------------------------------------------

# The variant is bound here, in the table: the loss never receives a method name.
_TDPO1 = functools.partial(tdpo_loss, variant="tdpo1")
_TDPO2 = functools.partial(tdpo_loss, variant="tdpo2")

_TDPO_COMMON = dict(
    paper="Zeng et al. 2024, Token-level Direct Preference Optimization, arXiv:2404.11999",
    reference="online",
    token_kl=True,
)

_SPECS = [
    make_spec(
        "dpo",
        adapters.compute_dpo,
        {"beta": BETA},
        title="Direct Preference Optimization (DPO)",
        paper="Rafailov et al. 2023, arXiv:2305.18290",
        formula="nls(beta * h)",
        loss=dpo_loss,
        reference="logps",
    ),
    make_spec(
        "dpop",
        adapters.compute_dpop,
        {
            "beta": BETA,
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
    make_spec(
        "slic",
        adapters.compute_slic,
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
    make_spec(
        "tdpo1",
        functools.partial(adapters.compute_tdpo, loss=_TDPO1),
        {"beta": BETA},
        title="Token-level DPO, variant 1 (TDPO1)",
        formula="nls(beta * (h - (D_l - D_w))), D = sum_t KL(ref || policy) over the vocabulary",
        loss=_TDPO1,
        **_TDPO_COMMON,
    ),
    make_spec(
        "tdpo2",
        functools.partial(adapters.compute_tdpo, loss=_TDPO2),
        {
            "beta": BETA,
            "alpha": Hyperparameter(0.5, float, "weight of the token-level KL margin", 0.0),
        },
        title="Token-level DPO, variant 2 (TDPO2, recommended)",
        formula="nls(beta * (h - alpha * (D_l - sg(D_w)))), D = sum_t KL(ref || policy)",
        loss=_TDPO2,
        **_TDPO_COMMON,
    ),
    make_spec(
        "kto",
        adapters.compute_kto,
        {
            "beta": BETA,
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
    make_spec(
        "ipo",
        adapters.compute_ipo,
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
    make_spec(
        "spin",
        adapters.compute_spin,
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
    make_spec(
        "segment_dpo",
        adapters.compute_dpo,
        {"beta": BETA},
        title="Segment-level DPO (SDPO)",
        paper="Kong et al. 2025, SDPO: Segment-Level Direct Preference Optimization for Social "
        "Agents, arXiv:2501.01821",
        formula="nls(beta * h), log-probs summed over the agent turns of the segment only",
        loss=dpo_loss,
        reference="logps",
        data="multiturn_pairs",
        step="segment",
    ),
    make_spec(
        "stepwise_dpo",
        adapters.compute_dpo,
        {
            "beta": BETA,
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
    make_spec(
        "simpo",
        adapters.compute_simpo,
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
    make_spec(
        "odpo",
        adapters.compute_odpo,
        {
            "beta": BETA,
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
    make_spec(
        "rdpo",
        adapters.compute_rdpo,
        {
            "beta": BETA,
            "eps": Hyperparameter(0.1, float, "assumed label-flip rate", 0.0, 0.5, high_open=True),
        },
        title="Provably robust DPO (rDPO)",
        paper="Chowdhury et al. 2024, Provably Robust DPO, arXiv:2403.00409",
        formula="((1 - eps) * nls(beta * h) - eps * nls(-beta * h)) / (1 - 2 * eps)",
        loss=rdpo_loss,
        reference="logps",
    ),
]

_SPECS += CATALOGUE
# The options of every pairwise method with a reference (nll_weight, ld_alpha, use_weighting;
# f-DPO's on the losses of the log-ratios rho_w, rho_l alone, summed or divided by the lengths:
# TRL 1.16's sigmoid, robust, hinge, ipo, exo_pair, discopop, sigmoid_norm): dpokit.losses.options.
# AOT sorts the batch, so per-pair WPO weights would land on ranks: no use_weighting (TRL refuses).
_F_DIVERGENCE = (
    "dpo", "rdpo", "stepwise_dpo", "spin", "hinge", "ipo", "exo_pair", "discopop", "sigmoid_norm",
)  # fmt: skip
_NO_WEIGHTING = ("aot", "aot_unpaired")
_SPECS = [
    with_pairwise_options(
        s, f_divergence=s.name in _F_DIVERGENCE, weighting=s.name not in _NO_WEIGHTING
    )
    if takes_pairwise_options(s)
    else s
    for s in _SPECS
]
_SPECS.append(combined_row({spec.name: spec for spec in _SPECS}))

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
    "DATA_KINDS",
    "METHODS",
    "RECIPE_KINDS",
    "REFERENCE_KINDS",
    "STEP_KINDS",
    "Hyperparameter",
    "MethodSpec",
    "get_method",
    "resolve_hyperparameters",
]
