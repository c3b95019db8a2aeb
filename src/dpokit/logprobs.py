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
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import weakref
from dataclasses import dataclass

import torch
from torch import Tensor, nn

logger = logging.getLogger(__name__)

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

# --------------------------------------------------------------------------------------------------
# Chunked LM-head kernels


def _compute_dtype(*tensors: Tensor | None) -> torch.dtype:
    """fp32, or fp64 when any input is fp64 (so that gradcheck can run in double precision)."""
    if any(t is not None and t.dtype == torch.float64 for t in tensors):
        return torch.float64
    return torch.float32


def _row_chunks(n: int, chunk_size: int):
    for start in range(0, n, chunk_size):
        yield slice(start, min(start + chunk_size, n))


def _vocab_slices(weight: Tensor, rows: int, dtype: torch.dtype) -> list[slice]:
    """Slices of the vocabulary in which to upcast ``weight`` (V, H).

    Upcasting the whole head of a bf16 model would cost 4VH bytes (2 GiB for Llama-3-8B); slices
    of at most rows*V/H vocabulary entries keep each fp32 copy no larger than the (rows, V) logits
    it feeds. A head already in ``dtype`` needs no copy and is used whole.
    """
    vocab, hidden = weight.shape
    if weight.dtype == dtype:
        return [slice(0, vocab)]
    step = max(1, rows * vocab // hidden)
    return [slice(start, min(start + step, vocab)) for start in range(0, vocab, step)]


def _chunk_logits(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    dtype: torch.dtype,
    out: Tensor | None = None,
) -> Tensor:
    """logits = hidden @ weight.T + bias, computed in ``dtype`` (into ``out``). (C, H) -> (C, V)"""
    h = hidden.to(dtype)  # (C, H)
    slices = _vocab_slices(weight, h.shape[0], dtype)
    if len(slices) == 1:
        logits = torch.mm(h, weight.to(dtype).T, out=out)  # (C, V)
    else:
        logits = h.new_empty(h.shape[0], weight.shape[0]) if out is None else out  # (C, V)
        for s in slices:
            logits[:, s] = h @ weight[s].to(dtype).T
    if bias is not None:
        logits += bias.to(dtype)
    return logits


def _chunk_backward(
    grad_logits: Tensor, hidden: Tensor, weight: Tensor, grad_weight: Tensor | None
) -> Tensor:
    """Backprop grad_logits (C, V) through logits = hidden @ W.T; returns grad_hidden (C, H).

    grad_hidden = grad_logits @ W, and grad_weight += grad_logits.T @ hidden in place.
    """
    dtype = grad_logits.dtype
    h = hidden.to(dtype)  # (C, H)
    grad_hidden = h.new_zeros(h.shape)  # (C, H)
    for s in _vocab_slices(weight, h.shape[0], dtype):
        g = grad_logits[:, s]  # (C, S)
        grad_hidden.addmm_(g, weight[s].to(dtype))  # accumulate in place, no product temporary
        if grad_weight is not None:
            grad_weight[s].addmm_(g.T, h)
    return grad_hidden


def _no_autocast(device: torch.device):
    # Under autocast the matmuls would silently run in bf16: the whole point is fp32 logits.
    return torch.autocast(device_type=device.type, enabled=False)


def _cast_grad(grad: Tensor | None, like: Tensor | None, needed: bool) -> Tensor | None:
    return grad.to(like.dtype) if needed and grad is not None else None


def _softmax_stats_(logits: Tensor, targets: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """In place: logits (C, V) -> exp(logits - max). Returns (target logit, max, sum of exp), (C,).

    One (C, V) buffer instead of logsumexp's extra temporary; lse = max + log(sum).
    """
    target_logits = logits.gather(1, targets[:, None]).squeeze(1)  # (C,)
    row_max = logits.amax(dim=1)  # (C,)
    # As in torch.logsumexp: a row whose max is +-inf is shifted by 0, not by inf (inf - inf = NaN).
    row_max = torch.where(torch.isfinite(row_max), row_max, torch.zeros_like(row_max))
    sums = logits.sub_(row_max[:, None]).exp_().sum(dim=1)  # (C,)
    return target_logits, row_max, sums


class SoftmaxWorkspace:
    """A (rows, V) buffer kept across steps for the exps that the LM-head kernel saves.

    On CPU every fresh allocation of this size is page-faulted in (the kernel zero-fills each
    page) on every step, which costs a fifth of the head's forward matmul; a kept buffer does
    not. One graph holds it at a time: taken in forward, given back in backward, or when the
    graph that took it is freed unused. A forward while it is held gets fresh memory instead.
    """

    def __init__(self) -> None:
        self._buffer: Tensor | None = None
        self._holder = None  # weakref to the token of the graph that holds the buffer

    def take(self, rows: int, vocab: int, dtype: torch.dtype, device: torch.device):
        """(a (rows, vocab) buffer, a token to hand back), or (None, None) if it is in use."""
        if self._holder is not None and self._holder() is not None:
            return None, None
        buffer = self._buffer
        fits = (
            buffer is not None
            and (buffer.dtype, buffer.device, buffer.shape[1]) == (dtype, device, vocab)
            and buffer.shape[0] >= rows
        )
        if not fits:
            self._buffer = buffer = torch.empty(rows, vocab, dtype=dtype, device=device)
        token = _Token()
        self._holder = weakref.ref(token)
        return buffer[:rows], token

    def give_back(self, token) -> None:
        if self._holder is not None and self._holder() is token:
            self._holder = None


class _Token:
    """Held by the graph that uses a SoftmaxWorkspace buffer (weakly referenced by it)."""


class _ChunkedTokenLogps(torch.autograd.Function):
    """logp_i = z_i[y_i] - logsumexp(z_i), z_i = W h_i + b, one chunk of rows at a time.

    Saves the inputs and the (N,) log-normaliser; d logp_i / d z_i = onehot(y_i) - softmax(z_i).
    Backward recomputes each chunk's logits, except for the first ``save_rows`` rows, whose
    exp(z - max) the forward keeps, with 1 / sum(exp(z - max)) per row (O(save_rows x V) memory
    for one matmul of 2 x rows x H x V FLOPs fewer; normalising in backward saves a pass).
    The weight gradient is accumulated over chunks in fp32 (a (V, H) buffer) so a bf16 head is not
    rounded once per chunk.
    """

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, chunk_size, save_rows, workspace):
        dtype = _compute_dtype(hidden, weight, bias)
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=dtype)  # (N,)
        lse = hidden.new_empty(n, dtype=dtype)  # (N,)
        exps = []  # exp(z - max) of the chunks that fit in save_rows, (C, V) each
        saved = n if save_rows >= n else save_rows // chunk_size * chunk_size  # whole chunks
        inv_sums = hidden.new_zeros(saved, dtype=dtype)  # (S,)
        buffer, token = None, None
        if workspace is not None and saved > 0:
            buffer, token = workspace.take(saved, weight.shape[0], dtype, hidden.device)
        with _no_autocast(hidden.device):
            for rows in _row_chunks(n, chunk_size):
                out = buffer[rows] if buffer is not None and rows.stop <= saved else None
                logits = _chunk_logits(hidden[rows], weight, bias, dtype, out)  # (C, V)
                target_logits, row_max, sums = _softmax_stats_(logits, targets[rows])
                lse[rows] = row_max + sums.log()
                logps[rows] = target_logits - lse[rows]
                if rows.stop <= saved:
                    exps.append(logits)  # softmax(z) = exp(z - max) / sum
                    inv_sums[rows] = sums.reciprocal()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, inv_sums, *exps)
        ctx.chunk_size = chunk_size
        ctx.workspace, ctx.token = workspace, token
        return logps

    @staticmethod
    def backward(ctx, grad_logps):
        hidden, weight, bias, targets, lse, inv_sums, *exps = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse.dtype
        grad_logps = grad_logps.to(dtype)  # (N,)
        grad_hidden = hidden.new_empty(hidden.shape, dtype=dtype)  # (N, H)
        grad_weight = weight.new_zeros(weight.shape, dtype=dtype) if need_w else None  # (V, H)
        grad_bias = weight.new_zeros(weight.shape[0], dtype=dtype) if need_b else None  # (V,)
        with _no_autocast(hidden.device):
            for i, rows in enumerate(_row_chunks(hidden.shape[0], ctx.chunk_size)):
                g = grad_logps[rows, None]  # (C, 1)
                # g * (onehot(y) - softmax(z)), built in the exp buffer: no second (C, V).
                if i < len(exps):
                    # The saved exps are used up here: a second backward through this graph
                    # (retain_graph=True) fails loudly on the version check instead of silently
                    # reading gradients.
                    grad_logits = exps[i].mul_(-g * inv_sums[rows, None])  # (C, V)
                else:
                    logits = _chunk_logits(hidden[rows], weight, bias, dtype)  # (C, V)
                    grad_logits = logits.sub_(lse[rows, None]).exp_().mul_(-g)
                grad_logits.scatter_add_(1, targets[rows, None], g)
                grad_hidden[rows] = _chunk_backward(grad_logits, hidden[rows], weight, grad_weight)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0)
        if ctx.token is not None:
            ctx.workspace.give_back(ctx.token)
        return (
            _cast_grad(grad_hidden, hidden, need_h),
            _cast_grad(grad_weight, weight, need_w),
            _cast_grad(grad_bias, bias, need_b),
            None,
            None,
            None,
            None,
        )


