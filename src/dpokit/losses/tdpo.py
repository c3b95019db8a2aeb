"""TDPO: Token-level Direct Preference Optimization (Zeng et al., 2024, arXiv:2404.11999)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from dpokit.losses.base import LossOutput, check_choice, check_range, check_same_shape

TDPO_VARIANTS = ("tdpo1", "tdpo2")


def tdpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    chosen_seq_kl: Tensor,
    rejected_seq_kl: Tensor,
    *,
    beta: float = 0.1,
    alpha: float = 0.5,
    variant: str = "tdpo2",
) -> LossOutput:
    """TDPO loss per example: DPO corrected by the sequential token-level KL of each answer.

    Equation (D = :func:`sequence_kl`, sg = stop-gradient)::

        TDPO1: loss = -log sigmoid(beta * (rho_w - rho_l - (D_l - D_w)))
        TDPO2: loss = -log sigmoid(beta * (rho_w - rho_l - alpha * (D_l - sg(D_w))))

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` summed completion log-probs, as for DPO.
        chosen_seq_kl, rejected_seq_kl: ``(B,)`` D_w, D_l = sum over completion positions of
            KL(pi_ref || pi_theta), differentiable wrt the policy.
        beta: > 0 (default 0.1).
        alpha: weight of the KL term in TDPO2, >= 0 (default 0.5). Ignored by TDPO1, which has
            no alpha (the method table does not accept ``alpha`` for ``tdpo1``).
        variant: ``"tdpo2"`` (recommended, default) or ``"tdpo1"``.

    Returns:
        :class:`LossOutput` whose rewards are ``beta * rho`` (detached), like DPO's, so that
        reward curves compare across methods. The reference code logs ``beta * (rho + D)``
        instead; those are in ``metrics["chosen_rewards_plus_kl"]`` and
        ``metrics["rejected_rewards_plus_kl"]``, next to the detached ``metrics["chosen_seq_kl"]``
        and ``metrics["rejected_seq_kl"]``.

    Traps: the KL is KL(pi_ref || pi_theta) -- expectation under the reference -- over the full
    vocabulary, so the reference must run online. TDPO2's stop-gradient is on D_w (chosen), so
    no gradient flows through ``chosen_seq_kl``; TDPO1 differentiates both.
    """
    check_choice("variant", variant, TDPO_VARIANTS)
    check_range("beta", beta, 0.0, low_open=True)
    if variant == "tdpo2":
        check_range("alpha", alpha, 0.0)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
        chosen_seq_kl=chosen_seq_kl,
        rejected_seq_kl=rejected_seq_kl,
    )
    chosen_logratios = policy_chosen_logps - reference_chosen_logps  # (B,)
    rejected_logratios = policy_rejected_logps - reference_rejected_logps  # (B,)
    if variant == "tdpo1":
        kl_margin = rejected_seq_kl - chosen_seq_kl  # (B,)
    else:
        kl_margin = alpha * (rejected_seq_kl - chosen_seq_kl.detach())  # (B,)
    logits = beta * (chosen_logratios - rejected_logratios - kl_margin)  # (B,)
    chosen_kl, rejected_kl = chosen_seq_kl.detach(), rejected_seq_kl.detach()
    return LossOutput(
        losses=-F.logsigmoid(logits),
        chosen_rewards=beta * chosen_logratios.detach(),
        rejected_rewards=beta * rejected_logratios.detach(),
        metrics={
            "chosen_seq_kl": chosen_kl,
            "rejected_seq_kl": rejected_kl,
            "chosen_rewards_plus_kl": beta * (chosen_logratios.detach() + chosen_kl),
            "rejected_rewards_plus_kl": beta * (rejected_logratios.detach() + rejected_kl),
        },
    )


def _chunk_kl(reference_logits: Tensor, policy_logits: Tensor, loss_mask: Tensor) -> Tensor:
    """Masked sum over one chunk of positions of KL(ref || policy); ``(B, C, V) -> (B,)``."""
    # Upcast bf16/fp16 to fp32 (fp64 stays fp64, for gradcheck).
    dtype = torch.promote_types(reference_logits.dtype, policy_logits.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    reference_logps = reference_logits.to(dtype).log_softmax(-1)  # (B, C, V)
    policy_logps = policy_logits.to(dtype).log_softmax(-1)  # (B, C, V)
    reference_probs = reference_logps.exp()  # (B, C, V)
    # Where the reference probability is exactly 0 (underflow, or a -inf logit) the term is 0 by
    # convention (0 * log 0 = 0); computed naively it is 0 * -inf = NaN.
    terms = torch.where(
        reference_probs > 0, reference_probs * (reference_logps - policy_logps), 0.0
    )  # (B, C, V)
    per_position = terms.sum(-1)  # (B, C)
    # where, not multiply: a fully masked position may hold NaN (e.g. all -inf padding logits).
    return torch.where(loss_mask.bool(), per_position, 0.0).sum(-1)  # (B,)


def sequence_kl(
    reference_logits: Tensor,
    policy_logits: Tensor,
    loss_mask: Tensor,
    *,
    chunk_size: int | None = 128,
) -> Tensor:
    """Sequential KL of TDPO: ``D = sum_t mask_t * KL(pi_ref(.|x, y<t) || pi_theta(.|x, y<t))``.

    Equation per position t (full vocabulary)::

        KL_t = sum_v p_ref(v) * (log p_ref(v) - log p_theta(v)),  terms with p_ref(v) = 0 are 0

    Args:
        reference_logits: ``(B, T, V)`` logits of the reference (no gradient expected).
        policy_logits: ``(B, T, V)`` logits of the policy.
        loss_mask: ``(B, T)`` bool or 0/1, true at completion positions. Must already be aligned
            with the logits: position t's logits are the ones that predict the token whose mask is
            ``loss_mask[:, t]`` (shift the labels by one before building it).
        chunk_size: positions per chunk (``None``: all at once). Each chunk is computed in fp32
            and, under autograd, re-computed in the backward pass (activation checkpointing), so
            fp32 copies of ``B x T x V`` never have to be kept for backward.

    Returns:
        ``(B,)`` D in fp32 (fp64 if the logits are fp64), differentiable wrt both logits.

    Traps: the direction is KL(ref || policy) (ref=(.5,.5), pol=(.8,.2) gives 0.223144, the other
    direction 0.192745). Uses ``log_softmax``: the reference code's ``softmax().log()`` is -inf,
    then NaN, as soon as a probability underflows.
    """
    if reference_logits.shape != policy_logits.shape:
        raise ValueError(
            f"reference_logits {tuple(reference_logits.shape)} and policy_logits "
            f"{tuple(policy_logits.shape)} must have the same shape (B, T, V)"
        )
    if reference_logits.dim() != 3 or tuple(loss_mask.shape) != tuple(reference_logits.shape[:2]):
        raise ValueError(
            f"expected logits (B, T, V) and loss_mask (B, T); got logits "
            f"{tuple(reference_logits.shape)} and loss_mask {tuple(loss_mask.shape)}"
        )
    if chunk_size is not None:
        check_range("chunk_size", chunk_size, 1)
    seq_len = reference_logits.shape[1]
    step = max(seq_len, 1) if chunk_size is None else chunk_size
    needs_grad = torch.is_grad_enabled() and (
        policy_logits.requires_grad or reference_logits.requires_grad
    )
    total = None
    for start in range(0, max(seq_len, 1), step):
        chunk = (
            reference_logits[:, start : start + step],
            policy_logits[:, start : start + step],
            loss_mask[:, start : start + step],
        )
        if needs_grad:
            part = checkpoint(_chunk_kl, *chunk, use_reentrant=False)
        else:
            part = _chunk_kl(*chunk)
        total = part if total is None else total + part  # (B,)
    return total
