"""The method table, part two: TRL 1.16's DPO loss types dpokit's seed lacked, cDPO, and the
reference-free ORPO and CPO. :mod:`dpokit.losses.registry` joins these rows to the seed's.

Every row here trains on preference pairs with the pairwise step; what differs is the reference
(sequence log-probs, or none for ORPO/CPO) and what the adapter reads. The worked examples of each
are in docs/methods.md ("More objectives") and pinned in tests/test_losses_trl_catalogue.py,
tests/test_losses_reference_free.py and tests/test_losses_catalogue_table.py.
"""

from __future__ import annotations

import functools

from dpokit.losses import adapters
from dpokit.losses.aot import aot_loss, aot_unpaired_loss
from dpokit.losses.apo import apo_down_loss, apo_zero_loss
from dpokit.losses.bco import bco_pair_loss
from dpokit.losses.cdpo import cdpo_loss
from dpokit.losses.cpo import cpo_loss
from dpokit.losses.discopop import discopop_loss
from dpokit.losses.exo import exo_pair_loss
from dpokit.losses.hinge import hinge_loss
from dpokit.losses.hyperparameters import Hyperparameter
from dpokit.losses.nca import nca_pair_loss
from dpokit.losses.orpo import orpo_loss
from dpokit.losses.sigmoid_norm import sigmoid_norm_loss
from dpokit.losses.spec import BETA, MethodSpec, make_spec
from dpokit.losses.sppo import sppo_hard_loss

_AOT_PAPER = (
    "Melnyk et al. 2024, Distributional Preference Alignment of LLMs via Optimal Transport, "
    "arXiv:2406.05882"
)
_APO_PAPER = (
    "D'Oosterlinck et al. 2024, Anchored Preference Optimization and Contrastive Revisions, "
    "arXiv:2408.06266, Eqs. 7-8"
)
_CPO_PAPER = "Xu et al. 2024, Contrastive Preference Optimization, arXiv:2401.08417"
_AOT_SMOOTHING = Hyperparameter(
    0.0, float, "cDPO label smoothing of the logistic loss (TRL label_smoothing)", 0.0, 0.5,
    high_open=True,
)  # fmt: skip
_CPO_ALPHA = Hyperparameter(
    1.0, float, "weight of the chosen answer's per-token NLL (TRL cpo_alpha)", 0.0
)
_CPO_SMOOTHING = Hyperparameter(
    0.0, float, "cDPO-style smoothing of the preference term (TRL label_smoothing)", 0.0, 0.5,
    high_open=True,
)  # fmt: skip
_CPO_NLL_AVERAGE = Hyperparameter(
    "answer",
    str,
    "NLL term per token of each chosen answer, then the mean over pairs (answer), or per chosen "
    "token of the whole micro-batch (tokens; TRL 1.16's CPO cross-entropy)",
    choices=("answer", "tokens"),
)
_BCO_HYPERPARAMETERS = {
    "beta": BETA,
    "baseline": Hyperparameter(
        "running",
        str,
        "reward shift delta: the running mean of all rewards beta*rho seen in training (the "
        "paper, TRL < 1.0), or zero (TRL 1.16's bco_pair)",
        choices=("running", "zero"),
    ),
}


