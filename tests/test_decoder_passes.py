"""Memory-lean scoring of long rows.

- The decoder run over groups of rows (CompletionScorer(pass_tokens=...), config
  ``decoder_pass_tokens``): groups worked out by hand, the same log-probs and gradients as one
  pass and as the full-logits computation, and one group's backward finished before the next
  starts (what keeps a checkpointed layer's recompute to one group's activations).
- The one-time fast-path check runs on a prefix of one row, packed or not.
- Under gradient checkpointing the LM head's softmax buffer is not kept between steps.
"""

from __future__ import annotations

import functools

import pytest
import torch

from dpokit.config import ConfigError, TrainConfig
from dpokit.data import PairCollator
from dpokit.data.packing import pair_collator
from dpokit.logprobs import (
    CompletionScorer,
    SoftmaxWorkspace,
    chunked_token_logps,
    full_logits_logps,
    scorer_kwargs,
)
from dpokit.logprobs.passes import row_groups
from dpokit.tiny import build_tiny_model

# Two pairs: sequences of 3+4 and 2+2 tokens (chosen) and 3+2 and 2+5 (rejected).
ROWS = [
    {"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9, 10, 11], "index": 0},
    {"prompt_input_ids": [12, 13], "chosen_input_ids": [14, 15], "index": 1},
]
ROWS[0]["rejected_input_ids"] = [16, 17]
ROWS[1]["rejected_input_ids"] = [18, 19, 20, 21, 22]


def test_row_groups_by_hand():
    scored = torch.zeros(4, 9, dtype=torch.bool)  # (R, T-1): column p predicts token p+1
    scored[0, 3:6] = True  # last scored column 5: needs positions 0..6, cut 7
    scored[1, 2:9] = True  # cut 10 (the whole row)
    scored[2, 1] = True  # cut 3
    # row 3 scores nothing: cut 1
    whole = [(slice(0, 4), 10)]
    assert row_groups(scored, None) == whole
    assert row_groups(scored, 40) == whole  # 4 rows x 10 tokens fit: one uncut pass
    assert row_groups(scored, 20) == [(slice(0, 2), 10), (slice(2, 4), 3)]
    assert row_groups(scored, 14) == [(slice(0, 1), 7), (slice(1, 2), 10), (slice(2, 4), 3)]
    assert row_groups(scored, 5) == [  # a row longer than the budget runs alone
        (slice(0, 1), 7),
        (slice(1, 2), 10),
        (slice(2, 3), 3),
        (slice(3, 4), 1),
    ]


def _model(tokenizer, checkpointing: bool):
    model = build_tiny_model(tokenizer, arch="qwen2", seed=3)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model.train()


def _score(model, batch, pass_tokens):
    """(2B,) log-probs and every parameter's gradient of a weighted sum of them."""
    model.zero_grad()
    scorer = CompletionScorer(model, chunk_size=3, fast=True, pass_tokens=pass_tokens)
    out = scorer(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),
    )
    weights = torch.linspace(-1.0, 2.0, out.logps.shape[0])
    (out.logps * weights).sum().backward()
    return out.logps.detach(), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("packing", ["none", "shared_prompt", "padding_free"])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_passes_give_the_same_logps_and_gradients(tiny_tokenizer, packing, checkpointing):
    model = _model(tiny_tokenizer, checkpointing)
    batch = pair_collator(tiny_tokenizer.pad_token_id, packing)(ROWS)
    one_pass = _score(model, batch, None)
    row_by_row = _score(model, batch, 1)  # every row its own pass
    torch.testing.assert_close(row_by_row[0], one_pass[0], rtol=1e-5, atol=1e-5)
    for got, want in zip(row_by_row[1], one_pass[1], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    # And both equal the naive full-logits log-probs of the two-row form.
    two_rows = PairCollator(tiny_tokenizer.pad_token_id)(ROWS)
    with torch.no_grad():
        want = full_logits_logps(
            model, two_rows["input_ids"], two_rows["attention_mask"], two_rows["completion_mask"]
        )
    torch.testing.assert_close(row_by_row[0], want, rtol=1e-5, atol=1e-5)


def test_each_group_runs_cut_and_its_backward_finishes_first(tiny_tokenizer):
    """Two-row layout, rows of 7, 4, 5 and 7 tokens (padded to 7), budget 10 tokens: groups
    {row 0} cut 7, {rows 1, 2} cut 5, {row 3} cut 7. Autograd runs the last group's layers first
    and each group's layers back to back, so with checkpointing one group is live at a time."""
    model = _model(tiny_tokenizer, checkpointing=True)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(ROWS)
    assert batch["input_ids"].shape == (4, 7)
    calls, backward = [], []
    decoder = model.get_decoder()
    decoder.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(tuple(kwargs["input_ids"].shape)),
        with_kwargs=True,
    )
    for index, layer in enumerate(decoder.layers):
        layer.register_full_backward_hook(
            lambda module, grad_in, grad_out, i=index: backward.append(
                (i, tuple(grad_out[0].shape[:2]))
            )
        )
    _score(model, batch, 10)
    assert calls == [(1, 7), (2, 5), (1, 7)]
    top = len(decoder.layers) - 1
    groups = [(1, 7), (2, 5), (1, 7)][::-1]  # backward visits the groups last to first
    assert backward == [(i, group) for group in groups for i in range(top, -1, -1)]


