"""Decoder MLPs run over chunks of positions, each chunk recomputed on its own in backward.

With gradient checkpointing a decoder layer is recomputed in backward, and the recompute holds
that layer's activations for the whole row. The MLP's are the big ones: gate, up, their product
and the activation, each (tokens x intermediate_size): 4 x 4864 x 4 bytes = 76 KB per token for
Qwen2.5-0.5B in fp32, 630 MB for one 8k-token row, against 3.5 KB per token for the attention's
(SDPA keeps O(tokens) state). An MLP maps each position on its own, so it can run over chunks of
positions: :func:`chunk_mlps` makes every decoder layer's MLP do so under
``torch.utils.checkpoint`` (non-reentrant, which nests inside the layer's own checkpoint), so
backward recomputes one chunk's intermediates at a time. The price is one more MLP forward per
step (about a sixth more decoder compute for a model whose FLOPs are mostly MLP), paid only by
rows longer than a chunk. The same idea as the tiled MLP of Arctic Long Sequence Training
(Bekman et al., 2025, "Arctic Long Sequence Training", section 3.2).
"""

from __future__ import annotations

import logging
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from dpokit.distributed import no_split_modules

logger = logging.getLogger(__name__)

__all__ = ["chunk_mlps", "chunked_forward"]


def chunked_forward(forward, chunk_tokens: int, hidden_states: Tensor, *args, **kwargs):
    """``forward(hidden_states)`` of a position-wise module over chunks of at most
    ``chunk_tokens`` positions along dim 1 of (B, T, H) ``hidden_states``, each under a
    non-reentrant checkpoint while gradients are on. Output (B, T, H), as one call would give.
    Short inputs, extra arguments and inference run ``forward`` once, unchanged."""
    if (
        args
        or kwargs
        or not torch.is_grad_enabled()
        or hidden_states.dim() != 3
        or hidden_states.shape[1] <= chunk_tokens
    ):
        return forward(hidden_states, *args, **kwargs)
    parts = [
        checkpoint(_contiguous_forward, forward, piece, use_reentrant=False)
        for piece in hidden_states.split(chunk_tokens, dim=1)
    ]
    return torch.cat(parts, dim=1)  # (B, T, H)


def _contiguous_forward(forward, piece: Tensor) -> Tensor:
    # A chunk of several rows is a strided view, which some MLPs cannot .view() (GPT-2's
    # Conv1D); copied here, inside the checkpoint, the copy is not what is kept for backward.
    return forward(piece.contiguous())


def chunk_mlps(model: nn.Module, chunk_tokens: int) -> int:
    """Make each decoder layer's MLP run over chunks of ``chunk_tokens`` positions, recomputed
    chunk by chunk in backward (:func:`chunked_forward`). Only modules whose class name ends
    in ``MLP`` (transformers' position-wise feed-forward blocks: ``LlamaMLP``, ``Qwen2MLP``,
    ``GPT2MLP``, ...) are changed, by an instance ``forward``: weights, state dict and
    ``save_pretrained`` are untouched. Mixture-of-experts blocks (which return router logits
    too) are left as they are. Returns how many MLPs were changed.

    Raises:
        ValueError: ``chunk_tokens`` < 1.
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    layer_names = set(no_split_modules(model) or ())  # the decoder layers' classes
    changed = 0
    for layer in (m for m in model.modules() if type(m).__name__ in layer_names):
        mlp = getattr(layer, "mlp", None)
        if isinstance(mlp, nn.Module) and type(mlp).__name__.endswith("MLP"):
            mlp.forward = partial(chunked_forward, type(mlp).forward.__get__(mlp), chunk_tokens)
            changed += 1
    if changed:
        logger.info("MLPs of %d layers run over chunks of %d positions", changed, chunk_tokens)
    return changed
