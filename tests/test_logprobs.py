"""Chunked LM-head log-probs and KL, and CompletionScorer against the naive full-logits path."""

from __future__ import annotations

import copy
import logging

import peft
import pytest
import torch
from transformers import AutoModelForCausalLM

import dpokit.logprobs.scorer as scorer_module
from dpokit.logprobs import (
    CompletionScorer,
    chunked_token_kl,
    chunked_token_logps,
    full_logits_logps,
    sequence_kl_from_hidden,
)
from dpokit.tiny import build_tiny_model

# --------------------------------------------------------------------------------------------------
# Helpers


def _head_inputs(n=7, h=5, v=11, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, h, generator=g, dtype=dtype, requires_grad=True)
    weight = torch.randn(v, h, generator=g, dtype=dtype, requires_grad=True)
    bias = torch.randn(v, generator=g, dtype=dtype, requires_grad=True)
    targets = torch.randint(0, v, (n,), generator=g)
    return hidden, weight, bias, targets


def _direct_logps(hidden, weight, targets, bias=None):
    logits = hidden @ weight.T + (0 if bias is None else bias)  # (N, V)
    return logits.log_softmax(-1).gather(1, targets[:, None]).squeeze(1)


def _direct_kl(pol_logits, ref_logits):
    logp_pol, logp_ref = pol_logits.log_softmax(-1), ref_logits.log_softmax(-1)
    p_ref = logp_ref.exp()
    return torch.where(p_ref > 0, p_ref * (logp_ref - logp_pol), 0.0).sum(-1)


def _grads(out, *tensors):
    return torch.autograd.grad(out, tensors)


def _batch(tokenizer, pairs):
    """Right-padded (input_ids, attention_mask, completion_mask) for (prompt, completion) pairs."""
    rows = []
    for prompt, completion in pairs:
        p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
        c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        rows.append((p, c))
    length = max(len(p) + len(c) for p, c in rows)
    n = len(rows)
    input_ids = torch.full((n, length), tokenizer.pad_token_id)
    attention_mask = torch.zeros(n, length, dtype=torch.long)
    completion_mask = torch.zeros(n, length, dtype=torch.bool)
    for i, (p, c) in enumerate(rows):
        input_ids[i, : len(p) + len(c)] = torch.tensor(p + c)
        attention_mask[i, : len(p) + len(c)] = 1
        completion_mask[i, len(p) : len(p) + len(c)] = True
    return input_ids, attention_mask, completion_mask


PAIRS = [
    ("Human: What is the capital of France? Assistant:", " Paris is the capital of France."),
    ("I like apples", " and bananas"),
    ("The quick brown fox jumps over the lazy", " dog. Hello there! How are you doing today?"),
]


@pytest.fixture()
def batch(tiny_tokenizer):
    return _batch(tiny_tokenizer, PAIRS)


def _param_grads(model, loss):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.autograd.grad(loss, params, allow_unused=True)


def _assert_grads_close(a, b, atol=1e-5):
    for ga, gb in zip(a, b, strict=True):
        # allow_unused gives None for a parameter one path does not touch: it must get zero grad.
        ga = torch.zeros_like(gb) if ga is None and gb is not None else ga
        gb = torch.zeros_like(ga) if gb is None and ga is not None else gb
        if ga is not None:
            torch.testing.assert_close(ga, gb, atol=atol, rtol=1e-4)


def _loss_weights(n):
    return torch.linspace(-1.0, 2.0, n)  # arbitrary, non-uniform so every row's grad is checked


# --------------------------------------------------------------------------------------------------
# chunked_token_logps / chunked_token_kl


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_logps_gradcheck(with_bias):
    hidden, weight, bias, targets = _head_inputs()  # N = 7, chunk 3: chunks of 3, 3, 1

    def f(h, w, *b):
        return chunked_token_logps(h, w, targets, b[0] if b else None, chunk_size=3)

    inputs = (hidden, weight, bias) if with_bias else (hidden, weight)
    assert torch.autograd.gradcheck(f, inputs)


