"""KTO: Kahneman-Tversky Optimization, unpaired data (Ethayarajh et al., 2024, arXiv:2402.01306)."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def kto_loss(
    policy_logps: Tensor,
    reference_logps: Tensor,
    desirable: Tensor,
    kl_baseline: Tensor | float,
    *,
    beta: float = 0.1,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> LossOutput:
    """KTO loss per (unpaired) example.

    Equation (rho = logp(y) - ref(y), z0 = ``kl_baseline``)::

        desirable:   loss = lam_D * (1 - sigmoid(beta * (rho - z0)))
        undesirable: loss = lam_U * (1 - sigmoid(beta * (z0 - rho)))

    Args:
        policy_logps: ``(B,)`` log pi_theta(y|x), summed over completion tokens.
        reference_logps: ``(B,)`` log pi_ref(y|x).
        desirable: ``(B,)`` bool, True for a desirable (thumbs-up) example.
        kl_baseline: scalar z0 from :func:`kto_kl_baseline` (or 0 when KTO follows SFT on the same
            data). Detached here: the baseline carries no gradient.
        beta: > 0 (default 0.1).
        desirable_weight: lam_D > 0 (default 1.0).
        undesirable_weight: lam_U > 0 (default 1.0). See :func:`kto_weight_balance`.

    Returns:
        :class:`LossOutput` with ``rewards = beta * rho`` (detached) and no chosen/rejected ones.

    Traps: z0 comes from MISMATCHED pairs (another example's completion), not from the batch's own
    log-ratios, and must not carry gradient. ``1 - sigmoid(z)`` is computed as ``sigmoid(-z)``.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_range("desirable_weight", desirable_weight, 0.0, low_open=True)
    check_range("undesirable_weight", undesirable_weight, 0.0, low_open=True)
    check_same_shape(
        policy_logps=policy_logps, reference_logps=reference_logps, desirable=desirable
    )
    z0 = torch.as_tensor(kl_baseline, dtype=policy_logps.dtype, device=policy_logps.device)
    if z0.numel() != 1:
        raise ValueError(f"kl_baseline must be a scalar, got shape {tuple(z0.shape)}")
    z0 = z0.detach().reshape(())
    logratios = policy_logps - reference_logps  # (B,) rho
    desirable_losses = desirable_weight * torch.sigmoid(-beta * (logratios - z0))  # (B,)
    undesirable_losses = undesirable_weight * torch.sigmoid(-beta * (z0 - logratios))  # (B,)
    losses = torch.where(desirable.bool(), desirable_losses, undesirable_losses)  # (B,)
    return LossOutput(losses=losses, rewards=beta * logratios.detach())


def kto_kl_baseline(policy_mismatched_logps: Tensor, reference_mismatched_logps: Tensor) -> Tensor:
    """KTO's reference point z0 = max(0, mean_i(logp(y'_i|x_i) - ref(y'_i|x_i))), detached.

    Args:
        policy_mismatched_logps: ``(B,)`` log pi_theta of MISMATCHED pairs: prompt x_i with the
            completion y'_i of another example (rotate completions by one within the batch, so the
            per-process batch must hold more than one example).
        reference_mismatched_logps: ``(B,)`` the same under the reference.

    Returns:
        A 0-dim tensor that never requires grad.

    Trap: with several processes the mean is over ALL of them: pass gathered tensors (e.g.
    ``accelerator.gather``), so every process uses the same z0; clamp after averaging.
    """
    check_same_shape(
        policy_mismatched_logps=policy_mismatched_logps,
        reference_mismatched_logps=reference_mismatched_logps,
    )
    with torch.no_grad():
        mean = (policy_mismatched_logps - reference_mismatched_logps).mean()
        return mean.clamp(min=0).detach()


def kto_weight_balance(
    n_desirable: int,
    n_undesirable: int,
    *,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> float:
    """The paper's balance ratio ``lam_D * n_D / (lam_U * n_U)``; warns outside [1, 4/3].

    KTO's authors recommend weights that keep this ratio in [1, 4/3]; with imbalanced data adjust
    ``desirable_weight`` / ``undesirable_weight``. The warning suggests either weight (the other
    kept) that brings the ratio to the nearest end of the range.
    """
    if n_undesirable <= 0 or n_desirable <= 0:
        warnings.warn(
            f"KTO data has {n_desirable} desirable and {n_undesirable} undesirable examples; "
            "it needs both kinds",
            stacklevel=2,
        )
        return float("inf") if n_undesirable <= 0 else 0.0
    ratio = desirable_weight * n_desirable / (undesirable_weight * n_undesirable)
    if not 1.0 <= ratio <= 4 / 3:
        target = 1.0 if ratio < 1.0 else 4 / 3  # the nearest end of the range
        warnings.warn(
            f"KTO balance desirable_weight*n_desirable / (undesirable_weight*n_undesirable) = "
            f"{desirable_weight:g}*{n_desirable} / ({undesirable_weight:g}*{n_undesirable}) = "
            f"{ratio:.3f} is outside the recommended [1, 4/3]; e.g. "
            f"desirable_weight={target * undesirable_weight * n_undesirable / n_desirable:.4g} "
            f"or undesirable_weight={desirable_weight * n_desirable / (target * n_undesirable):.4g}"
            f" (ratio {target:.4g})",
            stacklevel=2,
        )
    return ratio
