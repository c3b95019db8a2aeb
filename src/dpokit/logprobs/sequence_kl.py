"""TDPO's sequence KL from two :class:`~dpokit.logprobs.scorer.ScoreOutput` of one batch."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dpokit.logprobs.kernels import chunked_token_kl, sum_per_row
from dpokit.logprobs.scorer import ScoreOutput

__all__ = ["sequence_kl_from_hidden"]


def sequence_kl_from_hidden(
    policy: ScoreOutput,
    reference: ScoreOutput,
    policy_head: nn.Module | None,
    reference_head: nn.Module | None,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-sequence KL(pi_ref || pi_theta) summed over completion tokens (TDPO's sequence KL).

        KL[n] = sum_{t in completion(n)} sum_v p_ref(v | t) (log p_ref(v | t) - log p_pol(v | t))

    Both outputs must come from ``CompletionScorer(..., return_hidden=True)`` on the same batch.
    On the fast path the heads are used with :func:`chunked_token_kl`; on the exact path the
    stored log-probs are used and the heads may be None. Gradient flows to the policy only.

    Returns:
        (N,) fp32.
    """
    if policy.row_index is None or reference.row_index is None:
        raise ValueError("sequence_kl_from_hidden needs outputs of CompletionScorer")
    if policy.row_index.shape != reference.row_index.shape:
        raise ValueError("policy and reference were scored on different completion positions")
    if policy.completion_hidden is not None and reference.completion_hidden is not None:
        kl = chunked_token_kl(
            policy.completion_hidden,
            policy_head.weight,
            reference.completion_hidden,
            reference_head.weight,
            policy_bias=getattr(policy_head, "bias", None),
            reference_bias=getattr(reference_head, "bias", None),
            chunk_size=chunk_size,
        )
    elif policy.completion_logprobs is not None and reference.completion_logprobs is not None:
        logp_pol, logp_ref = policy.completion_logprobs, reference.completion_logprobs.detach()
        p_ref = logp_ref.exp()
        kl = torch.where(p_ref > 0, p_ref * (logp_ref - logp_pol), 0.0).sum(dim=-1)
    else:
        raise ValueError(
            "sequence_kl_from_hidden needs both outputs from return_hidden=True on the same path "
            "(both fast or both exact)"
        )
    return sum_per_row(kl, policy.row_index, policy.logps.shape[0])