@pytest.mark.parametrize("with_bias", [False, True])
def test_chunked_token_kl_gradcheck(with_bias):
    hidden, weight, bias, _ = _head_inputs(seed=0)
    ref_hidden, ref_weight, ref_bias, _ = _head_inputs(seed=1)

    def f(h, w, *b):
        return chunked_token_kl(
            h,
            w,
            ref_hidden.detach(),
            ref_weight.detach(),
            policy_bias=b[0] if b else None,
            reference_bias=ref_bias.detach() if with_bias else None,
            chunk_size=3,
        )

    inputs = (hidden, weight, bias) if with_bias else (hidden, weight)
    assert torch.autograd.gradcheck(f, inputs)


def test_chunked_token_logps_matches_direct():
    hidden, weight, bias, targets = _head_inputs(n=10, h=8, v=50, dtype=torch.float32)
    out = chunked_token_logps(hidden, weight, targets, bias, chunk_size=4)
    ref = _direct_logps(hidden, weight, targets, bias)
    assert out.dtype == torch.float32 and out.shape == (10,)
    torch.testing.assert_close(out, ref)
    g = torch.randn(10)
    for a, b in zip(
        _grads((out * g).sum(), hidden, weight, bias),
        _grads((ref * g).sum(), hidden, weight, bias),
        strict=True,
    ):
        torch.testing.assert_close(a, b)


def test_chunked_token_logps_half_inputs_are_upcast():
    """bf16 inputs: fp32 log-probs, grads in bf16, equal to fp32 math on the upcast inputs.

    chunk_size=3 with V=50, H=64 upcasts the head in slices of 3*50//64 = 2 rows: many slices.
    """
    hidden, weight, bias, targets = _head_inputs(n=10, h=64, v=50, dtype=torch.float32)
    h16, w16, b16 = (t.detach().bfloat16().requires_grad_() for t in (hidden, weight, bias))
    out = chunked_token_logps(h16, w16, targets, b16, chunk_size=3)
    h32, w32, b32 = (t.detach().float().requires_grad_() for t in (h16, w16, b16))
    ref = _direct_logps(h32, w32, targets, b32)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    grads = _grads(out.sum(), h16, w16, b16)
    assert [g.dtype for g in grads] == [torch.bfloat16] * 3
    for a, b in zip(grads, _grads(ref.sum(), h32, w32, b32), strict=True):
        torch.testing.assert_close(a.float(), b.bfloat16().float())


