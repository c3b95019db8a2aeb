"""LD-DPO: length-desensitised sequence log-probs (Liu et al., 2024, arXiv:2409.06411).

LD-DPO changes no loss: it changes how a pair's per-token log-probs are summed. Within a pair, the
first ``min(|y_w|, |y_l|)`` completion tokens of each answer (the shared length) count fully and
the "verbose" tail beyond it is weighted by ``alpha``. The result feeds DPO (or any pairwise loss)
in place of the plain sums, for the policy and the reference alike.
"""

from __future__ import annotations

import torch
from torch import Tensor

from dpokit.losses.base import check_range


def _check_token_tensors(name: str, token_logps: Tensor, mask: Tensor) -> None:
    if token_logps.dim() != 2 or token_logps.shape != mask.shape:
        raise ValueError(
            f"{name}: token log-probs and mask must both be (B, T); got "
            f"{tuple(token_logps.shape)} and {tuple(mask.shape)}"
        )


def ld_token_weights(
    chosen_mask: Tensor,
    rejected_mask: Tensor,
    *,
    alpha: float,
    dtype: torch.dtype | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-token weights of LD-DPO: 1 on the shared length, ``alpha`` beyond, 0 off the mask.

    Args:
        chosen_mask: ``(B, Tw)`` bool or 0/1, true on y_w's completion tokens (prompt and padding
            false; the tokens need not start at position 0).
        rejected_mask: ``(B, Tl)`` same for y_l; ``Tl`` may differ from ``Tw``.
        alpha: weight of the tail, in [0, 1]; 1 gives plain sums, 0 drops the tail.
        dtype: float dtype of the weights (default: torch's default dtype). Pass the log-probs'
            dtype: an fp32 ``alpha`` would cost fp64 log-probs their precision.

    Returns:
        ``(chosen_weights (B, Tw), rejected_weights (B, Tl))`` of ``dtype``: the
        k-th completion token of an answer (k = 1, 2, ... counted along the mask) gets 1 when
        ``k <= min(|y_w|, |y_l|)`` and ``alpha`` otherwise.

    Raises:
        ValueError: ``alpha`` outside [0, 1]; masks not 2-D or of different batch sizes.
    """
    check_range("alpha", alpha, 0.0, 1.0)
    if chosen_mask.dim() != 2 or rejected_mask.dim() != 2 or len(chosen_mask) != len(rejected_mask):
        raise ValueError(
            "chosen_mask and rejected_mask must be (B, T) with the same B; got "
            f"{tuple(chosen_mask.shape)} and {tuple(rejected_mask.shape)}"
        )
    dtype = dtype or torch.get_default_dtype()
    chosen_on, rejected_on = chosen_mask.bool(), rejected_mask.bool()
    shared = torch.minimum(chosen_on.sum(dim=1), rejected_on.sum(dim=1))  # (B,) shared length

    def weights(on: Tensor) -> Tensor:
        position = on.long().cumsum(dim=1)  # (B, T) 1-based index among completion tokens
        head = position <= shared[:, None]  # (B, T) bool
        # 1 on the shared length, alpha beyond; built in dtype (alpha must not round to fp32)
        weight = head.to(dtype) + alpha * (~head).to(dtype)
        return weight * on.to(dtype)

    return weights(chosen_on), weights(rejected_on)


def ld_sequence_logps(
    chosen_token_logps: Tensor,
    chosen_mask: Tensor,
    rejected_token_logps: Tensor,
    rejected_mask: Tensor,
    *,
    alpha: float,
) -> tuple[Tensor, Tensor]:
    """LD-DPO sequence log-probs of a batch of pairs, from per-token log-probs.

    Equation (l_w = |y_w|, l_p = min(l_w, l_l), token index k counted along the mask)::

        logp_ld(y_w) = sum_{k <= l_p} log p(y_w,k) + alpha * sum_{k > l_p} log p(y_w,k)

    and the same for y_l (only the longer answer has a tail).

    Args:
        chosen_token_logps: ``(B, Tw)`` per-token log-probs of y_w (one model: call once for the
            policy and once for the reference, with the same masks). Values off the mask are
            ignored, NaN included.
        chosen_mask: ``(B, Tw)`` completion-token mask of y_w.
        rejected_token_logps, rejected_mask: ``(B, Tl)`` the same for y_l.
        alpha: in [0, 1] (TRL ``ld_alpha``; TRL's default ``None`` means no weighting, i.e. 1).

    Returns:
        ``(chosen (B,), rejected (B,))`` weighted sums, differentiable, in the log-probs' dtype;
        pass them to :func:`~dpokit.losses.dpo.dpo_loss` where plain sums would go.

    Raises:
        ValueError: ``alpha`` outside [0, 1]; a log-prob tensor and its mask of different shapes.

    Source: Liu et al. 2024, Length Desensitization in Direct Preference Optimization,
    arXiv:2409.06411 (the likelihood split into a shared-length part and a verbose part scaled
    by alpha; TRL ``ld_alpha``, computed the same way in ``DPOTrainer._compute_loss``).

    Traps: the shared length is per PAIR, so chosen and rejected must be reduced together, and the
    reference with the same weights -- a pre-computed reference cache is only valid for the
    ``alpha`` it was computed with. ``alpha=1`` is plain DPO; at policy == reference DPO on these
    sums still starts at ln 2.
    """
    _check_token_tensors("chosen", chosen_token_logps, chosen_mask)
    _check_token_tensors("rejected", rejected_token_logps, rejected_mask)
    chosen_weights, rejected_weights = ld_token_weights(
        chosen_mask, rejected_mask, alpha=alpha, dtype=chosen_token_logps.dtype
    )

    def weighted_sum(token_logps: Tensor, weights: Tensor) -> Tensor:
        # where(), not a product: 0 * NaN at padding would still be NaN.
        values = token_logps.where(weights > 0, token_logps.new_zeros(()))
        return (values * weights.to(token_logps.dtype)).sum(dim=1)

    return (
        weighted_sum(chosen_token_logps, chosen_weights),
        weighted_sum(rejected_token_logps, rejected_weights),
    )


def ld_flat_weights(row_index: Tensor, pairs: int, alpha: float, dtype: torch.dtype) -> Tensor:
    """LD-DPO's per-token weights in the scorer's flat layout (see :func:`ld_token_weights`).

    Args:
        row_index: ``(M,)`` long: the sequence each scored token belongs to, in ``[0, 2B)``;
            sequences ``0..B-1`` are the chosen answers, ``B..2B-1`` the rejected ones of the same
            pairs, and each sequence's tokens appear in order (the layout of
            ``dpokit.logprobs.ScoreOutput``, row-major; sequences may interleave).
        pairs: B.
        alpha: tail weight in [0, 1].
        dtype: float dtype of the weights (the token log-probs').

    Returns:
        ``(M,)`` weights: 1 for a token whose 1-based index k in its sequence is
        ``<= min(|y_w|, |y_l|)`` of its pair, ``alpha`` beyond.

    Raises:
        ValueError: ``alpha`` outside [0, 1]; a row index outside ``[0, 2B)``.
    """
    check_range("alpha", alpha, 0.0, 1.0)
    n = 2 * pairs
    if len(row_index) and (int(row_index.min()) < 0 or int(row_index.max()) >= n):
        raise ValueError(f"row_index must lie in [0, {n}) for {pairs} pairs")
    counts = torch.bincount(row_index, minlength=n)  # (2B,) completion tokens per sequence
    starts = counts.cumsum(0) - counts  # (2B,) where each sequence begins once sorted
    order = torch.argsort(row_index, stable=True)  # keeps each sequence's token order
    sorted_rows = row_index[order]
    position = torch.empty_like(row_index)
    position[order] = torch.arange(len(row_index), device=row_index.device) - starts[sorted_rows]
    shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)  # (2B,)
    head = position < shared[row_index]  # 0-based position: k <= l_p
    return head.to(dtype) + alpha * (~head).to(dtype)
