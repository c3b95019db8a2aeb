"""The naive completion log-probs, through the model's full (N, T, V) logits: the independent
value tests and benchmarks check :class:`~dpokit.logprobs.CompletionScorer` against."""

from __future__ import annotations

from torch import Tensor, nn

__all__ = ["full_logits_logps"]


def full_logits_logps(
    model: nn.Module,
    input_ids: Tensor,
    attention_mask: Tensor | None,
    completion_mask: Tensor,
    position_ids: Tensor | None = None,
) -> Tensor:
    """The naive reference: full (N, T, V) logits, log_softmax, gather, masked sum. (N,) fp32.

    Used by tests and benchmarks to check :class:`CompletionScorer`; do not train with it.
    """
    logits = model(
        input_ids=input_ids,
        attention_mask=attention_mask,
        position_ids=position_ids,
        use_cache=False,
    ).logits  # (N, T, V)
    logp = logits[:, :-1].float().log_softmax(dim=-1)  # (N, T-1, V): position t predicts t+1
    token_logp = logp.gather(2, input_ids[:, 1:, None]).squeeze(2)  # (N, T-1)
    mask = completion_mask[:, 1:].bool()
    return token_logp.masked_fill(~mask, 0.0).sum(dim=1)
