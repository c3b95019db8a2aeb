"""Scoring a Hugging Face causal LM: the completion log-probs of each sequence, memory-lean.

:class:`CompletionScorer` runs the decoder, keeps the M hidden states that predict completion
tokens and scores them with :func:`~dpokit.logprobs.kernels.chunked_token_logps`; a model whose
logits are not ``hidden @ W.T + b`` is scored by an exact, memory-hungry fallback instead of being
mis-scored. Packed rows (:mod:`dpokit.data.packing`) are scored per packed sequence.
"""

from __future__ import annotations

import contextlib
import inspect
import logging
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from dpokit.data.packing import packed_attention_masks
from dpokit.logprobs.kernels import SoftmaxWorkspace, chunked_token_logps, sum_per_row
from dpokit.logprobs.passes import row_groups, rows_prefix

logger = logging.getLogger(__name__)

__all__ = [
    "SCORER_KEYS",
    "CompletionScorer",
    "ScoreOutput",
    "scorer_kwargs",
]


@dataclass
class ScoreOutput:
    """What :class:`CompletionScorer` returns. M is the number of scored completion tokens.

    Only the first three fields are required, so other sources of sequence log-probs (e.g. a
    pre-computed reference) can build one; :class:`CompletionScorer` fills in every field except
    the return_hidden ones.
    """

    logps: Tensor  # (N,) fp32: sum of completion-token log-probs per sequence
    token_counts: Tensor  # (N,) long: completion tokens per sequence
    avg_logps: Tensor  # (N,) logps / token_counts (0 for a sequence without completion tokens)
    completion_hidden: Tensor | None = None  # (M, H) fast path, return_hidden=True
    row_index: Tensor | None = None  # (M,) long: the sequence each scored token belongs to
    token_logps: Tensor | None = None  # (M,) per-token log-probs, row-major (sequence, position)
    completion_logprobs: Tensor | None = None  # (M, V) fp32 log-probs, exact path, return_hidden
    # (M,) fp32 log sum_v p_v**2 at each scored position, no grad (return_log_sum_sq; WPO)
    token_log_sum_sq: Tensor | None = None


# Config fields that make a model's logits differ from hidden @ W.T + b.
_LOGIT_TRANSFORMS = (
    "final_logit_softcapping",  # Gemma2/3: tanh(z / c) * c
    "logits_soft_cap",  # RecurrentGemma
    "logit_scale",  # Cohere: z * s
    "logits_scaling",  # Granite: z / s
)