# cDPO, hinge, EXO, NCA, SPPO, APO, DiscoPOP: four log-probs and scalar hyperparameters.
_COMMON = dict(reference="logps")
_REFERENCE_PAIR_ROWS = [
    make_spec(
        "cdpo",
        adapters.reference_adapter(cdpo_loss, "smoothing"),
        {
            "beta": BETA,
            "smoothing": Hyperparameter(
                0.1,
                float,
                "probability that a label is wrong; 0 is DPO",
                0.0,
                0.5,
                high_open=True,
            ),
        },  # fmt: skip
        title="Conservative DPO (cDPO, label smoothing)",
        paper="Mitchell 2023, A note on DPO with noisy preferences and relationship to IPO",
        formula="(1 - smoothing) * nls(beta * h) + smoothing * nls(-beta * h)",
        loss=cdpo_loss,
        **_COMMON,
    ),
    make_spec(
        "hinge",
        adapters.reference_adapter(hinge_loss),
        {"beta": Hyperparameter(0.1, float, "1 / margin in nats", 0.0, low_open=True)},
        title="Hinge on the reference-normalised margin (RSO; TRL's hinge, not SLiC-HF)",
        paper="Liu et al. 2023, Statistical Rejection Sampling Improves Preference "
        "Optimization (RSO), arXiv:2309.06657",
        formula="max(0, 1 - beta * h)",
        loss=hinge_loss,
        **_COMMON,
    ),
    make_spec(
        "exo_pair",
        adapters.reference_adapter(exo_pair_loss, "smoothing"),
        {
            "beta": BETA,
            "smoothing": Hyperparameter(
                1e-3,
                float,
                "eps of the smoothed label (TRL label_smoothing); 0 is log 0",
                0.0,
                0.5,
                low_open=True,
                high_open=True,
            ),
        },  # fmt: skip
        title="Efficient exact optimization, pairwise (EXO)",
        paper="Ji et al. 2024, Towards Efficient Exact Optimization of Language Model "
        "Alignment, arXiv:2402.00856, Eq. 16",
        formula="q * (log q - log(1 - eps)) + (1 - q) * (log(1 - q) - log eps), "
        "q = sigmoid(beta * h)",
        loss=exo_pair_loss,
        **_COMMON,
    ),
    make_spec(
        "nca_pair",
        adapters.reference_adapter(nca_pair_loss),
        {"beta": BETA},
        title="Noise contrastive alignment, pairwise (NCA)",
        paper="Chen et al. 2024, Noise Contrastive Alignment of Language Models with "
        "Explicit Rewards, arXiv:2402.05369",
        formula="nls(beta * rho_w) + nls(-beta * rho_w) / 2 + nls(-beta * rho_l) / 2",
        loss=nca_pair_loss,
        **_COMMON,
    ),
    make_spec(
        "sppo_hard",
        adapters.reference_adapter(sppo_hard_loss),
        {"beta": Hyperparameter(0.1, float, "targets are +-1/(2 beta) nats", 0, low_open=True)},
        title="Self-play preference optimization, hard labels (SPPO)",
        paper="Wu et al. 2024, Self-Play Preference Optimization for Language Model "
        "Alignment, arXiv:2405.00675",
        formula="(rho_w - 1 / (2 * beta))**2 + (rho_l + 1 / (2 * beta))**2",
        loss=sppo_hard_loss,
        **_COMMON,
    ),
    make_spec(
        "apo_zero",
        adapters.reference_adapter(apo_zero_loss),
        {"beta": BETA},
        title="Anchored preference optimization, zero (APO-zero: chosen up, rejected down)",
        paper=_APO_PAPER,
        formula="1 - sigmoid(beta * rho_w) + sigmoid(beta * rho_l)",
        loss=apo_zero_loss,
        **_COMMON,
    ),
    make_spec(
        "apo_down",
        adapters.reference_adapter(apo_down_loss),
        {"beta": BETA},
        title="Anchored preference optimization, down (APO-down: both down, rejected more)",
        paper=_APO_PAPER,
        formula="sigmoid(beta * rho_w) + 1 - sigmoid(beta * h)",
        loss=apo_down_loss,
        **_COMMON,
    ),
    make_spec(
        "discopop",
        adapters.reference_adapter(discopop_loss, "tau"),
        {
            "beta": BETA,
            "tau": Hyperparameter(
                0.05,
                float,
                "width of the logistic/exponential switch (TRL discopop_tau)",
                0.0,
                low_open=True,
            ),
        },  # fmt: skip
        title="DiscoPOP (log-ratio modulated loss)",
        paper="Chris Lu et al. 2024, Discovering Preference Optimization Algorithms with "
        "and for Large Language Models, arXiv:2406.08414, Eq. 5",
        formula="(1 - m) * nls(z) + m * exp(-z), z = beta * h, m = sigmoid(z / tau)",
        loss=discopop_loss,
        **_COMMON,
    ),
]