def test_chunked_token_logps_ignores_autocast():
    hidden, weight, _, targets = _head_inputs(n=6, h=8, v=40, dtype=torch.float32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = chunked_token_logps(hidden, weight, targets, chunk_size=4)
    torch.testing.assert_close(out, _direct_logps(hidden, weight, targets))


def test_chunked_token_kl_matches_direct_fp64():
    hidden, weight, bias, _ = _head_inputs(n=9, h=6, v=30, seed=0)
    ref_hidden, ref_weight, ref_bias, _ = _head_inputs(n=9, h=6, v=30, seed=1)
    out = chunked_token_kl(hidden, weight, ref_hidden, ref_weight, bias, ref_bias, chunk_size=4)
    direct = _direct_kl(hidden @ weight.T + bias, (ref_hidden @ ref_weight.T + ref_bias).detach())
    torch.testing.assert_close(out, direct)
    assert (out > 0).all()
    for a, b in zip(
        _grads(out.sum(), hidden, weight, bias),
        _grads(direct.sum(), hidden, weight, bias),
        strict=True,
    ):
        torch.testing.assert_close(a, b)
    # The reference is a constant: no gradient reaches it.
    assert torch.autograd.grad(out.sum(), ref_hidden, allow_unused=True)[0] is None


def test_chunked_token_kl_zero_for_identical_policy_and_reference():
    hidden, weight, bias, _ = _head_inputs(n=8, h=6, v=30, dtype=torch.float32)
    kl = chunked_token_kl(hidden, weight, hidden, weight, bias, bias, chunk_size=3)
    torch.testing.assert_close(kl, torch.zeros(8), atol=1e-6, rtol=0)
    grad = torch.autograd.grad(kl.sum(), hidden)[0]  # KL is minimal here: zero gradient
    torch.testing.assert_close(grad, torch.zeros_like(grad), atol=1e-6, rtol=0)


def test_chunked_token_kl_no_nan_with_neg_inf_reference_logits():
    hidden, weight, bias, _ = _head_inputs(n=8, h=6, v=30, dtype=torch.float32)
    ref_bias = bias.detach().clone()
    ref_bias[::3] = float("-inf")  # p_ref == 0 for a third of the vocabulary
    pol_bias = bias.detach().clone().requires_grad_()
    kl = chunked_token_kl(hidden, weight, hidden.detach(), weight.detach(), pol_bias, ref_bias, 3)
    assert torch.isfinite(kl).all() and (kl > 0).all()
    torch.testing.assert_close(
        kl, _direct_kl(hidden @ weight.T + pol_bias, hidden @ weight.T + ref_bias)
    )
    # -inf on both sides at the same tokens: still finite, and 0 when otherwise identical.
    pol_inf = ref_bias.clone().requires_grad_()
    kl_same = chunked_token_kl(hidden, weight, hidden, weight, pol_inf, ref_bias, chunk_size=3)
    torch.testing.assert_close(kl_same, torch.zeros(8), atol=1e-6, rtol=0)
    grads = torch.autograd.grad((kl + kl_same).sum(), (hidden, weight, pol_bias, pol_inf))
    assert all(torch.isfinite(g).all() for g in grads)


def _saved_numels(fn):
    numels = []

    def pack(t):
        numels.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return numels


def test_autograd_graph_holds_no_token_by_vocab_tensor():
    m, h, v = 64, 16, 5000  # M*V = 320k, far above V*H = 80k (the head itself)
    hidden, weight, bias, targets = _head_inputs(n=m, h=h, v=v, dtype=torch.float32)
    ref_hidden, ref_weight, _, _ = _head_inputs(n=m, h=h, v=v, dtype=torch.float32, seed=1)
    # The check has teeth: the naive computation saves (M, V) tensors.
    assert max(_saved_numels(lambda: _direct_logps(hidden, weight, targets, bias))) >= m * v
    for fn in (
        lambda: chunked_token_logps(hidden, weight, targets, bias, chunk_size=16),
        lambda: chunked_token_kl(hidden, weight, ref_hidden, ref_weight, bias, chunk_size=16),
    ):
        numels = _saved_numels(fn)
        assert numels and max(numels) <= v * h < m * v


def test_scorer_graph_holds_no_token_by_vocab_tensor(tiny_model, batch):
    """The only saved tensor with a vocabulary dimension is the LM head weight itself."""
    vocab, hidden = tiny_model.lm_head.weight.shape
    shapes = []

    def pack(t):
        shapes.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        CompletionScorer(tiny_model, fast=True)(*batch)
    assert shapes and {s for s in shapes if vocab in s} == {(vocab, hidden)}
    shapes.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        full_logits_logps(tiny_model, *batch)  # the naive path, for contrast
    assert any(vocab in s and s != (vocab, hidden) for s in shapes)


def test_chunk_size_must_be_positive():
    hidden, weight, _, targets = _head_inputs()
    with pytest.raises(ValueError):
        chunked_token_logps(hidden, weight, targets, chunk_size=0)


# --------------------------------------------------------------------------------------------------
# CompletionScorer


def test_scorer_matches_full_logits(tiny_model, batch):
    input_ids, attention_mask, completion_mask = batch
    out = CompletionScorer(tiny_model, chunk_size=5)(input_ids, attention_mask, completion_mask)
    naive = full_logits_logps(tiny_model, input_ids, attention_mask, completion_mask)
    assert out.logps.dtype == torch.float32 and out.logps.shape == (3,)
    torch.testing.assert_close(out.logps, naive, atol=1e-5, rtol=0)
    assert out.token_counts.tolist() == completion_mask.sum(1).tolist()
    assert out.token_counts.dtype == torch.long
    torch.testing.assert_close(out.avg_logps, out.logps / out.token_counts)
    assert out.token_logps.shape == out.row_index.shape == (int(completion_mask.sum()),)
    assert out.completion_hidden is None


def test_scorer_ignores_completion_tokens_in_padding(tiny_model, batch):
    input_ids, attention_mask, completion_mask = batch
    scorer = CompletionScorer(tiny_model)
    out = scorer(input_ids, attention_mask, completion_mask)
    out_padded = scorer(input_ids, attention_mask, completion_mask | (attention_mask == 0))
    torch.testing.assert_close(out_padded.logps, out.logps)
    assert out_padded.token_counts.tolist() == out.token_counts.tolist()


def test_scorer_row_without_completion(tiny_model, batch):
    input_ids, attention_mask, completion_mask = batch
    completion_mask = completion_mask.clone()
    completion_mask[1] = False
    out = CompletionScorer(tiny_model)(input_ids, attention_mask, completion_mask)
    assert out.token_counts[1] == 0 and out.logps[1] == 0 and out.avg_logps[1] == 0
    out.logps.sum().backward()  # no NaN, no error
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())


