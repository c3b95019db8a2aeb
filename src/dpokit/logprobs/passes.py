"""Decoder passes over groups of rows, each cut after the last position it scores.

:class:`~dpokit.logprobs.CompletionScorer` runs the decoder once per group instead of once over
the whole batch when the batch holds more than ``pass_tokens`` tokens. Under causal attention a
row's hidden states do not depend on other rows, nor on positions after the ones it needs, so the
log-probs are the same. With gradient checkpointing the gain is memory: autograd finishes the
backward of the group built last before it starts the one before it, so the layer being
recomputed holds one group's activations (MLP intermediates of ``tokens x intermediate_size``),
not the whole batch's.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["row_groups", "rows_prefix"]


def row_groups(scored: Tensor, pass_tokens: int | None) -> list[tuple[slice, int]]:
    """Consecutive groups of rows for the decoder, each as ``(rows, cut)``.

    Args:
        scored: (R, T-1) bool, True at the positions whose hidden state predicts a scored token
            (position p predicts token p+1).
        pass_tokens: the most tokens (rows x cut) a group may hold; a row longer than that runs
            alone. None: one group of all rows, uncut.

    Returns:
        ``[(rows, cut), ...]`` in row order: the rows (a slice) and the positions they need,
        0..cut-1, where cut - 2 is the last scored column of any of them. A row that scores
        nothing needs one position.
    """
    total, columns = scored.shape
    if pass_tokens is None or total * (columns + 1) <= pass_tokens:
        return [(slice(0, total), columns + 1)]
    hits = scored.any(dim=1)
    last = (columns - 1 - scored.flip(1).int().argmax(dim=1)).where(hits, -1)  # (R,)
    needed = [int(x) + 2 for x in last.tolist()]
    groups, start, width = [], 0, 0
    for row, need in enumerate(needed):
        wider = max(width, need)
        if row > start and (row - start + 1) * wider > pass_tokens:
            groups.append((slice(start, row), width))
            start, wider = row, need
        width = wider
    groups.append((slice(start, total), width))
    return groups


def rows_prefix(t, rows: slice, cut: int, total: int):
    """``rows`` and their first ``cut`` positions of one model input of a batch of ``total``
    rows: (R, T) position ids or 2D mask -> (n, cut); (R, 1, T, T) mask -> (n, 1, cut, cut); a
    ``{layer type: mask}`` dict entry by entry; None or anything not batched as is."""
    if isinstance(t, dict):
        return {kind: rows_prefix(m, rows, cut, total) for kind, m in t.items()}
    if not isinstance(t, Tensor) or t.dim() not in (2, 4) or t.shape[0] != total:
        return t
    t = t[rows]
    return t[:, :cut] if t.dim() == 2 else t[:, :, :cut, :cut]
