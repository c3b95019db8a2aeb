"""Options on the pairwise methods: an NLL term, LD-DPO, f-DPO and WPO weighting.

Each option is a hyperparameter that :func:`with_pairwise_options` adds to a method's table entry
(:data:`PAIRWISE_OPTIONS`), with defaults that leave the method unchanged. The wrapped ``compute``
applies them around the method's own adapter, in this order:

1. LD-DPO (``ld_alpha`` < 1): the policy's sequence log-probs are replaced by the
   length-desensitised sums the pairwise step put in ``LossInputs.ld_policy_*_logps``; the
   reference's were reduced the same way where they were scored (online or pre-computed).
2. f-DPO (``f_divergence_type``, methods bound with ``f_divergence=True`` only): each log-ratio
   ``rho`` is replaced by ``s(rho) = f'(pi/pi_ref)``
   (:func:`~dpokit.losses.fdpo.f_divergence_scores`) by handing the method
   ``policy' = ref + s(rho)``: a loss of ``rho_w - rho_l`` then becomes f-DPO's loss of
   ``s(rho_w) - s(rho_l)``.
3. the method's loss.
4. the NLL term (``nll_weight``): ``+ weight * -logp(y_w) / |y_w|`` from the PLAIN policy sums
   (:func:`~dpokit.losses.nll.add_chosen_nll`), logged as ``nll_loss``.
5. WPO (``use_weighting``): the whole per-example loss (NLL term included, as TRL 1.16 weights
   every component) times the detached pair weight from the policy's log-probs and
   ``LossInputs.chosen/rejected_log_sum_sq`` (:func:`~dpokit.losses.wpo.wpo_weights_from_sums`).

:class:`SequenceReduction` is how the pairwise step and the pre-computed reference turn per-token
log-probs into sequence log-probs under these options, and what part of it a reference cache key
must hold.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

from torch import Tensor

from dpokit.losses.base import LossInputs, LossOutput
from dpokit.losses.fdpo import F_DIVERGENCES, f_divergence_scores
from dpokit.losses.hyperparameters import Hyperparameter, resolve
from dpokit.losses.ld_dpo import ld_flat_weights
from dpokit.losses.nll import add_chosen_nll
from dpokit.losses.wpo import apply_pair_weights, wpo_weights_from_sums

__all__ = [
    "F_DIVERGENCE_OPTIONS",
    "OPTION_LIMITS",
    "PAIRWISE_OPTIONS",
    "OptionSettings",
    "SequenceReduction",
    "option_settings",
    "takes_pairwise_options",
    "with_pairwise_options",
    "wpo_weighted",
]

PAIRWISE_OPTIONS: Mapping[str, Hyperparameter] = MappingProxyType(
    {
        "nll_weight": Hyperparameter(
            0.0,
            float,
            "weight of the NLL of the chosen answer per completion token (RPO, arXiv:2404.19733; "
            "TRL rpo_alpha); 0 = off",
            0.0,
        ),
        "ld_alpha": Hyperparameter(
            1.0,
            float,
            "LD-DPO (arXiv:2409.06411): weight of the tokens beyond the pair's shared length, "
            "policy and reference alike; 1 = off",
            0.0,
            1.0,
        ),
        "use_weighting": Hyperparameter(
            False,
            bool,
            "WPO (arXiv:2406.11827): weight each pair by the policy's length-normalised, "
            "sampling-aligned probability of both answers (detached)",
        ),
    }
)

# Only for methods whose loss is a function of the log-ratios rho_w, rho_l of summed log-probs.
F_DIVERGENCE_OPTIONS: Mapping[str, Hyperparameter] = MappingProxyType(
    {
        "f_divergence_type": Hyperparameter(
            "reverse_kl",
            str,
            "f-DPO (arXiv:2309.16240): the divergence whose f'(pi/pi_ref) replaces the log-ratio; "
            "reverse_kl = the method itself",
            choices=F_DIVERGENCES,
        ),
        "f_alpha_divergence_coef": Hyperparameter(
            0.5,
            float,
            "f-DPO alpha_divergence coefficient c (TRL 1.16's; the paper's alpha is 1 - c)",
            0.0,
            1.0,
        ),
    }
)


# Why a pairwise method may lack an option (for the message that names the methods that take it).
OPTION_LIMITS: Mapping[str, str] = MappingProxyType(
    {
        "use_weighting": "WPO weights each pair; AOT's losses are per rank of the sorted batch, so "
        "a pair's weight would land on another pair's term; TRL 1.16 refuses it too",
        "f_divergence_type": "f-DPO replaces the log-ratios of a loss of rho_w - rho_l alone, "
        "where beta * log Z(x) cancels",
        "f_alpha_divergence_coef": "it is f-DPO's (f_divergence_type=alpha_divergence)",
    }
)


@dataclass(frozen=True)
class SequenceReduction:
    """How a pairwise batch's per-token log-probs become ``(2B,)`` sequence log-probs.

    Attributes:
        ld_alpha: LD-DPO's tail weight in [0, 1]; 1 = plain sums.
    """

    ld_alpha: float = 1.0

    @property
    def plain(self) -> bool:
        """True when the sums are the plain ones (nothing to recompute, no cache key part)."""
        return self.ld_alpha == 1.0

    def cache_settings(self) -> dict[str, float]:
        """What a cache of reduced log-probs must be keyed on: ``{}`` for plain sums (so that
        existing caches stay valid), else ``{"ld_alpha": alpha}``."""
        return {} if self.plain else {"ld_alpha": self.ld_alpha}

    def __call__(self, out: Any, pairs: int) -> Tensor:
        """``(2B,)`` sequence log-probs of ``out`` (a ``ScoreOutput``: ``logps`` ``(2B,)``,
        ``token_logps`` and ``row_index`` ``(M,)``) for ``pairs`` = B pairs, chosen rows first.

        An output without per-token log-probs (a pre-computed table) is returned as it is: the
        table was reduced the same way when it was scored. Raises ``ValueError`` when LD-DPO is
        on and ``out`` holds other than 2B sequences.
        """
        if self.plain or out.token_logps is None:
            return out.logps
        if out.logps.shape[0] != 2 * pairs:
            raise ValueError(f"LD-DPO needs 2B = {2 * pairs} sequences, got {out.logps.shape[0]}")
        weights = ld_flat_weights(out.row_index, pairs, self.ld_alpha, out.token_logps.dtype)
        return out.logps.new_zeros(2 * pairs).index_add(0, out.row_index, out.token_logps * weights)


@dataclass(frozen=True)
class OptionSettings:
    """The options of a run that change what the log-prob engine must compute.

    Attributes:
        reduction: the :class:`SequenceReduction` (LD-DPO).
        use_weighting: WPO: the scorer must also return ``log sum_v p_v**2`` per token.
    """

    reduction: SequenceReduction = SequenceReduction()
    use_weighting: bool = False


def option_settings(spec: Any, hyperparameters: Mapping[str, Any] | None) -> OptionSettings:
    """The :class:`OptionSettings` of method ``spec`` (a ``MethodSpec``) with the given (partial,
    unparsed) hyperparameters; defaults for a method without the options.

    Raises ``ValueError`` for an invalid or unknown hyperparameter (see
    :func:`~dpokit.losses.hyperparameters.resolve`).
    """
    if "ld_alpha" not in spec.hyperparameters:
        return OptionSettings()
    hp = resolve(spec.name, spec.hyperparameters, hyperparameters)
    # A combined objective shares its parts' keys with None as "each part's own default".
    ld_alpha = PAIRWISE_OPTIONS["ld_alpha"].default if hp["ld_alpha"] is None else hp["ld_alpha"]
    return OptionSettings(SequenceReduction(ld_alpha), bool(hp.get("use_weighting")))


def _with_ld(inputs: LossInputs, name: str) -> LossInputs:
    chosen, rejected = inputs.require(name, "ld_policy_chosen_logps", "ld_policy_rejected_logps")
    return dataclasses.replace(inputs, policy_chosen_logps=chosen, policy_rejected_logps=rejected)


def _with_f_divergence(inputs: LossInputs, name: str, hp: Mapping[str, Any]) -> LossInputs:
    pc, pr, rc, rr = inputs.require(
        name,
        "policy_chosen_logps",
        "policy_rejected_logps",
        "reference_chosen_logps",
        "reference_rejected_logps",
    )
    options = {"divergence": hp["f_divergence_type"], "alpha_coef": hp["f_alpha_divergence_coef"]}
    # policy' - ref = s(rho): the method's log-ratios become f-DPO's scores.
    return dataclasses.replace(
        inputs,
        policy_chosen_logps=rc + f_divergence_scores(pc - rc, **options),
        policy_rejected_logps=rr + f_divergence_scores(pr - rr, **options),
    )


def wpo_weighted(out: LossOutput, plain: LossInputs, name: str) -> LossOutput:
    """``out`` with each example's loss times its detached WPO pair weight (``(B,)``, from the
    policy's plain summed log-probs, ``chosen/rejected_log_sum_sq`` and the lengths in ``plain``;
    :func:`~dpokit.losses.wpo.wpo_weights_from_sums`). Raises ``ValueError`` naming method
    ``name`` when an input is missing."""
    weights = wpo_weights_from_sums(
        *plain.require(
            name,
            "policy_chosen_logps",
            "policy_rejected_logps",
            "chosen_log_sum_sq",
            "rejected_log_sum_sq",
            "chosen_lengths",
            "rejected_lengths",
        )
    )
    return apply_pair_weights(out, weights)


def with_pairwise_options(spec: Any, *, f_divergence: bool = False, weighting: bool = True) -> Any:
    """``spec`` (a ``MethodSpec``) with :data:`PAIRWISE_OPTIONS` (and, with ``f_divergence``,
    :data:`F_DIVERGENCE_OPTIONS`) added to its hyperparameters and applied by its ``compute``
    (see the module docstring for the order).

    ``f_divergence=True`` only for a method whose loss depends on the log-ratios of SUMMED
    log-probs alone (DPO, rDPO, hinge, EXO, DiscoPOP, ...), or on those log-ratios divided by the
    completion lengths (IPO's average, sigmoid_norm): the substitution ``policy' = ref + s(rho)``
    is f-DPO exactly there (``(ref + s) / n - ref / n = s / n``), as in TRL 1.16. The logged
    rewards are then the method's own on ``s(rho)``. ``weighting=False`` leaves out
    ``use_weighting`` (WPO), for a loss whose per-example terms are not per pair (AOT sorts the
    batch, so a pair's weight would land on a rank; TRL 1.16 refuses it too).

    Raises ``ValueError`` when ``spec`` already has a hyperparameter of the same name.
    """
    options = dict(PAIRWISE_OPTIONS, **(F_DIVERGENCE_OPTIONS if f_divergence else {}))
    if not weighting:
        del options["use_weighting"]
    clash = sorted(set(options) & set(spec.hyperparameters))
    if clash:
        raise ValueError(f"method {spec.name} already has hyperparameter(s) {clash}")
    hyperparameters = MappingProxyType({**spec.hyperparameters, **options})
    inner: Callable[..., LossOutput] = spec.compute
    name = spec.name

    def compute(inputs: LossInputs, hparams: Mapping[str, Any] | None = None) -> LossOutput:
        hp = resolve(name, hyperparameters, hparams)
        own = {key: value for key, value in hp.items() if key not in options}
        plain = inputs
        if hp["ld_alpha"] != 1.0:
            inputs = _with_ld(inputs, name)
        if f_divergence and hp["f_divergence_type"] != "reverse_kl":
            inputs = _with_f_divergence(inputs, name, hp)
        out = inner(inputs, own)
        if hp["nll_weight"] > 0:
            chosen, lengths = plain.require(name, "policy_chosen_logps", "chosen_lengths")
            out = add_chosen_nll(out, chosen, lengths, weight=hp["nll_weight"])
        if hp.get("use_weighting"):
            out = wpo_weighted(out, plain, name)
        return out

    compute.__name__ = compute.__qualname__ = f"compute_{name}"
    compute.__doc__ = f"Loss of method {name} with the pairwise options (dpokit.losses.options)."
    return dataclasses.replace(spec, compute=compute, hyperparameters=hyperparameters)


def takes_pairwise_options(spec: Any) -> bool:
    """Whether the options apply to ``spec``: pairs trained by the pairwise step, with a
    reference (the methods TRL's ``DPOTrainer`` covers)."""
    return spec.step == "pairwise" and spec.reference != "none"