def test_scorer_rejects_completion_at_position_zero(tiny_model, batch):
    input_ids, attention_mask, completion_mask = batch
    completion_mask = completion_mask.clone()
    completion_mask[0, 0] = True
    with pytest.raises(ValueError, match="first token"):
        CompletionScorer(tiny_model)(input_ids, attention_mask, completion_mask)


def _check_values_and_grads(model, batch, **scorer_kwargs):
    input_ids, attention_mask, completion_mask = batch
    scorer = CompletionScorer(model, chunk_size=7, **scorer_kwargs)
    w = _loss_weights(input_ids.shape[0])
    out = scorer(input_ids, attention_mask, completion_mask)
    naive = full_logits_logps(model, input_ids, attention_mask, completion_mask)
    torch.testing.assert_close(out.logps, naive, atol=1e-5, rtol=0)
    _assert_grads_close(
        _param_grads(model, (out.logps * w).sum()), _param_grads(model, (naive * w).sum())
    )
    return scorer


def test_scorer_gradients_match_full_logits(tiny_model, batch):
    scorer = _check_values_and_grads(tiny_model, batch)
    assert scorer.fast


@pytest.mark.parametrize("arch,tied", [("qwen2", False), ("llama", True), ("qwen2", True)])
def test_scorer_other_architectures(tiny_tokenizer, batch, arch, tied):
    model = build_tiny_model(tiny_tokenizer, arch=arch, tie_word_embeddings=tied)
    assert (model.lm_head.weight is model.get_input_embeddings().weight) == tied
    assert _check_values_and_grads(model, batch).fast


def test_scorer_lm_head_bias(tiny_model, batch):
    head = tiny_model.lm_head
    tiny_model.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
    with torch.no_grad():
        tiny_model.lm_head.weight.copy_(head.weight)
        tiny_model.lm_head.bias.normal_()
    assert _check_values_and_grads(tiny_model, batch).fast


def test_scorer_position_ids_pass_through(tiny_model, tiny_tokenizer):
    """Left padding only scores correctly with position_ids: they must reach the decoder."""
    input_ids, attention_mask, completion_mask = _batch(tiny_tokenizer, PAIRS)
    shift = (attention_mask == 0).sum(1)  # convert right padding to left padding
    for i, s in enumerate(shift.tolist()):
        for t in (input_ids, attention_mask, completion_mask):
            t[i] = t[i].roll(s)
    position_ids = (attention_mask.cumsum(1) - 1).clamp(min=0)
    args = (input_ids, attention_mask, completion_mask, position_ids)
    out = CompletionScorer(tiny_model)(*args)
    torch.testing.assert_close(out.logps, full_logits_logps(tiny_model, *args), atol=1e-5, rtol=0)
    right = CompletionScorer(tiny_model)(*_batch(tiny_tokenizer, PAIRS))
    torch.testing.assert_close(out.logps, right.logps, atol=1e-4, rtol=0)