def chunked_token_logps(
    hidden: Tensor,
    weight: Tensor,
    targets: Tensor,
    bias: Tensor | None = None,
    chunk_size: int = 1024,
    save_rows: int = 0,
    workspace: SoftmaxWorkspace | None = None,
) -> Tensor:
    """Log-probability of each target token under an LM head, without materialising (N, V) logits.

        logp_i = (W h_i + b)[y_i] - logsumexp(W h_i + b)

    Args:
        hidden: (N, H) final hidden states at the positions that predict each target.
        weight: (V, H) LM-head weight. bias: optional (V,).
        targets: (N,) token ids.
        chunk_size: rows per chunk; extra memory is O(chunk_size x V) in forward and backward.
        save_rows: keep the softmax of (about) the first ``save_rows`` rows, whole chunks only,
            from forward for backward instead of recomputing their logits: faster by one
            (rows, H) x (H, V) matmul, at 4 x V bytes per row. 0 (default): recompute all.
        workspace: where to keep those rows (reused across calls; see :class:`SoftmaxWorkspace`).

    Returns:
        (N,) fp32 log-probs (fp64 if an input is fp64), differentiable wrt hidden, weight, bias.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if save_rows < 0:
        raise ValueError(f"save_rows must be >= 0, got {save_rows}")
    return _ChunkedTokenLogps.apply(
        hidden, weight, bias, targets.long(), chunk_size, save_rows, workspace
    )


def _kl_terms(logits_pol: Tensor, lse_pol: Tensor, logits_ref: Tensor, lse_ref: Tensor) -> Tensor:
    """Per-row sum_v p_ref (log p_ref - log p_pol); a term with p_ref == 0 is 0, never NaN."""
    logp_ref = logits_ref - lse_ref[:, None]  # (C, V)
    logp_pol = logits_pol - lse_pol[:, None]  # (C, V)
    p_ref = logp_ref.exp()
    # p_ref == 0 where logp_ref == -inf, and 0 * (-inf - x) would be NaN.
    terms = torch.where(p_ref > 0, p_ref * (logp_ref - logp_pol), 0.0)
    return terms.sum(dim=-1)  # (C,)


class _ChunkedTokenKL(torch.autograd.Function):
    """KL(pi_ref || pi_pol) per row, one chunk of rows at a time; the reference is a constant.

    d KL_i / d z_pol_i = softmax(z_pol_i) - softmax(z_ref_i); backward recomputes both logits.
    """

    @staticmethod
    def forward(
        ctx, pol_hidden, pol_weight, pol_bias, ref_hidden, ref_weight, ref_bias, chunk_size
    ):
        dtype = _compute_dtype(pol_hidden, pol_weight, pol_bias, ref_hidden, ref_weight, ref_bias)
        n = pol_hidden.shape[0]
        kl = pol_hidden.new_empty(n, dtype=dtype)  # (N,)
        lse_pol = pol_hidden.new_empty(n, dtype=dtype)  # (N,)
        lse_ref = pol_hidden.new_empty(n, dtype=dtype)  # (N,)
        with _no_autocast(pol_hidden.device):
            for rows in _row_chunks(n, chunk_size):
                z_pol = _chunk_logits(pol_hidden[rows], pol_weight, pol_bias, dtype)  # (C, V)
                z_ref = _chunk_logits(ref_hidden[rows], ref_weight, ref_bias, dtype)  # (C, V)
                lse_pol[rows] = z_pol.logsumexp(dim=-1)
                lse_ref[rows] = z_ref.logsumexp(dim=-1)
                kl[rows] = _kl_terms(z_pol, lse_pol[rows], z_ref, lse_ref[rows])
        ctx.save_for_backward(
            pol_hidden, pol_weight, pol_bias, ref_hidden, ref_weight, ref_bias, lse_pol, lse_ref
        )
        ctx.chunk_size = chunk_size
        return kl

    @staticmethod
    def backward(ctx, grad_kl):
        pol_hidden, pol_weight, pol_bias, ref_hidden, ref_weight, ref_bias, lse_pol, lse_ref = (
            ctx.saved_tensors
        )
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        dtype = lse_pol.dtype
        grad_kl = grad_kl.to(dtype)  # (N,)
        grad_hidden = pol_hidden.new_empty(pol_hidden.shape, dtype=dtype)  # (N, H)
        grad_weight = pol_weight.new_zeros(pol_weight.shape, dtype=dtype) if need_w else None
        grad_bias = pol_weight.new_zeros(pol_weight.shape[0], dtype=dtype) if need_b else None
        with _no_autocast(pol_hidden.device):
            for rows in _row_chunks(pol_hidden.shape[0], ctx.chunk_size):
                z_pol = _chunk_logits(pol_hidden[rows], pol_weight, pol_bias, dtype)  # (C, V)
                z_ref = _chunk_logits(ref_hidden[rows], ref_weight, ref_bias, dtype)  # (C, V)
                p_pol = z_pol.sub_(lse_pol[rows, None]).exp_()
                p_ref = z_ref.sub_(lse_ref[rows, None]).exp_()
                grad_logits = p_pol.sub_(p_ref).mul_(grad_kl[rows, None])  # g (p_pol - p_ref)
                del p_ref, z_ref
                h = pol_hidden[rows]
                grad_hidden[rows] = _chunk_backward(grad_logits, h, pol_weight, grad_weight)
                if grad_bias is not None:
                    grad_bias += grad_logits.sum(dim=0)
        return (
            _cast_grad(grad_hidden, pol_hidden, need_h),
            _cast_grad(grad_weight, pol_weight, need_w),
            _cast_grad(grad_bias, pol_bias, need_b),
            None,
            None,
            None,
            None,
        )


def chunked_token_kl(
    policy_hidden: Tensor,
    policy_weight: Tensor,
    reference_hidden: Tensor,
    reference_weight: Tensor,
    policy_bias: Tensor | None = None,
    reference_bias: Tensor | None = None,
    chunk_size: int = 1024,
) -> Tensor:
    """Per-position KL(pi_ref || pi_theta) over the full vocabulary, without saving (N, V) logits.

        KL_i = sum_v p_ref(v) (log p_ref(v) - log p_pol(v)),   log p = log_softmax(W h + b)

    Terms with p_ref(v) == 0 contribute 0 (no NaN from -inf reference logits). Gradients flow to
    the policy side only; the reference tensors are treated as constants.

    Args:
        policy_hidden, reference_hidden: (N, H) hidden states at the same positions.
        policy_weight, reference_weight: (V, H) LM heads; optional (V,) biases.

    Returns:
        (N,) fp32 KL per position (fp64 if an input is fp64).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if policy_hidden.shape[0] != reference_hidden.shape[0]:
        raise ValueError("policy_hidden and reference_hidden must have the same number of rows")
    return _ChunkedTokenKL.apply(
        policy_hidden,
        policy_weight,
        policy_bias,
        reference_hidden.detach(),
        reference_weight.detach(),
        None if reference_bias is None else reference_bias.detach(),
        chunk_size,
    )