def test_decoder_pass_tokens_config(tmp_path):
    base = {"model": "m", "data": "d", "output_dir": str(tmp_path)}
    assert TrainConfig.from_dict(base).decoder_pass_tokens == 8192
    assert TrainConfig.from_dict({**base, "decoder_pass_tokens": None}).decoder_pass_tokens is None
    with pytest.raises(ConfigError, match="decoder_pass_tokens"):
        TrainConfig.from_dict({**base, "decoder_pass_tokens": 0})
    with pytest.raises(ValueError, match="pass_tokens"):
        CompletionScorer(torch.nn.Linear(2, 2), pass_tokens=0)


def _random_rows(vocab: int, seed: int = 0) -> list[dict]:
    g = torch.Generator().manual_seed(seed)

    def ids(n):
        return torch.randint(3, vocab, (n,), generator=g).tolist()

    return [
        {
            "prompt_input_ids": ids(p),
            "chosen_input_ids": ids(c),
            "rejected_input_ids": ids(r),
            "index": i,
        }
        for i, (p, c, r) in enumerate([(5, 9, 4), (3, 6, 11), (7, 2, 8)])
    ]


def test_self_check_runs_on_a_prefix_of_one_row(tiny_tokenizer, monkeypatch):
    """The one-time check runs the exact path on ``verify_positions`` scored positions of one
    row: a whole long row's (tokens x V) logits would cost more than the training step."""
    model = build_tiny_model(tiny_tokenizer, arch="qwen2", seed=3)
    monkeypatch.setattr(CompletionScorer, "verify_positions", 3)
    batch = PairCollator(tiny_tokenizer.pad_token_id)(ROWS)
    args = (batch["input_ids"], batch["attention_mask"], batch["completion_mask"])
    shapes = []
    original = model.forward

    @functools.wraps(original)  # keeps the signature: the scorer then passes logits_to_keep
    def recording_forward(*a, **kwargs):
        out = original(*a, **kwargs)
        shapes.append((tuple(kwargs["input_ids"].shape), tuple(out.logits.shape)))
        return out

    model.forward = recording_forward
    scorer = CompletionScorer(model)
    out = scorer(*args)
    assert scorer.fast and scorer._verified
    # Row 0 = prompt 3 + chosen 4: its 3rd completion token is token 5, predicted by position 4;
    # the prefix is tokens 0..5 (6), the logits are kept from the first scored position (2) on.
    assert shapes == [((1, 6), (1, 4, len(model.lm_head.weight)))]
    with torch.no_grad():
        torch.testing.assert_close(out.logps, full_logits_logps(model, *args))


@pytest.mark.parametrize("packing", ["shared_prompt", "padding_free"])
def test_self_check_on_a_packed_row_prefix_keeps_the_fast_path(
    tiny_tokenizer, packing, monkeypatch
):
    """The check cuts a packed row (and its 4D mask) to a prefix: it must still find the fast
    path exact, and the log-probs equal the two-row full-logits ones."""
    model = build_tiny_model(tiny_tokenizer, arch="qwen2", seed=3)
    monkeypatch.setattr(CompletionScorer, "verify_positions", 2)
    rows = _random_rows(len(tiny_tokenizer))
    batch = pair_collator(tiny_tokenizer.pad_token_id, packing)(rows)
    scorer = CompletionScorer(model)  # auto: checks the fast path once, on this batch
    out = scorer(
        batch["input_ids"],
        batch["attention_mask"],
        batch["completion_mask"],
        **scorer_kwargs(batch),
    )
    assert scorer.fast and scorer._verified
    two_rows = PairCollator(tiny_tokenizer.pad_token_id)(rows)
    with torch.no_grad():
        want = full_logits_logps(
            model, two_rows["input_ids"], two_rows["attention_mask"], two_rows["completion_mask"]
        )
    torch.testing.assert_close(out.logps, want, rtol=1e-5, atol=1e-5)


def test_softmax_workspace_lets_go_under_gradient_checkpointing(tiny_tokenizer):
    """keep=False: the buffer is dropped when backward gives it back (the same log-probs and
    gradients); a scorer of a model with gradient checkpointing on uses such a workspace."""
    g = torch.Generator().manual_seed(2)
    hidden = torch.randn(6, 8, generator=g, requires_grad=True)
    weight = torch.randn(40, 8, generator=g, requires_grad=True)
    targets = torch.randint(0, 40, (6,), generator=g)
    expected = chunked_token_logps(hidden, weight, targets, chunk_size=4)
    expected_grads = torch.autograd.grad(expected.sum(), (hidden, weight))
    workspace = SoftmaxWorkspace(keep=False)
    out = chunked_token_logps(hidden, weight, targets, None, 4, 6, workspace)
    assert workspace._buffer is not None and workspace._buffer.shape == (6, 40)
    grads = torch.autograd.grad(out.sum(), (hidden, weight))
    assert workspace._buffer is None
    torch.testing.assert_close(out, expected)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
    model = build_tiny_model(tiny_tokenizer, seed=1)
    assert CompletionScorer(model)._workspace.keep
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    assert not CompletionScorer(model)._workspace.keep