def test_scorer_bf16_model_gives_fp32_logps(tiny_dir, batch):
    fp32 = AutoModelForCausalLM.from_pretrained(str(tiny_dir))
    bf16 = AutoModelForCausalLM.from_pretrained(str(tiny_dir), dtype=torch.bfloat16)
    ref = CompletionScorer(fp32)(*batch).logps
    scorer = CompletionScorer(bf16)
    out = scorer(*batch).logps
    assert scorer.fast  # the one-time check tolerates bf16 rounding in the exact path
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, ref, atol=0.05 * ref.abs().max().item(), rtol=0)
    # The fp32 head matters: bf16 logits, as the naive path produces them, are coarser.
    assert (out - ref).abs().max() <= (full_logits_logps(bf16, *batch) - ref).abs().max()


def test_exact_path_matches_fast_path(tiny_model, batch):
    fast = CompletionScorer(tiny_model)
    exact = CompletionScorer(tiny_model, fast=False)
    assert fast.fast and not exact.fast
    out_fast, out_exact = fast(*batch, return_hidden=True), exact(*batch, return_hidden=True)
    torch.testing.assert_close(out_exact.logps, out_fast.logps, atol=1e-5, rtol=0)
    assert out_exact.completion_hidden is None
    assert out_exact.completion_logprobs.shape == (len(out_fast.row_index), tiny_model.vocab_size)
    _check_values_and_grads(tiny_model, batch, fast=False)


def test_softcapped_model_falls_back_to_exact_path(tiny_tokenizer, batch, caplog, monkeypatch):
    """Gemma2 soft-caps its logits: the fast path would mis-score it, so it must not be used."""
    monkeypatch.setattr(scorer_module, "_warned", set())  # warns once per process
    model = build_tiny_model(tiny_tokenizer, arch="gemma2")
    with torch.no_grad():
        model.lm_head.weight.mul_(30.0)  # logits well beyond the cap, as in a trained model
    with caplog.at_level(logging.WARNING, logger="dpokit.logprobs"):
        scorer = CompletionScorer(model)
    assert not scorer.fast
    assert "final_logit_softcapping" in caplog.text
    out = scorer(*batch)
    torch.testing.assert_close(out.logps, full_logits_logps(model, *batch), atol=1e-5, rtol=1e-6)
    # What the fast path would have computed is wrong for this model.
    head = model.get_output_embeddings()
    hidden = model.get_decoder()(*batch[:2]).last_hidden_state[:, :-1][batch[2][:, 1:]]
    wrong = chunked_token_logps(hidden, head.weight, batch[0][:, 1:][batch[2][:, 1:]])
    assert (wrong - out.token_logps).abs().max() > 0.1
    with pytest.raises(ValueError, match="fast=True"):
        CompletionScorer(model, fast=True)


def test_hooked_head_blocks_fast_path(tiny_model, batch):
    """A forward hook on the head changes its output: the fast path would bypass it."""
    tiny_model.lm_head.register_forward_hook(lambda mod, args, out: out * 0.5)
    scorer = CompletionScorer(tiny_model)
    assert not scorer.fast
    torch.testing.assert_close(scorer(*batch).logps, full_logits_logps(tiny_model, *batch))


def test_self_check_switches_to_exact_path(tiny_model, batch, monkeypatch, caplog):
    """A transform nothing announces is caught by the one-time numeric check."""
    import dpokit.logprobs.scorer as lp

    monkeypatch.setattr(lp, "_fast_path_blocker", lambda model: None)
    original = tiny_model.forward

    def scaled_forward(*args, **kwargs):  # e.g. a custom model class that rescales its logits
        out = original(*args, **kwargs)
        out.logits = out.logits * 0.5
        return out

    tiny_model.forward = scaled_forward
    scorer = CompletionScorer(tiny_model)
    assert scorer.fast
    with caplog.at_level(logging.WARNING, logger="dpokit.logprobs"):
        out = scorer(*batch)
    assert not scorer.fast and "not decoder @ W.T + b" in caplog.text
    torch.testing.assert_close(out.logps, full_logits_logps(tiny_model, *batch))


def test_self_check_keeps_fast_path_and_restores_train_mode(tiny_model, batch):
    tiny_model.train()
    tiny_model.model.layers[0].eval()  # a user's per-module mode must survive the check
    scorer = CompletionScorer(tiny_model)
    scorer(*batch)
    assert scorer.fast and scorer._verified
    assert tiny_model.training and not tiny_model.model.layers[0].training


