"""PairCollator: prepared rows -> one padded batch, chosen rows first, then rejected rows."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch


class PairCollator:
    """Collate prepared pair rows for one forward pass over chosen and rejected together.

    Returns (B = number of rows, T = longest prompt + completion, rounded up to
    ``pad_to_multiple_of``), right-padded with ``pad_token_id``:

    - ``input_ids`` (2B, T) long: rows 0..B-1 are prompt + chosen, rows B..2B-1 prompt + rejected.
    - ``attention_mask`` (2B, T) long: 1 on real tokens.
    - ``completion_mask`` (2B, T) bool: True where the TOKEN is a completion token. The log-prob of
      token t is predicted at position t-1; the scorer shifts, this mask is not shifted.
    - ``index`` (B,) long: each row's index in the prepared dataset.
    - ``score_chosen``, ``score_rejected`` (B,) float32: when the rows carry scores.
    """

    def __init__(self, pad_token_id: int, pad_to_multiple_of: int | None = None) -> None:
        if pad_token_id is None:
            raise ValueError("pad_token_id is None: use resolve_pad_token_id(tokenizer)")
        if pad_to_multiple_of is not None and pad_to_multiple_of < 1:
            raise ValueError(f"pad_to_multiple_of must be >= 1, got {pad_to_multiple_of}")
        self.pad_token_id = int(pad_token_id)
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        prompts = [as_long_tensor(row["prompt_input_ids"]) for row in rows]
        completions = [as_long_tensor(row["chosen_input_ids"]) for row in rows]
        completions += [as_long_tensor(row["rejected_input_ids"]) for row in rows]
        prompts = prompts + prompts
        length = max(len(p) + len(c) for p, c in zip(prompts, completions, strict=True))
        length = self._round_up(length)
        input_ids = torch.full((len(prompts), length), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), length), dtype=torch.long)
        completion_mask = torch.zeros((len(prompts), length), dtype=torch.bool)
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            start, end = len(prompt), len(prompt) + len(completion)
            input_ids[i, :start] = prompt
            input_ids[i, start:end] = completion
            attention_mask[i, :end] = 1
            completion_mask[i, start:end] = True
        batch = {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "completion_mask": completion_mask,
            "index": torch.tensor([int(row["index"]) for row in rows], dtype=torch.long),
        }
        for key in ("score_chosen", "score_rejected"):
            if all(row.get(key) is not None for row in rows):
                batch[key] = torch.tensor([float(row[key]) for row in rows], dtype=torch.float32)
        return batch

    def _round_up(self, length: int) -> int:
        multiple = self.pad_to_multiple_of
        return length if not multiple else -(-length // multiple) * multiple


def resolve_pad_token_id(tokenizer) -> int:
    """The tokenizer's pad id, else its EOS id (masks, not pad ids, mark real tokens)."""
    for token_id in (tokenizer.pad_token_id, tokenizer.eos_token_id):
        if token_id is not None:
            return int(token_id)
    raise ValueError("the tokenizer has neither a pad_token nor an eos_token")


def as_long_tensor(values) -> torch.Tensor:
    """Token ids (a list or an array) as a 1-D ``torch.long`` tensor."""
    return torch.as_tensor(values, dtype=torch.long)