_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        logger.warning(message)


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside a peft wrapper (or the model itself)."""
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def _head_problem(head: nn.Module | None) -> str | None:
    """Why ``head`` might not compute ``x @ weight.T + bias``, or None.

    Accepted: an nn.Linear, or peft's modules_to_save wrapper of one (its ``.weight`` is the
    active copy, or the original inside ``disable_adapter()``). Rejected: a LoRA-wrapped or
    quantised head, hooks (accelerate's offloading moves or materialises weights in them).
    """
    inner = getattr(head, "original_module", head)  # peft ModulesToSaveWrapper
    if type(inner) is not nn.Linear:
        return f"the LM head ({type(head).__module__}.{type(head).__qualname__}) is not nn.Linear"
    for module in {head, inner}:
        if module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"):
            return "the LM head has forward hooks"
    if inner.weight.device.type == "meta":
        return "the LM head weight is offloaded (meta device)"
    return None


def _fast_path_blocker(model: nn.Module) -> str | None:
    """Why ``decoder(...) @ W.T + b`` would not reproduce ``model``'s logits, or None."""
    config = getattr(model, "config", None)
    configs = [config]
    if config is not None and hasattr(config, "get_text_config"):
        configs.append(config.get_text_config())
    for cfg in configs:
        for name in _LOGIT_TRANSFORMS:
            value = getattr(cfg, name, None)
            if value is not None and value != 1:
                return f"config.{name}={value!r} transforms the logits"
    try:
        decoder = model.get_decoder()
    except Exception as err:  # any failure means there is no usable decoder
        return f"get_decoder() failed ({err})"
    # transformers' get_decoder() falls back to returning the model itself.
    if not isinstance(decoder, nn.Module) or decoder in (model, _unwrap(model)):
        return "get_decoder() did not return a separate decoder"
    if getattr(decoder, "lm_head", None) is not None:
        return "get_decoder() returned a module with an LM head"
    return _head_problem(model.get_output_embeddings())


def _checkpointing(model: nn.Module) -> bool:
    """True if any submodule of ``model`` has transformers' gradient checkpointing switched on."""
    return any(getattr(m, "gradient_checkpointing", False) is True for m in model.modules())


def _scored_positions(completion_mask: Tensor, attention_mask: Tensor | None) -> Tensor:
    """(N, T) completion mask -> (N, T-1) mask of the hidden positions that predict a token.

    The hidden state at t-1 predicts token t, so column p of the result is position p predicting
    token p+1. Completion tokens outside the attention mask (padding) are never scored.
    """
    mask = completion_mask.bool()
    if attention_mask is not None:
        mask = mask & attention_mask.bool()
    if mask[:, 0].any():
        raise ValueError(
            "completion_mask[:, 0] is set: no position predicts a sequence's first token"
        )
    return mask[:, 1:]


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Temporarily disable dropout, restoring every submodule's own mode afterwards."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in modes:
            m.training = training


class CompletionScorer(nn.Module):
    """Sums the log-probs of completion tokens under a Hugging Face causal LM, memory-lean.

        logps[n] = sum_{t : completion_mask[n, t]} log softmax(W h[n, t-1] + b)[input_ids[n, t]]

    The fast path runs ``model.get_decoder()`` (for a peft model this is the base transformer
    with its LoRA layers injected, so ``disable_adapter()`` still applies), gathers the M hidden
    states that predict completion tokens, and scores them with :func:`chunked_token_logps` using
    ``model.get_output_embeddings()``'s weight and bias; gradients reach the head through it.

    Packed rows (several sequences per row, :mod:`dpokit.data.packing`) are scored per sequence
    given ``sequence_ids`` and attention structure ``segment_ids``/``branch_ids``.

    A model whose logits are not ``h @ W.T + b`` (logit soft-capping or scaling in its config, no
    separate decoder, a non-Linear or hooked head) is scored by the exact path instead: the full
    model's logits at the completion positions only (via ``logits_to_keep`` when supported). With
    ``fast=None`` the fast path is also checked once against the exact path on one sequence.

    This is an nn.Module so the engine can wrap *it* with DDP/accelerate and the wrapper's
    forward hooks fire. ``.model`` is the wrapped model, for saving.

    Args:
        model: a transformers causal LM, or a peft model wrapping one.
        chunk_size: rows per LM-head chunk (extra memory O(chunk_size x V)).
        fast: None = choose automatically; True = require the fast path (raise if impossible, no
            numeric check); False = always use the exact path.
        saved_softmax_mb: fast path, with gradients: keep up to this many MB of completion-token
            softmax (fp32, 4 x V bytes per token) from forward for backward instead of
            recomputing those logits; 0 keeps none (the least memory). Held in a buffer reused
            across steps, unless the model has gradient checkpointing on: then the buffer is
            freed after each backward (:class:`~dpokit.logprobs.kernels.SoftmaxWorkspace`).
        pass_tokens: fast path: run the decoder over consecutive groups of rows of at most this
            many tokens each (a longer row alone), each cut after its last scored position,
            instead of all rows at once (None). The same log-probs; with gradient checkpointing
            the layer being recomputed in backward holds one group's activations
            (:mod:`dpokit.logprobs.passes`).

    Raises:
        ValueError: ``fast=True`` for a model the fast path cannot score; ``pass_tokens`` < 1.
    """

    # Scored positions the one-time fast-path check compares (_verify_fast_path).
    verify_positions = 64

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 1024,
        fast: bool | None = None,
        saved_softmax_mb: int = 0,
        pass_tokens: int | None = None,
    ):
        super().__init__()
        if pass_tokens is not None and pass_tokens < 1:
            raise ValueError(f"pass_tokens must be >= 1 or None, got {pass_tokens}")
        self.model = model
        self.chunk_size = chunk_size
        self.saved_softmax_mb = saved_softmax_mb
        self.pass_tokens = pass_tokens
        # Gradient checkpointing says memory is short: then the softmax buffer is not kept.
        self._workspace = SoftmaxWorkspace(keep=not _checkpointing(model))
        blocker = _fast_path_blocker(model)
        if fast and blocker is not None:
            raise ValueError(f"fast=True but the fast path cannot score this model: {blocker}")
        self.fast = blocker is None if fast is None else fast
        self._verified = fast is not None  # only auto mode checks the fast path numerically
        if fast is None and blocker is not None:
            self._use_exact_path(blocker)
        self._takes_logits_to_keep = (
            "logits_to_keep" in inspect.signature(_unwrap(model).forward).parameters
        )

    def _use_exact_path(self, reason: str) -> None:
        self.fast = False
        name = type(_unwrap(self.model)).__name__
        _warn_once(
            f"dpokit: scoring {name} with full logits (exact but not memory-lean): {reason}."
        )

    @property
    def head(self) -> nn.Module:
        """The LM head (weight (V, H), optional bias (V,)) the fast path projects with."""
        return self.model.get_output_embeddings()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Tensor | None,
        completion_mask: Tensor,
        position_ids: Tensor | None = None,
        return_hidden: bool = False,
        sequence_ids: Tensor | None = None,
        segment_ids: Tensor | None = None,
        branch_ids: Tensor | None = None,
        return_log_sum_sq: bool = False,
    ) -> ScoreOutput:
        """Score the completion tokens of each row, or of each sequence packed in the rows.

        Args:
            input_ids, attention_mask: (R, T), usually right-padded; attention_mask is 1 on real
                tokens.
            completion_mask: (R, T) bool, True on the completion tokens to score.
            position_ids: optional (R, T), passed to the model (required for packed rows).
            return_hidden: also return the gathered hidden states (M, H) (or, on the exact path,
                log-probs (M, V)) for :func:`dpokit.logprobs.sequence_kl_from_hidden`.
            sequence_ids: packed rows (:mod:`dpokit.data.packing`): (R, T) long, the output
                sequence each completion token is scored into; the output then has one entry per
                sequence (max id + 1) instead of one per row.
            segment_ids, branch_ids: packed rows: (R, T) long, who attends to whom (see
                :func:`dpokit.data.packing.packed_attention_mask`); attention_mask then only marks
                real tokens.
            return_log_sum_sq: also return ``token_log_sum_sq`` (M,), ``log sum_v p_v**2`` of the
                policy's distribution at each scored position (WPO), without gradient.
        """
        scored = _scored_positions(completion_mask, attention_mask)  # (R, T-1)
        targets = input_ids[:, 1:][scored]  # (M,)
        if sequence_ids is None:
            row_index = scored.nonzero()[:, 0]  # (M,)
            n_out = scored.shape[0]
        else:
            row_index = sequence_ids[:, 1:][scored]  # (M,)
            if (row_index < 0).any():
                raise ValueError("a scored completion token has no sequence id (sequence_ids < 0)")
            n_out = int(row_index.max()) + 1 if len(row_index) else 0
        model_kwargs = self._model_kwargs(attention_mask, position_ids, segment_ids, branch_ids)
        if self.fast and not self._verified:
            self._verify_fast_path(input_ids, scored, model_kwargs)
        if self.fast:
            hidden = self._completion_hidden(input_ids, scored, model_kwargs)
            head = self.head
            token_logps = chunked_token_logps(
                hidden,
                head.weight,
                targets,
                getattr(head, "bias", None),
                self.chunk_size,
                save_rows=self._save_rows(head.weight) if torch.is_grad_enabled() else 0,
                workspace=self._workspace,
                return_log_sum_sq=return_log_sum_sq,
            )
            if return_log_sum_sq:
                token_logps, log_sum_sq = token_logps
            extra = {"completion_hidden": hidden if return_hidden else None}
        else:
            logits = self._completion_logits(input_ids, scored, model_kwargs)
            logprobs = logits.float().log_softmax(dim=-1)  # (M, V)
            token_logps = logprobs.gather(1, targets[:, None]).squeeze(1)  # (M,)
            if return_log_sum_sq:
                log_sum_sq = torch.logsumexp(2.0 * logprobs.detach(), dim=-1)  # (M,)
            extra = {"completion_logprobs": logprobs if return_hidden else None}
        logps = sum_per_row(token_logps, row_index, n_out)  # (N,)
        counts = torch.bincount(row_index, minlength=n_out)  # (N,)
        return ScoreOutput(
            logps=logps,
            token_counts=counts,
            avg_logps=logps / counts.clamp(min=1),
            token_logps=token_logps,
            row_index=row_index,
            token_log_sum_sq=log_sum_sq if return_log_sum_sq else None,
            **extra,
        )

    def _save_rows(self, weight: Tensor) -> int:
        """Completion tokens whose softmax fits in ``saved_softmax_mb`` (fp32, V per token)."""
        return (self.saved_softmax_mb << 20) // (4 * weight.shape[0])

    def _model_kwargs(self, attention_mask, position_ids, segment_ids, branch_ids) -> dict:
        """attention_mask / position_ids for the model: the 2D mask as is, or for packed rows a
        (R, 1, T, T) mask built here (sdpa: bool, eager: additive), or position ids alone
        (flash-attention's varlen kernels find the sequence boundaries from them)."""
        if segment_ids is None:
            if position_ids is None and _right_padded(attention_mask):
                # Padding only after each row's tokens: causal attention alone already keeps every
                # real token from seeing it, so let the model run its causal kernel (SDPA skips
                # the upper triangle and builds no (N, 1, T, T) mask). Padding positions attend to
                # real tokens then, but are never scored.
                attention_mask = None
            return {"attention_mask": attention_mask, "position_ids": position_ids}
        if position_ids is None:
            raise ValueError("packed rows need position_ids")
        implementation = getattr(_unwrap(self.model).config, "_attn_implementation", None) or ""
        if "flash" in implementation:
            if branch_ids is not None and bool((branch_ids != 0).any()):
                raise ValueError(
                    f"packing=shared_prompt needs a custom attention mask, which {implementation} "
                    "does not take; load the model with attn_implementation='sdpa' or use "
                    "packing=padding_free"
                )
            return {"attention_mask": None, "position_ids": position_ids}
        # (R, 1, T, T) bool, or {layer type: mask} when only some layers slide a window
        config = _unwrap(self.model).config
        mask = packed_attention_masks(config, segment_ids, branch_ids, position_ids)
        if implementation != "sdpa":  # eager and others add the mask to the scores
            dtype = next(self.model.parameters()).dtype
            mask = _additive(mask, dtype)
        return {"attention_mask": mask, "position_ids": position_ids}

    def _completion_hidden(self, input_ids, scored, model_kwargs) -> Tensor:
        """Fast path: decoder only, then the hidden states that predict completion tokens. (M, H)

        One decoder pass per group of rows (:func:`~dpokit.logprobs.passes.row_groups`); the
        groups' states are concatenated in row order, as one pass would give them.
        """
        decoder = self.model.get_decoder()
        total = input_ids.shape[0]
        parts = []
        for rows, cut in row_groups(scored, self.pass_tokens):
            kwargs = {k: rows_prefix(v, rows, cut, total) for k, v in model_kwargs.items()}
            out = decoder(input_ids=input_ids[rows, :cut], use_cache=False, **kwargs)
            hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
            parts.append(hidden[:, :-1][scored[rows, : cut - 1]])  # (n, cut, H) -> (m, H)
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    def _completion_logits(self, input_ids, scored, model_kwargs) -> Tensor:
        """Exact path: the full model's logits at the completion positions only. (M, V)"""
        seq_len = input_ids.shape[1]
        used = scored.any(dim=0).nonzero()  # columns (positions) that predict some completion
        first = int(used[0]) if len(used) else seq_len - 1
        keep = seq_len - first  # the last `keep` positions cover every scored one
        kwargs = {"logits_to_keep": keep} if self._takes_logits_to_keep else {}
        logits = self.model(input_ids=input_ids, use_cache=False, **model_kwargs, **kwargs).logits
        logits = logits[:, -keep:]  # (N, keep, V) whether or not logits_to_keep was honoured
        # Position p predicts token p+1; keep ends at position T-1, which predicts nothing.
        return logits[:, :-1][scored[:, first:]]  # (M, V) in the model's dtype

    @torch.no_grad()
    def _verify_fast_path(self, input_ids, scored, model_kwargs) -> None:
        """Once: compare fast and exact log-probs on the first ``verify_positions`` scored
        positions of one row; switch to exact if they differ.

        Catches logit transforms that no config field announces. Runs in eval mode (no dropout).
        Only the row's prefix up to those positions runs: under causal attention its hidden
        states are those of the whole row, and the exact path's (positions, V) logits stay small
        (a whole row of 4k tokens would be 2.5 GB of fp32 logits with a 152k vocabulary).
        """
        hits = scored.any(dim=1).nonzero()
        if len(hits) == 0:
            return
        row = int(hits[0])
        positions = scored[row].nonzero()[:, 0]
        # Position p predicts token p+1: the prefix needs tokens 0..p+1.
        cut = int(positions[min(len(positions), self.verify_positions) - 1]) + 2
        rows = slice(row, row + 1)
        total = scored.shape[0]
        args = (
            input_ids[rows, :cut],
            scored[rows, : cut - 1],
            {k: rows_prefix(v, rows, cut, total) for k, v in model_kwargs.items()},
        )
        targets = args[0][:, 1:][args[1]]
        with _eval_mode(self.model):
            head = self.head
            hidden = self._completion_hidden(*args)
            fast = chunked_token_logps(hidden, head.weight, targets, getattr(head, "bias", None))
            logits = self._completion_logits(*args)  # (M, V)
        exact = logits.float().log_softmax(dim=-1).gather(1, targets[:, None]).squeeze(1)
        # The exact path rounds its logits to the model's dtype (or TF32, ~2^-10): each log-prob
        # may be off by about eps * max|logit|. Twice that, plus 1e-3, is noise, not a transform.
        eps = max(torch.finfo(logits.dtype).eps, 2.0**-10)
        tol = 1e-3 + 2 * eps * logits.abs().max().item()
        error = (fast - exact).abs().max().item()
        self._verified = True
        if error > tol:
            reason = f"its logits are not decoder @ W.T + b (max |diff| {error:.3g} > {tol:.3g})"
            self._use_exact_path(reason)


def _additive(mask, dtype: torch.dtype):
    """A bool mask (or dict of them) -> 0 where True, the dtype's minimum where False."""
    if isinstance(mask, dict):
        return {kind: _additive(m, dtype) for kind, m in mask.items()}
    additive = torch.zeros(mask.shape, dtype=dtype, device=mask.device)
    return additive.masked_fill_(~mask, torch.finfo(dtype).min)


def _right_padded(attention_mask: Tensor | None) -> bool:
    """True if every row of a 2D mask is ones followed by zeros (or has no padding at all)."""
    if attention_mask is None or attention_mask.dim() != 2:
        return False
    mask = attention_mask.bool()
    return bool((mask[:, 1:] <= mask[:, :-1]).all())


SCORER_KEYS = ("position_ids", "sequence_ids", "segment_ids", "branch_ids")


def scorer_kwargs(batch: dict[str, Tensor]) -> dict[str, Tensor]:
    """The optional layout arguments of :class:`CompletionScorer` (``position_ids`` and the
    packed-row keys of :mod:`dpokit.data.packing`) that a collated batch carries."""
    return {key: batch[key] for key in SCORER_KEYS if batch.get(key) is not None}