# --------------------------------------------------------------------------------------------------
# Scoring a Hugging Face causal LM


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
            recomputing those logits; 0 keeps none (the least memory).
    """

    def __init__(
        self,
        model: nn.Module,
        chunk_size: int = 1024,
        fast: bool | None = None,
        saved_softmax_mb: int = 0,
    ):
        super().__init__()
        self.model = model
        self.chunk_size = chunk_size
        self.saved_softmax_mb = saved_softmax_mb
        self._workspace = SoftmaxWorkspace()
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
    ) -> ScoreOutput:
        """Score the completion tokens of each row, or of each sequence packed in the rows.

        Args:
            input_ids, attention_mask: (R, T), usually right-padded; attention_mask is 1 on real
                tokens.
            completion_mask: (R, T) bool, True on the completion tokens to score.
            position_ids: optional (R, T), passed to the model (required for packed rows).
            return_hidden: also return the gathered hidden states (M, H) (or, on the exact path,
                log-probs (M, V)) for :func:`sequence_kl_from_hidden`.
            sequence_ids: packed rows (:mod:`dpokit.data.packing`): (R, T) long, the output
                sequence each completion token is scored into; the output then has one entry per
                sequence (max id + 1) instead of one per row.
            segment_ids, branch_ids: packed rows: (R, T) long, who attends to whom (see
                :func:`packed_attention_mask`); attention_mask then only marks real tokens.
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
            )
            extra = {"completion_hidden": hidden if return_hidden else None}
        else:
            logits = self._completion_logits(input_ids, scored, model_kwargs)
            logprobs = logits.float().log_softmax(dim=-1)  # (M, V)
            token_logps = logprobs.gather(1, targets[:, None]).squeeze(1)  # (M,)
            extra = {"completion_logprobs": logprobs if return_hidden else None}
        logps = _sum_per_row(token_logps, row_index, n_out)  # (N,)
        counts = torch.bincount(row_index, minlength=n_out)  # (N,)
        return ScoreOutput(
            logps=logps,
            token_counts=counts,
            avg_logps=logps / counts.clamp(min=1),
            token_logps=token_logps,
            row_index=row_index,
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
        mask = packed_attention_mask(segment_ids, branch_ids)  # (R, 1, T, T) bool
        if implementation != "sdpa":  # eager and others add the mask to the scores
            dtype = next(self.model.parameters()).dtype
            mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min
            )
        return {"attention_mask": mask, "position_ids": position_ids}

    def _completion_hidden(self, input_ids, scored, model_kwargs) -> Tensor:
        """Fast path: decoder only, then the hidden states that predict completion tokens. (M, H)"""
        out = self.model.get_decoder()(input_ids=input_ids, use_cache=False, **model_kwargs)
        hidden = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
        return hidden[:, :-1][scored]  # (N, T, H) -> (M, H)

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
        """Once: compare fast and exact log-probs on one row; switch to exact if they differ.

        Catches logit transforms that no config field announces. Runs in eval mode (no dropout).
        """
        rows = scored.any(dim=1).nonzero()
        if len(rows) == 0:
            return
        r = slice(int(rows[0]), int(rows[0]) + 1)

        def one(t: Tensor | None) -> Tensor | None:
            return t[r] if t is not None and t.shape[0] == scored.shape[0] else t

        args = (one(input_ids), scored[r], {k: one(v) for k, v in model_kwargs.items()})
        targets = input_ids[r, 1:][scored[r]]
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


def packed_attention_mask(segment_ids: Tensor, branch_ids: Tensor | None = None) -> Tensor:
    """(R, T) segment and branch ids -> (R, 1, T, T) bool mask, True where query i sees key j.

        mask[i, j] = j <= i and segment[j] == segment[i] and branch[j] in (0, branch[i])

    Branch 0 is a prefix shared by every branch of its segment (a pair's prompt); branches b > 0
    see the prefix and themselves only (chosen and rejected never see each other). Padding has a
    segment of its own, so every query sees at least itself and no softmax row is empty.
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, T, T)
    mask = same & causal
    if branch_ids is not None:
        key_branch = branch_ids[:, None, :]  # (R, 1, T)
        mask &= (key_branch == 0) | (key_branch == branch_ids[:, :, None])
    return mask[:, None]  # (R, 1, T, T)


def _sum_per_row(values: Tensor, row_index: Tensor, n_rows: int) -> Tensor:
    """(M,) values -> (N,) sums per row."""
    return values.new_zeros(n_rows).index_add(0, row_index, values)


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
    return _sum_per_row(kl, policy.row_index, policy.logps.shape[0])


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
