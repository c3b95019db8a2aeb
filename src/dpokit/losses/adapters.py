"""Adapters: how each method's loss is fed from :class:`~dpokit.losses.base.LossInputs`.

An adapter is ``adapter(method_name, inputs, resolved_hyperparameters) -> LossOutput``: it picks
the inputs its loss needs (``inputs.require`` names what is missing), converts them (per-token
averages, offsets, the BCO baseline) and calls the pure loss. The method table
(:mod:`dpokit.losses.registry`, :mod:`dpokit.losses.catalogue`) binds one adapter to each row;
no adapter receives a method name to branch on (``name`` is only for error messages).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor

from dpokit.losses.base import LossInputs, LossOutput
from dpokit.losses.bco import bco_pair_loss
from dpokit.losses.cpo import cpo_loss
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.dpop import dpop_loss
from dpokit.losses.hyperparameters import Hyperparameter, resolve
from dpokit.losses.ipo import ipo_loss
from dpokit.losses.kto import kto_loss
from dpokit.losses.nll import chosen_nll_term
from dpokit.losses.odpo import odpo_data_kl, odpo_loss, odpo_offsets
from dpokit.losses.orpo import orpo_loss
from dpokit.losses.rdpo import rdpo_loss
from dpokit.losses.sigmoid_norm import sigmoid_norm_loss
from dpokit.losses.simpo import simpo_loss
from dpokit.losses.slic import slic_loss
from dpokit.losses.spin import spin_loss

POLICY_PAIR = ("policy_chosen_logps", "policy_rejected_logps")
REFERENCE_PAIR = ("reference_chosen_logps", "reference_rejected_logps")


def per_token(name: str, inputs: LossInputs, *logps: Tensor) -> tuple[Tensor, ...]:
    """Divide ``(B,)`` (chosen, rejected[, ref chosen, ref rejected]) sums by the completion
    lengths. Raises ``ValueError`` on a length below 1 or missing lengths.

    Policy and reference use the same lengths: both score the same tokens.
    """
    chosen_lengths, rejected_lengths = inputs.require(name, "chosen_lengths", "rejected_lengths")
    if bool((chosen_lengths <= 0).any()) or bool((rejected_lengths <= 0).any()):
        raise ValueError(f"method {name}: completion lengths must be >= 1 to average log-probs")
    lengths = (chosen_lengths, rejected_lengths) * (len(logps) // 2)
    return tuple(lp / n.to(lp.dtype) for lp, n in zip(logps, lengths, strict=True))


def compute_dpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """DPO on the four summed log-probs."""
    return dpo_loss(*inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR), beta=hp["beta"])


def compute_dpop(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """DPOP: DPO plus the chosen-likelihood penalty ``lam``."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    return dpop_loss(*logps, beta=hp["beta"], lam=hp["lam"])


