"""ODPO: DPO with an offset (Amini et al., 2024, arXiv:2402.10571)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_choice, check_range, check_same_shape

OFFSET_FORMS = ("difference", "ratio")


def odpo_valid_pairs(
    score_chosen: Tensor, score_rejected: Tensor, *, form: str = "difference"
) -> Tensor:
    """``(B,)`` bool: which pairs give a finite offset (for a data layer that drops bad pairs).

    ``difference`` needs ``score_chosen > score_rejected``; ``ratio`` also needs both scores > 0.
    NaN scores are invalid.
    """
    check_choice("form", form, OFFSET_FORMS)
    valid = score_chosen > score_rejected  # ties give log(0); reversed scores are bad labels
    if form == "ratio":
        valid = valid & (score_rejected > 0)  # then score_chosen > 0 too
    return valid


def odpo_offsets(
    score_chosen: Tensor,
    score_rejected: Tensor,
    *,
    alpha: float = 1.0,
    form: str = "difference",
) -> Tensor:
    """The offset Delta of each pair, ``(B,)``, detached.

    Equation::

        difference: Delta = alpha * log(s_w - s_l)
        ratio:      Delta = alpha * log(s_w / s_l)

    Args:
        score_chosen, score_rejected: ``(B,)`` scalar quality scores of each response.
        alpha: scale of the offset, >= 0 (default 1.0; 0 gives DPO).
        form: ``"difference"`` (the paper's default) or ``"ratio"``.

    Raises:
        ValueError: on a tie or reversed scores (log of a non-positive number), or a non-positive
            score in ratio form. Drop such pairs upstream with :func:`odpo_valid_pairs`.

    Trap: with scores in (0, 1) the difference form gives a NEGATIVE offset (log of a gap < 1), so
    the required margin is below DPO's; only its ordering across pairs (bigger gap, bigger offset)
    is what the method relies on.
    """
    check_range("alpha", alpha, 0.0)
    check_choice("form", form, OFFSET_FORMS)
    check_same_shape(score_chosen=score_chosen, score_rejected=score_rejected)
    valid = odpo_valid_pairs(score_chosen, score_rejected, form=form)
    if not bool(valid.all()):
        bad = (~valid).nonzero().flatten().tolist()
        if form == "ratio":
            need = "score_chosen > score_rejected > 0"
        else:
            need = "score_chosen > score_rejected (a tie gives log 0)"
        raise ValueError(
            f"ODPO offsets ({form} form) need {need}; {len(bad)} pair(s) violate it at batch "
            f"positions {bad[:10]}: drop them (odpo_valid_pairs) or fix the scores"
        )
    score_chosen, score_rejected = score_chosen.detach(), score_rejected.detach()
    # (B,) difference > 0, ratio > 1
    gap = score_chosen - score_rejected if form == "difference" else score_chosen / score_rejected
    return alpha * torch.log(gap)


def odpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    offsets: Tensor,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """ODPO loss per example: DPO whose margin must exceed a per-pair offset.

    Equation::

        loss = -log sigmoid(beta * (rho_w - rho_l) - Delta)

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` summed completion log-probs, as for DPO.
        offsets: ``(B,)`` Delta from :func:`odpo_offsets`. All zeros gives DPO exactly.
        beta: > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached) and ``metrics["offset"]``.

    Traps: Delta is NOT multiplied by beta. The seed's optional ``kl_coef * KL(pi_theta || pi_ref)``
    term is not part of this function: see :func:`odpo_data_kl` (the method table adds it).
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        offsets=offsets,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    offsets = offsets.detach()  # data, never a path for gradients
    logits = beta * (chosen_logratios - rejected_logratios) - offsets  # (B,)
    return LossOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={"offset": offsets},
    )


def odpo_data_kl(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
) -> Tensor:
    """Per-pair estimate of KL(pi_theta || pi_ref) for the seed's ``+ kl_coef * KL`` term. (B,)

    Equation::

        KL_i ~= ((logp(y_w) - ref(y_w)) + (logp(y_l) - ref(y_l))) / 2 = (rho_w + rho_l) / 2

    A Monte-Carlo-style estimate of E_{y ~ pi_theta}[log pi_theta(y|x) - log pi_ref(y|x)] that uses
    the DATASET's completions in place of samples of the policy: no generation, but biased -- it
    can be negative, and minimizing it lowers the policy's likelihood of the data's own answers
    relative to the reference. Sequence-level (summed over completion tokens). Differentiable in
    the policy log-probs.
    """
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    return (chosen_logratios + rejected_logratios) / 2
