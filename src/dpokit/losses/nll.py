"""The NLL term on the chosen answer, added to any pairwise loss.

RPO (Pang et al., 2024, Iterative Reasoning Preference Optimization, arXiv:2404.19733) trains DPO
plus ``alpha`` times the negative log-likelihood of the chosen answer normalised by its length; the
same term is SimPO's ``sft_weight``, OpenRLHF's ``nll_loss_coef``, TRL's former ``rpo_alpha`` (TRL
1.16: ``loss_type: [sigmoid, sft]`` with ``loss_weights: [1, alpha]``), CPO's ``cpo_alpha`` and
ORPO's supervised part. One function here; every method adds it the same way.
"""

from __future__ import annotations

from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def chosen_nll_term(
    policy_chosen_logps: Tensor,
    chosen_lengths: Tensor,
    weight: float = 1.0,
) -> Tensor:
    """Per-example NLL of the chosen answer, per completion token, times ``weight``.

    Equation::

        term = weight * -logp(y_w) / |y_w|

    Args:
        policy_chosen_logps: ``(B,)`` log pi_theta(y_w|x), SUMMED over completion tokens.
        chosen_lengths: ``(B,)`` number of completion tokens of y_w (int or float). A length of
            0 is read as 1 (the sum is then 0, so the term is 0), as TRL's ``clamp(min=1)``.
        weight: >= 0 (default 1.0; RPO recommends 1.0). ``weight=0`` gives zeros.

    Returns:
        ``(B,)`` differentiable term to ADD to a pairwise method's per-example losses.

    Raises:
        ValueError: ``weight`` negative or not a number; shapes differ.

    Source: Pang et al. 2024, arXiv:2404.19733 (RPO: DPO + alpha * NLL normalised by the length of
    the chosen sequence).

    Traps: TRL's ``sft`` loss type (and its former ``rpo_alpha``, CPO's and ORPO's NLL) average
    over ALL chosen tokens of the batch at once, so long answers weigh more; this term averages
    per answer first, as RPO's equation does. The two agree when all chosen answers have the same
    length. TRL's ORPO also scores the PROMPT tokens in its NLL; this term scores completion tokens
    only, like every log-prob in dpokit.
    """
    check_range("weight", weight, 0.0)
    check_same_shape(policy_chosen_logps=policy_chosen_logps, chosen_lengths=chosen_lengths)
    lengths = chosen_lengths.to(policy_chosen_logps.dtype).clamp(min=1.0)  # (B,)
    return -weight * policy_chosen_logps / lengths


def add_chosen_nll(
    output: LossOutput,
    policy_chosen_logps: Tensor,
    chosen_lengths: Tensor,
    *,
    weight: float,
) -> LossOutput:
    """``output`` with :func:`chosen_nll_term` added to its losses and logged on its own.

    Args:
        output: a pairwise method's :class:`LossOutput`, losses ``(B,)``.
        policy_chosen_logps: ``(B,)`` summed completion log-probs of y_w.
        chosen_lengths: ``(B,)`` completion token counts of y_w.
        weight: >= 0; the RPO alpha.

    Returns:
        A new :class:`LossOutput`: ``losses + weight * nll``; rewards unchanged;
        ``metrics["nll_loss"]`` = the UNWEIGHTED per-token NLL ``-logp(y_w)/|y_w|`` (detached),
        the quantity TRL logs as ``nll_loss``, so that runs with different weights compare.

    Raises:
        ValueError: as :func:`chosen_nll_term`, or when the shapes of ``output.losses`` and the
        log-probs differ.
    """
    check_range("weight", weight, 0.0)
    nll = chosen_nll_term(policy_chosen_logps, chosen_lengths, 1.0)  # (B,)
    check_same_shape(losses=output.losses, nll=nll)
    return LossOutput(
        losses=output.losses + weight * nll,
        chosen_rewards=output.chosen_rewards,
        rejected_rewards=output.rejected_rewards,
        rewards=output.rewards,
        metrics={**output.metrics, "nll_loss": nll.detach()},
    )