def test_peft_lora_adapter_applies_and_disables(tiny_model, batch):
    base = CompletionScorer(copy.deepcopy(tiny_model))(*batch).logps
    config = peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"])
    model = peft.get_peft_model(tiny_model, config)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.5)
    scorer = CompletionScorer(model)
    assert scorer.fast and scorer.model is model
    out = scorer(*batch)
    assert (out.logps - base).abs().max() > 1e-3
    torch.testing.assert_close(out.logps, full_logits_logps(model, *batch), atol=1e-5, rtol=0)
    with model.disable_adapter():
        assert torch.equal(scorer(*batch).logps, base)
    # Only LoRA weights train, and they get the same gradient as through full logits.
    w = _loss_weights(3)
    _assert_grads_close(
        _param_grads(model, (scorer(*batch).logps * w).sum()),
        _param_grads(model, (full_logits_logps(model, *batch) * w).sum()),
    )


def test_peft_head_in_modules_to_save_or_lora(tiny_model, tiny_tokenizer, batch):
    """A trained copy of the head (modules_to_save) is used and switched off by disable_adapter;
    a LoRA-wrapped head is not a plain Linear, so it is scored exactly."""
    base = full_logits_logps(tiny_model, *batch)
    config = peft.LoraConfig(r=4, target_modules=["q_proj"], modules_to_save=["lm_head"])
    model = peft.get_peft_model(tiny_model, config)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.mul_(3.0)
    scorer = CompletionScorer(model)
    assert scorer.fast
    out = scorer(*batch).logps
    torch.testing.assert_close(out, full_logits_logps(model, *batch), atol=1e-5, rtol=0)
    assert (out - base).abs().max() > 1e-2
    with model.disable_adapter():
        torch.testing.assert_close(scorer(*batch).logps, base, atol=1e-5, rtol=0)

    other = build_tiny_model(tiny_tokenizer)
    lora_head = peft.get_peft_model(other, peft.LoraConfig(r=4, target_modules=["lm_head"]))
    assert not CompletionScorer(lora_head).fast


def test_sequence_kl_from_hidden(tiny_model, batch):
    reference_model = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in tiny_model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    policy, reference = CompletionScorer(tiny_model), CompletionScorer(reference_model)
    pol = policy(*batch, return_hidden=True)
    with torch.no_grad():
        ref = reference(*batch, return_hidden=True)
    kl = sequence_kl_from_hidden(pol, ref, policy.head, reference.head, chunk_size=4)

    # Direct: full-vocabulary KL at every completion position, summed per sequence.
    input_ids, attention_mask, completion_mask = batch
    scored = completion_mask[:, 1:]
    pol_logits = tiny_model(input_ids, attention_mask=attention_mask).logits[:, :-1][scored]
    ref_logits = reference_model(input_ids, attention_mask=attention_mask).logits[:, :-1][scored]
    per_token = _direct_kl(pol_logits.double(), ref_logits.detach().double()).float()
    direct = torch.zeros(3).index_add(0, scored.nonzero()[:, 0], per_token)
    torch.testing.assert_close(kl, direct, atol=1e-5, rtol=1e-4)
    assert (kl > 0).all()
    _assert_grads_close(_param_grads(tiny_model, kl.sum()), _param_grads(tiny_model, direct.sum()))

    # The exact path gives the same KL; mixing paths is an error; KL(model || itself) = 0.
    exact_pol = CompletionScorer(tiny_model, fast=False)(*batch, return_hidden=True)
    with torch.no_grad():
        exact_ref = CompletionScorer(reference_model, fast=False)(*batch, return_hidden=True)
    torch.testing.assert_close(
        sequence_kl_from_hidden(exact_pol, exact_ref, None, None), kl, atol=1e-5, rtol=1e-4
    )
    with pytest.raises(ValueError, match="same path"):
        sequence_kl_from_hidden(pol, exact_ref, policy.head, None)
    self_kl = sequence_kl_from_hidden(pol, pol, policy.head, policy.head)
    torch.testing.assert_close(self_kl, torch.zeros(3), atol=1e-5, rtol=0)