def compute_rdpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """rDPO with the assumed flip rate ``eps``."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    return rdpo_loss(*logps, beta=hp["beta"], eps=hp["eps"])


def compute_ipo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """IPO, on per-token averages when ``average`` (the IPO authors' choice)."""
    pc, pr, rc, rr = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    if hp["average"]:
        pc, pr, rc, rr = per_token(name, inputs, pc, pr, rc, rr)
    return ipo_loss(pc, pr, rc, rr, tau=hp["tau"])


def compute_odpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """ODPO: offsets from the scores, plus the optional ``kl_coef`` data-KL term."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    score_chosen, score_rejected = inputs.require(name, "score_chosen", "score_rejected")
    offsets = odpo_offsets(score_chosen, score_rejected, alpha=hp["alpha"], form=hp["form"])
    out = odpo_loss(*logps, offsets.to(logps[0].dtype), beta=hp["beta"])
    kl = odpo_data_kl(*logps)  # (B,) on the data's completions, not on policy samples
    if hp["kl_coef"] > 0:
        out.losses = out.losses + hp["kl_coef"] * kl
    out.metrics["kl/data"] = kl.detach()
    return out


def compute_tdpo(
    name: str, inputs: LossInputs, hp: Mapping[str, Any], *, loss: Callable[..., LossOutput]
) -> LossOutput:
    """TDPO1/TDPO2 (``loss`` bound in the table) with the token-level KL sums."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    seq_kl = inputs.require(name, "chosen_seq_kl", "rejected_seq_kl")
    # tdpo1 has no alpha; its loss ignores the value it gets.
    alpha = hp.get("alpha", 0.5)
    return loss(*logps, *seq_kl, beta=hp["beta"], alpha=alpha)


def compute_simpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """SimPO on per-token averaged policy log-probs."""
    chosen, rejected = per_token(name, inputs, *inputs.require(name, *POLICY_PAIR))
    return simpo_loss(chosen, rejected, beta=hp["beta"], gamma=hp["gamma"])


def compute_slic(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """SLiC-HF; y_ref is the chosen answer or the sampled target."""
    chosen, rejected = inputs.require(name, *POLICY_PAIR)
    if hp["target"] == "chosen":
        target = chosen  # "direct" variant: y_ref = y_w
    else:
        (target,) = inputs.require(name, "policy_target_logps")
    return slic_loss(chosen, rejected, target, delta=hp["delta"], lam=hp["lam"])


def compute_kto(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """KTO on unpaired examples; z0 from the batch or zero."""
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


def compute_spin(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """SPIN: DPO with ``lam``, the opponent as the reference."""
    # chosen = human answer, rejected = the opponent's sample, reference = the opponent.
    return spin_loss(*inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR), lam=hp["lam"])


# ---- TRL 1.16's loss types and the reference-free methods ---------------------------------------


def compute_with_reference(
    name: str,
    inputs: LossInputs,
    hp: Mapping[str, Any],
    *,
    loss: Callable[..., LossOutput],
    keys: tuple[str, ...] = ("beta",),
) -> LossOutput:
    """``loss(pc, pr, rc, rr, **{k: hp[k] for k in keys})``: the common shape of the losses
    that read the four summed log-probs and only scalar hyperparameters (cDPO, hinge, EXO, NCA,
    SPPO, AOT, APO, DiscoPOP). Bind ``loss`` and ``keys`` with :func:`reference_adapter`."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    return loss(*logps, **{key: hp[key] for key in keys})


def reference_adapter(loss: Callable[..., LossOutput], *keys: str) -> Callable[..., LossOutput]:
    """The adapter of a loss of the four log-probs that takes ``beta`` and ``keys``."""
    return functools.partial(compute_with_reference, loss=loss, keys=("beta", *keys))


def compute_bco_pair(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """BCO (pairwise): the reward shift is ``inputs.reward_baseline`` (the engine's running
    mean, already updated with this batch) or 0 with ``baseline=zero`` (TRL 1.16)."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    if hp["baseline"] == "zero":
        shift = 0.0
    else:
        (shift,) = inputs.require(name, "reward_baseline")
    return bco_pair_loss(*logps, shift, beta=hp["beta"])


def bco_baseline_rewards(
    inputs: LossInputs,
    hp: Mapping[str, Any] | None,
    *,
    hyperparameters: Mapping[str, Hyperparameter],
) -> Tensor | None:
    """The ``(2B,)`` detached rewards ``beta * cat(rho_w, rho_l)`` BCO's running mean folds in
    (TRL's order: chosen then rejected), or ``None`` with ``baseline=zero`` (nothing to track).
    ``hp`` may be partial; ``hyperparameters`` is bco_pair's table, for the defaults. Keys
    outside it (the pairwise options the table adds, already checked there) do not matter here."""
    own = {key: value for key, value in (hp or {}).items() if key in hyperparameters}
    hp = resolve("bco_pair", hyperparameters, own)
    if hp["baseline"] == "zero":
        return None
    pc, pr, rc, rr = inputs.require("bco_pair", *POLICY_PAIR, *REFERENCE_PAIR)
    return hp["beta"] * torch.cat([pc - rc, pr - rr]).detach()


def compute_sigmoid_norm(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """Length-normalised DPO: SUMMED log-probs and the lengths; the loss divides (once)."""
    logps = inputs.require(name, *POLICY_PAIR, *REFERENCE_PAIR)
    lengths = inputs.require(name, "chosen_lengths", "rejected_lengths")
    return sigmoid_norm_loss(*logps, *lengths, beta=hp["beta"])


def compute_orpo(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """ORPO on per-token averaged policy log-probs; no reference."""
    chosen, rejected = per_token(name, inputs, *inputs.require(name, *POLICY_PAIR))
    return orpo_loss(chosen, rejected, beta=hp["beta"])


def compute_cpo(
    name: str, inputs: LossInputs, hp: Mapping[str, Any], *, variant: str
) -> LossOutput:
    """CPO (``variant="sigmoid"``, summed log-probs) or CPO-SimPO (``"simpo"``, the loss
    averages per token itself and subtracts ``gamma``); both add ``alpha`` times the NLL: per
    answer, or with ``nll_average="tokens"`` TRL's NLL per chosen token of the whole batch
    (``-sum logp(y_w) / sum |y_w|``, the same on every pair)."""
    logps = inputs.require(name, *POLICY_PAIR, "chosen_lengths", "rejected_lengths")
    tokens = hp.get("nll_average", "answer") == "tokens"
    out = cpo_loss(
        *logps,
        beta=hp["beta"],
        alpha=0.0 if tokens else hp["alpha"],
        variant=variant,
        gamma=hp.get("gamma", 0.5),  # CPO (sigmoid) has no gamma; the loss ignores it
        label_smoothing=hp["label_smoothing"],
    )
    if tokens:
        chosen, lengths = logps[0], logps[2]
        nll = (-chosen.sum() / lengths.to(chosen.dtype).sum().clamp(min=1.0)).expand_as(chosen)
        out.losses = out.losses + hp["alpha"] * nll
        out.metrics["nll_loss"] = nll.detach()
    return out


def compute_sft_term(name: str, inputs: LossInputs, hp: Mapping[str, Any]) -> LossOutput:
    """The ``sft`` component of a combined objective, ``(B,)`` losses: ``-logp(y_w) / |y_w|`` per
    pair, or with ``hp["average"] == "tokens"`` TRL 1.16's ``sft``: the NLL per chosen token of
    the whole batch, ``-sum_i logp(y_w,i) / sum_i |y_w,i|``, the same for every pair (so a WPO
    weight multiplies it as TRL's does)."""
    chosen, lengths = inputs.require(name, "policy_chosen_logps", "chosen_lengths")
    if hp.get("average", "answer") == "tokens":
        tokens = lengths.to(chosen.dtype).sum().clamp(min=1.0)
        return LossOutput(losses=(-chosen.sum() / tokens).expand(chosen.shape[0]))
    return LossOutput(losses=chosen_nll_term(chosen, lengths, 1.0))
