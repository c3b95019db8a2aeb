"""Per-sequence completion log-probabilities without materialising (N, T, V) logits.

Every DPO-family loss needs, for each sequence, the summed log-probability of its completion

    log pi(y | x) = sum_{t in completion} log softmax(W h_{t-1} + b)[y_t]

The naive way runs the full model, gets logits (N, T, V) and log-softmaxes them: with V = 128k and
T = 2k that is 8 GiB of fp32 per 8 rows, and as much again for its gradient. Instead we

1. run only the decoder (the transformer without its LM head) to get hidden states (N, T, H);
2. keep the M hidden states that predict a completion token (the state at t-1 predicts token t);
3. project those through the LM head in chunks of rows, with a custom autograd Function that
   recomputes each chunk's logits in backward instead of saving them.

Extra memory is then O(chunk_size x V), and logits are always computed in fp32 (fp64 for fp64
inputs). Models whose logits are not ``hidden @ W.T + b`` (Gemma2's soft-capping, Cohere's
``logit_scale``...) are scored by an exact, memory-hungry fallback instead of being mis-scored.

Modules: :mod:`~dpokit.logprobs.kernels` (the autograd Functions of step 3),
:mod:`~dpokit.logprobs.scorer` (steps 1-2 and the exact fallback, :class:`CompletionScorer`) and
:mod:`~dpokit.logprobs.sequence_kl` (TDPO's per-sequence KL), :mod:`~dpokit.logprobs.passes`
(decoder passes over groups of rows) and :mod:`~dpokit.logprobs.naive` (the full-logits value
tests check against). The attention mask of packed rows
lives with the packing code, :func:`dpokit.data.packing.packed_attention_mask`.
"""

from dpokit.data.packing import packed_attention_mask
from dpokit.logprobs.kernels import SoftmaxWorkspace, chunked_token_kl, chunked_token_logps
from dpokit.logprobs.naive import full_logits_logps
from dpokit.logprobs.scorer import (
    SCORER_KEYS,
    CompletionScorer,
    ScoreOutput,
    scorer_kwargs,
)
from dpokit.logprobs.sequence_kl import sequence_kl_from_hidden

__all__ = [
    "SCORER_KEYS",
    "CompletionScorer",
    "SoftmaxWorkspace",
    "ScoreOutput",
    "chunked_token_kl",
    "chunked_token_logps",
    "full_logits_logps",
    "packed_attention_mask",
    "scorer_kwargs",
    "sequence_kl_from_hidden",
]