# BCO (a running baseline), AOT (couples the batch) and length-normalised DPO (lengths).
_BATCH_AND_STATE_ROWS = [
    make_spec(
        "bco_pair",
        adapters.compute_bco_pair,
        _BCO_HYPERPARAMETERS,
        title="Binary classifier optimization, pairwise (BCO)",
        paper="Jung et al. 2024, Binary Classifier Optimization for Large Language Model "
        "Alignment, arXiv:2404.04656",
        formula="nls(beta * rho_w - delta) + nls(-(beta * rho_l - delta)), delta = running "
        "mean of beta * rho",
        loss=bco_pair_loss,
        reference="logps",
        baseline_rewards=functools.partial(
            adapters.bco_baseline_rewards, hyperparameters=_BCO_HYPERPARAMETERS
        ),
    ),
    make_spec(
        "aot",
        adapters.reference_adapter(aot_loss, "smoothing"),
        {"beta": BETA, "smoothing": _AOT_SMOOTHING},
        title="Alignment via optimal transport, paired (AOT; the loss couples the batch)",
        paper=_AOT_PAPER,
        formula="nls(beta * (sort(logp_w - logp_l) - sort(ref_w - ref_l))_k) [smoothed]",
        loss=aot_loss,
        reference="logps",
    ),
    make_spec(
        "aot_unpaired",
        adapters.reference_adapter(aot_unpaired_loss, "smoothing"),
        {"beta": BETA, "smoothing": _AOT_SMOOTHING},
        title="Alignment via optimal transport, unpaired (AOT; the loss couples the batch)",
        paper=_AOT_PAPER,
        formula="nls(beta * (sort(rho_w) - sort(rho_l))_k) [smoothed]",
        loss=aot_unpaired_loss,
        reference="logps",
    ),
    make_spec(
        "sigmoid_norm",
        adapters.compute_sigmoid_norm,
        {"beta": BETA},
        title="Length-normalised DPO (TRL sigmoid_norm)",
        paper="TRL 1.16 loss_type sigmoid_norm: DPO (Rafailov et al. 2023, arXiv:2305.18290) "
        "on per-token log-ratios",
        formula="nls(beta * (rho_w / |y_w| - rho_l / |y_l|))",
        loss=sigmoid_norm_loss,
        reference="logps",
    ),
]


# ORPO, CPO and CPO-SimPO: no reference model; an NLL term on the chosen answer.
_REFERENCE_FREE_ROWS = [
    make_spec(
        "orpo",
        adapters.compute_orpo,
        {
            "beta": Hyperparameter(
                0.1,
                float,
                "weight of the odds-ratio term (the paper's lambda)",
                0.0,
                low_open=True,
            ),
        },  # fmt: skip
        title="Odds-ratio preference optimization (ORPO)",
        paper="Hong, Lee and Thorne 2024, ORPO: Monolithic Preference Optimization without "
        "Reference Model, arXiv:2403.07691",
        formula="-a_w + beta * nls(log_odds(a_w) - log_odds(a_l)), a = logp(y) / |y|, "
        "log_odds(a) = a - log(1 - exp(a))",
        loss=orpo_loss,
        reference="none",
        averaged_logps=True,
    ),
    make_spec(
        "cpo",
        functools.partial(adapters.compute_cpo, variant="sigmoid"),
        {
            "beta": BETA,
            "alpha": _CPO_ALPHA,
            "label_smoothing": _CPO_SMOOTHING,
            "nll_average": _CPO_NLL_AVERAGE,
        },
        title="Contrastive preference optimization (CPO)",
        paper=_CPO_PAPER,
        formula="nls(beta * (logp(y_w) - logp(y_l))) [smoothed] + alpha * -logp(y_w) / |y_w|",
        loss=functools.partial(cpo_loss, variant="sigmoid"),
        reference="none",
    ),
    make_spec(
        "cpo_simpo",
        functools.partial(adapters.compute_cpo, variant="simpo"),
        {
            "beta": BETA,
            "gamma": Hyperparameter(0.5, float, "ABSOLUTE target margin (TRL simpo_gamma)", 0.0),
            "alpha": _CPO_ALPHA,
            "label_smoothing": _CPO_SMOOTHING,
            "nll_average": _CPO_NLL_AVERAGE,
        },
        title="CPO with SimPO's objective (CPO-SimPO)",
        paper=_CPO_PAPER + "; SimPO: Meng et al. 2024, arXiv:2405.14734",
        formula="nls(beta * (logp(y_w)/|y_w| - logp(y_l)/|y_l|) - gamma) [smoothed] "
        "+ alpha * -logp(y_w) / |y_w|",
        loss=functools.partial(cpo_loss, variant="simpo"),
        reference="none",
        averaged_logps=True,
    ),
]


CATALOGUE: list[MethodSpec] = [
    *_REFERENCE_PAIR_ROWS,
    *_BATCH_AND_STATE_ROWS,
    *_REFERENCE_FREE_ROWS,
]

__all__ = ["CATALOGUE"]
