"""The chunked LM-head kernels: custom autograd Functions that never keep (N, V) logits.

:func:`chunked_token_logps` gives each row's target-token log-probability and
:func:`chunked_token_kl` each row's KL(pi_ref || pi_theta) over the vocabulary, both projecting
(N, H) hidden states through a (V, H) head one chunk of rows at a time and recomputing (or, for a
budgeted number of rows, keeping) each chunk's logits for backward. Logits are computed in fp32
(fp64 for fp64 inputs) whatever the model's dtype and autocast say.
"""

from __future__ import annotations

import weakref

import torch
from torch import Tensor

__all__ = [
    "SoftmaxWorkspace",
    "chunked_token_kl",
    "chunked_token_logps",
    "sum_per_row",
]


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

    ``keep=False`` lets go of the buffer when it is given back: kept, it would sit idle through
    the rest of backward and the optimizer step, adding its size (rows x V x 4 bytes: 311 MB for
    512 tokens of a 152k vocabulary) to the step's peak, which a memory-bound run cannot spare.
    """

    def __init__(self, keep: bool = True) -> None:
        self.keep = keep
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
        """Release the buffer held by ``token``'s graph (a stale token is ignored)."""
        if self._holder is not None and self._holder() is token:
            self._holder = None
            if not self.keep:
                self._buffer = None  # freed with the graph's saved exps, at the end of backward


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
    def forward(ctx, hidden, weight, bias, targets, chunk_size, save_rows, workspace, with_sq):
        dtype = _compute_dtype(hidden, weight, bias)
        n = hidden.shape[0]
        logps = hidden.new_empty(n, dtype=dtype)  # (N,)
        lse = hidden.new_empty(n, dtype=dtype)  # (N,)
        log_sum_sq = hidden.new_empty(n, dtype=dtype) if with_sq else None  # (N,)
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
                if log_sum_sq is not None:
                    # log sum_v p_v^2 = log sum e^(2(z - max)) - 2 log sum e^(z - max), from the
                    # exps already in the buffer; the norm is >= 1 (the max term), no underflow.
                    norms = torch.linalg.vector_norm(logits, dim=1)  # (C,)
                    log_sum_sq[rows] = 2.0 * (norms.log() - sums.log())
                if rows.stop <= saved:
                    exps.append(logits)  # softmax(z) = exp(z - max) / sum
                    inv_sums[rows] = sums.reciprocal()
        ctx.save_for_backward(hidden, weight, bias, targets, lse, inv_sums, *exps)
        ctx.chunk_size = chunk_size
        ctx.workspace, ctx.token = workspace, token
        if log_sum_sq is None:
            return logps
        ctx.mark_non_differentiable(log_sum_sq)
        return logps, log_sum_sq

    @staticmethod
    def backward(ctx, grad_logps, *_grad_log_sum_sq):
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
    return_log_sum_sq: bool = False,
) -> Tensor | tuple[Tensor, Tensor]:
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
        return_log_sum_sq: also return each row's ``log sum_v softmax(z)_v**2`` (WPO's weights,
            Zhou et al. 2024, arXiv:2406.11827), from the same chunk logits: no extra (N, V).

    Returns:
        (N,) fp32 log-probs (fp64 if an input is fp64), differentiable wrt hidden, weight, bias;
        with ``return_log_sum_sq`` the pair (log-probs, (N,) log sum of squared probabilities,
        no gradient).
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if save_rows < 0:
        raise ValueError(f"save_rows must be >= 0, got {save_rows}")
    return _ChunkedTokenLogps.apply(
        hidden, weight, bias, targets.long(), chunk_size, save_rows, workspace, return_log_sum_sq
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


def sum_per_row(values: Tensor, row_index: Tensor, n_rows: int) -> Tensor:
    """(M,) values -> (N,) sums per row: ``out[n] = sum of values[m] with row_index[m] == n``.

    ``row_index`` is (M,) long in [0, n_rows); rows without a value get 0.
    """
    return values.new_zeros(n_rows).index_add(0, row_index, values)
