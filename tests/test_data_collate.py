"""PairCollator: exact tensors, chosen rows first, right padding; train_eval_split."""

from __future__ import annotations

import pytest
import torch
from torch.utils.data import DataLoader

from dpokit.data import PairCollator, prepare_pairs, train_eval_split
from dpokit.data.collate import resolve_pad_token_id

ROWS = [
    {
        "prompt_input_ids": [5, 6],
        "chosen_input_ids": [7, 2],
        "rejected_input_ids": [8, 9, 2],
        "index": 0,
        "score_chosen": 0.9,
        "score_rejected": 0.4,
    },
    {
        "prompt_input_ids": [10],
        "chosen_input_ids": [11, 2],
        "rejected_input_ids": [2],
        "index": 1,
        "score_chosen": 3.0,
        "score_rejected": 1.0,
    },
]


def test_collator_exact_tensors():
    batch = PairCollator(pad_token_id=0)(ROWS)
    # rows: chosen 0, chosen 1, rejected 0, rejected 1
    expected_ids = [[5, 6, 7, 2, 0], [10, 11, 2, 0, 0], [5, 6, 8, 9, 2], [10, 2, 0, 0, 0]]
    expected_attention = [[1, 1, 1, 1, 0], [1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 0, 0, 0]]
    expected_completion = [[0, 0, 1, 1, 0], [0, 1, 1, 0, 0], [0, 0, 1, 1, 1], [0, 1, 0, 0, 0]]
    assert torch.equal(batch["input_ids"], torch.tensor(expected_ids))
    assert torch.equal(batch["attention_mask"], torch.tensor(expected_attention))
    assert torch.equal(batch["completion_mask"], torch.tensor(expected_completion).bool())
    assert torch.equal(batch["index"], torch.tensor([0, 1]))
    assert torch.equal(batch["score_chosen"], torch.tensor([0.9, 3.0]))
    assert torch.equal(batch["score_rejected"], torch.tensor([0.4, 1.0]))
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert batch["completion_mask"].dtype == torch.bool
    assert batch["score_chosen"].dtype == torch.float32


def test_collator_pads_to_multiple_and_omits_missing_scores():
    rows = [{k: v for k, v in row.items() if not k.startswith("score")} for row in ROWS]
    batch = PairCollator(pad_token_id=99, pad_to_multiple_of=4)(rows)
    assert batch["input_ids"].shape == (4, 8)
    assert torch.equal(batch["input_ids"][3], torch.tensor([10, 2, 99, 99, 99, 99, 99, 99]))
    assert batch["attention_mask"][:, 5:].sum() == 0
    assert set(batch) == {"input_ids", "attention_mask", "completion_mask", "index"}


def test_collator_on_prepared_rows_through_a_dataloader(tiny_tokenizer):
    pairs = [
        {"prompt": "Hello there!", "chosen": " I am fine.", "rejected": " no"},
        {"prompt": "The quick brown fox", "chosen": " jumps.", "rejected": " sleeps over there."},
        {"prompt": "Hi", "chosen": " yes", "rejected": " maybe"},
    ]
    prepared = prepare_pairs(pairs, tiny_tokenizer)
    pad = resolve_pad_token_id(tiny_tokenizer)
    loader = DataLoader(prepared.dataset, batch_size=2, collate_fn=PairCollator(pad))
    batches = list(loader)
    assert [b["index"].tolist() for b in batches] == [[0, 1], [2]]
    first = batches[0]
    for i, row in enumerate(prepared.dataset.select([0, 1])):
        for offset, key in ((0, "chosen_input_ids"), (2, "rejected_input_ids")):
            n = len(row["prompt_input_ids"]) + len(row[key])
            assert first["input_ids"][i + offset, :n].tolist() == row["prompt_input_ids"] + row[key]
            assert first["completion_mask"][i + offset].sum() == len(row[key])
            assert first["attention_mask"][i + offset].sum() == n


def test_train_eval_split_is_deterministic_disjoint_and_reindexed(tiny_tokenizer):
    pairs = [{"prompt": f"Hi {i}", "chosen": " yes", "rejected": " no"} for i in range(20)]
    prepared = prepare_pairs(pairs, tiny_tokenizer)
    prompts = list(prepared.dataset["prompt_input_ids"])
    train, held_out = train_eval_split(prepared, 0.25, seed=3)
    again_train, again_eval = train_eval_split(prepared, 0.25, seed=3)
    assert (len(train), len(held_out)) == (15, 5)
    train_prompts = list(train.dataset["prompt_input_ids"])
    eval_prompts = list(held_out.dataset["prompt_input_ids"])
    assert eval_prompts == list(again_eval.dataset["prompt_input_ids"])
    assert train_prompts == list(again_train.dataset["prompt_input_ids"])
    # Disjoint, complete, original order kept.
    positions = sorted(prompts.index(p) for p in train_prompts + eval_prompts)
    assert positions == list(range(20))
    assert [prompts.index(p) for p in eval_prompts] == sorted(
        prompts.index(p) for p in eval_prompts
    )
    # Each part is re-indexed for its own per-row tables and has its own fingerprint.
    assert list(train.dataset["index"]) == list(range(15))
    assert list(held_out.dataset["index"]) == list(range(5))
    assert len({prepared.fingerprint, train.fingerprint, held_out.fingerprint}) == 3
    assert train.fingerprint == again_train.fingerprint
    assert "[eval split: 5 of 20 rows]" in held_out.summary.format()
    other_eval = train_eval_split(prepared, 0.25, seed=4)[1].dataset["prompt_input_ids"]
    assert list(other_eval) != eval_prompts
    # A plain dataset splits the same way.
    plain_train, plain_eval = train_eval_split(prepared.dataset, 0.25, seed=3)
    assert list(plain_eval["prompt_input_ids"]) == eval_prompts
    assert list(plain_eval["index"]) == list(range(5))
    with pytest.raises(ValueError, match="eval_fraction"):
        train_eval_split(prepared, 0.0, seed=0)
