"""AOT: alignment via optimal transport, distributional preference alignment by sorting
(Melnyk et al., 2024, "Distributional Preference Alignment of LLMs via Optimal Transport",
arXiv:2406.05882). Paired and unpaired forms, as TRL's ``aot`` and ``aot_unpaired``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def _smoothed_logistic(margin: Tensor, beta: float, smoothing: float) -> Tensor:
    """cDPO-style smoothed logistic loss of a ``(B,)`` margin (see :func:`cdpo_loss`)."""
    logits = beta * margin
    return (1 - smoothing) * -F.logsigmoid(logits) + smoothing * -F.logsigmoid(-logits)


def _check(beta: float, smoothing: float, **tensors: Tensor) -> None:
    check_range("beta", beta, 0.0, low_open=True)
    check_range("smoothing", smoothing, 0.0, 0.5, high_open=True)
    check_same_shape(**tensors)
    shape = next(iter(tensors.values())).shape
    if len(shape) != 1:
        raise ValueError(f"AOT sorts over the batch: inputs need shape (B,), got {tuple(shape)}")


def aot_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    smoothing: float = 0.0,
) -> LossOutput:
    """Paired AOT loss: the policy's sorted log-odds must dominate the reference's, rank by rank.

    Equation (sort = ascending over the batch, applied to each vector separately)::

        u = sort(logp(y_w) - logp(y_l))            (B,) the policy's per-pair log-odds
        v = sort(ref(y_w) - ref(y_l))              (B,) the reference's
        loss_k = (1 - s) * -log sigmoid(beta * (u_k - v_k)) + s * -log sigmoid(-beta * (u_k - v_k))

    Matching the k-th smallest with the k-th smallest is the optimal transport plan in 1-D;
    driving every ``u_k - v_k`` up makes the policy's log-odds distribution first-order
    stochastically dominate the reference's.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        beta: > 0 (default 0.1).
        smoothing: cDPO label smoothing s in [0, 0.5) (default 0.0); TRL's ``label_smoothing``
            under ``loss_type="aot"``.

    Returns:
        :class:`LossOutput` whose ``losses[k]`` belongs to RANK k, not to pair k;
        rewards ``beta * rho`` per pair in the input order (detached), as TRL logs them.

    Raises:
        ValueError: ``beta`` <= 0, ``smoothing`` outside [0, 0.5), inputs not ``(B,)`` or of
        different shapes.

    Traps: the objective depends on the whole batch. Only the mean of ``losses`` is meaningful:
    do not weight, mask or drop single entries. Sorting is per call, so the effective batch for
    the sort is the micro-batch on one process -- gradient accumulation or data parallelism
    changes the objective, and B=1 reduces it to cDPO. With policy == reference every
    ``u_k - v_k`` is 0 and the loss is ln 2 = 0.693147.
    """
    _check(
        beta,
        smoothing,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    policy_logodds, _ = torch.sort(policy_chosen_logps - policy_rejected_logps)  # (B,)
    reference_logodds, _ = torch.sort(reference_chosen_logps - reference_rejected_logps)  # (B,)
    margin = policy_logodds - reference_logodds  # (B,) by rank
    return LossOutput(
        losses=_smoothed_logistic(margin, beta, smoothing),
        chosen_rewards=beta * (policy_chosen_logps - reference_chosen_logps).detach(),
        rejected_rewards=beta * (policy_rejected_logps - reference_rejected_logps).detach(),
        metrics={"sorted_margin": margin.detach()},
    )


def aot_unpaired_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    *,
    beta: float = 0.1,
    smoothing: float = 0.0,
) -> LossOutput:
    """Unpaired AOT loss: the sorted chosen log-ratios must dominate the sorted rejected ones.

    Equation (rho = logp(y) - ref(y); sort = ascending over the batch, each vector separately)::

        m_k = sort(rho_w)_k - sort(rho_l)_k
        loss_k = (1 - s) * -log sigmoid(beta * m_k) + s * -log sigmoid(-beta * m_k)

    Which rejected answer went with which chosen one is never used: only the two distributions
    of implicit rewards are compared.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens. The i-th
            chosen and i-th rejected entries need not share a prompt, but there must be as many
            of each (TRL feeds it preference pairs).
        beta: > 0 (default 0.1).
        smoothing: cDPO label smoothing s in [0, 0.5) (default 0.0); TRL's ``label_smoothing``
            under ``loss_type="aot_unpaired"``.

    Returns:
        :class:`LossOutput` whose ``losses[k]`` belongs to RANK k; rewards ``beta * rho`` in the
        input order (detached).

    Raises:
        ValueError: as :func:`aot_loss`.

    Traps: as :func:`aot_loss` (batch-dependent; micro-batch and per-process sorting; only the
    mean is meaningful). With policy == reference all rho are 0 and the loss is ln 2.
    """
    _check(
        beta,
        smoothing,
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    margin = torch.sort(chosen_logratios).values - torch.sort(rejected_logratios).values
    return LossOutput(
        losses=_smoothed_logistic(margin, beta, smoothing),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={"sorted_margin": margin.detach()},
    )
