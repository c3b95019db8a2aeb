"""Packed layouts of preference pairs: fewer padded tokens per forward, the same log-probs.

:class:`~dpokit.data.PairCollator` puts each pair in two rows, ``prompt + chosen`` and
``prompt + rejected``, right-padded to the longest row: the prompt is encoded twice and every row
pays for the longest one. Two other layouts score exactly the same tokens in the same contexts:

``shared_prompt`` - one row per pair, the prompt encoded once::

    tokens     p0 p1 p2 | p3 c0 c1 c2 | p3 r0 r1 | pad
    positions   0  1  2 |  3  4  5  6 |  3  4  5 |  0
    branch      0  0  0 |  1  1  1  1 |  2  2  2 |  0
    segment     0  0  0 |  0  0  0  0 |  0  0  0 | -1

  Token i attends to token j iff j <= i, both are in the same segment, and j is in the shared
  prefix (branch 0) or in i's own branch. The prompt's last token is repeated at the head of each
  branch, so "the hidden state at t-1 predicts token t" still holds for every completion token and
  each branch sees exactly the keys (with the same positions) it sees in the two-row form.

``padding_free`` - the 2B sequences of the two-row form laid end to end in as few rows as fit
  ``packing_length`` tokens (all in one row by default), position ids restarting at 0 for each
  sequence. Attention stays within a sequence: the model reads the sequence boundaries from the
  position ids (transformers' packed-sequence masks; flash-attention's varlen kernels on GPU).

Every layout returns the keys of :class:`~dpokit.data.PairCollator` (``input_ids``,
``attention_mask`` = 1 on real tokens, ``completion_mask``, ``index``, scores) plus

- ``position_ids`` (R, L) long;
- ``sequence_ids`` (R, L) long: the output sequence each completion token is scored into, chosen
  sequences 0..B-1 then rejected B..2B-1 as in the two-row form (-1 on other tokens), so the
  scorer still returns (2B,) log-probs in chosen-then-rejected order;
- ``segment_ids`` and ``branch_ids`` (R, L) long, from which the scorer builds the (R, 1, L, L)
  attention mask on the device (:func:`packed_attention_mask`); padding_free has
  no branches, so with flash-attention the scorer passes position ids alone (varlen kernels).
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence

import torch
from torch.utils.data import Sampler

from .collate import PairCollator, as_long_tensor

PACKING_MODES = ("auto", "none", "shared_prompt", "padding_free")

__all__ = [
    "PACKING_MODES",
    "AutoPairCollator",
    "LengthGroupedSampler",
    "PaddingFreeCollator",
    "SharedPromptCollator",
    "attention_cost",
    "packed_attention_mask",
    "pair_collator",
    "padding_fraction",
    "row_lengths",
]


def pair_collator(
    pad_token_id: int,
    packing: str = "none",
    packing_length: int | None = None,
    pad_to_multiple_of: int | None = None,
    attention_cost: float = 0.0,
):
    """The collate function for pairs in layout ``packing`` (one of :data:`PACKING_MODES`);
    ``attention_cost`` is for ``auto`` (see :class:`AutoPairCollator`)."""
    if packing == "auto":
        return AutoPairCollator(pad_token_id, attention_cost, pad_to_multiple_of)
    if packing == "none":
        return PairCollator(pad_token_id, pad_to_multiple_of)
    if packing == "shared_prompt":
        return SharedPromptCollator(pad_token_id, pad_to_multiple_of)
    if packing == "padding_free":
        return PaddingFreeCollator(pad_token_id, packing_length, pad_to_multiple_of)
    raise ValueError(f"packing={packing!r} is not one of: {', '.join(PACKING_MODES)}")


def padding_fraction(batch: Mapping[str, torch.Tensor]) -> float:
    """Share of the (R, L) token slots of a batch that hold padding: 1 - real tokens / (R x L).
    NaN (left out of the step's mean) for a batch without ``input_ids``/``attention_mask``."""
    if batch.get("input_ids") is None or batch.get("attention_mask") is None:
        return float("nan")
    slots = batch["input_ids"].numel()
    return 1.0 - float(batch["attention_mask"].sum()) / max(slots, 1)


class _PackedBatch:
    """(R, L) buffers filled span by span; padding gets position 0 and segment -1."""

    def __init__(self, rows: int, length: int, pad_token_id: int):
        shape = (rows, length)
        self.input_ids = torch.full(shape, pad_token_id, dtype=torch.long)
        self.attention_mask = torch.zeros(shape, dtype=torch.long)
        self.completion_mask = torch.zeros(shape, dtype=torch.bool)
        self.position_ids = torch.zeros(shape, dtype=torch.long)
        self.sequence_ids = torch.full(shape, -1, dtype=torch.long)
        self.segment_ids = torch.full(shape, -1, dtype=torch.long)
        self.branch_ids = torch.zeros(shape, dtype=torch.long)

    def put(self, row, start, ids, first_position, segment, branch=0, sequence=None) -> int:
        """Write ``ids`` at (row, start:); a ``sequence`` id marks them as scored. Returns end."""
        end = start + len(ids)
        span = (row, slice(start, end))
        self.input_ids[span] = ids
        self.attention_mask[span] = 1
        self.position_ids[span] = torch.arange(first_position, first_position + len(ids))
        self.segment_ids[span] = segment
        self.branch_ids[span] = branch
        if sequence is not None:
            self.completion_mask[span] = True
            self.sequence_ids[span] = sequence
        return end

    def to_dict(self, keys: Sequence[str]) -> dict[str, torch.Tensor]:
        return {key: getattr(self, key) for key in keys}


def _add_row_keys(batch: dict, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
    """``index`` (B,) and, when every row has them, ``score_chosen``/``score_rejected`` (B,)."""
    batch["index"] = torch.tensor([int(row["index"]) for row in rows], dtype=torch.long)
    for key in ("score_chosen", "score_rejected"):
        if all(row.get(key) is not None for row in rows):
            batch[key] = torch.tensor([float(row[key]) for row in rows], dtype=torch.float32)
    return batch


PACKED_KEYS = (
    "input_ids",
    "attention_mask",
    "completion_mask",
    "position_ids",
    "sequence_ids",
    "segment_ids",
    "branch_ids",
)


class SharedPromptCollator(PairCollator):
    """One row per pair: ``prompt[:-1] | prompt[-1] chosen | prompt[-1] rejected`` (see module).

    Output (R = B rows, L = longest row, rounded up to ``pad_to_multiple_of``): the PairCollator
    keys plus ``position_ids``, ``sequence_ids``, ``segment_ids``, ``branch_ids``.
    """

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        pairs = len(rows)
        parts = [
            (
                as_long_tensor(r["prompt_input_ids"]),
                as_long_tensor(r["chosen_input_ids"]),
                as_long_tensor(r["rejected_input_ids"]),
            )
            for r in rows
        ]
        # prompt + 1 + chosen + 1 + rejected - 1: the prompt's last token appears twice.
        length = max(len(p) + len(c) + len(r) + 1 for p, c, r in parts)
        packed = _PackedBatch(pairs, self._round_up(length), self.pad_token_id)
        for b, (prompt, chosen, rejected) in enumerate(parts):
            prefix, last = prompt[:-1], prompt[-1:]
            end = packed.put(b, 0, prefix, 0, segment=0)
            for branch, completion, sequence in ((1, chosen, b), (2, rejected, pairs + b)):
                end = packed.put(b, end, last, len(prefix), segment=0, branch=branch)
                end = packed.put(b, end, completion, len(prompt), 0, branch, sequence)
        return _add_row_keys(packed.to_dict(PACKED_KEYS), rows)


class PaddingFreeCollator(PairCollator):
    """The 2B sequences of the two-row form end to end, position ids restarting per sequence.

    Sequences are placed first-fit, longest first, into rows of ``packing_length`` tokens (None:
    one row holding everything; a sequence longer than ``packing_length`` gets a row of its own).
    Output: the PairCollator keys plus ``position_ids``, ``sequence_ids``, ``segment_ids`` (one
    per sequence) and ``branch_ids`` (all 0).
    """

    def __init__(
        self,
        pad_token_id: int,
        packing_length: int | None = None,
        pad_to_multiple_of: int | None = None,
    ) -> None:
        super().__init__(pad_token_id, pad_to_multiple_of)
        if packing_length is not None and packing_length < 1:
            raise ValueError(f"packing_length must be >= 1, got {packing_length}")
        self.packing_length = packing_length

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        if not rows:
            raise ValueError("cannot collate an empty batch")
        prompts = [as_long_tensor(row["prompt_input_ids"]) for row in rows]
        completions = [as_long_tensor(row["chosen_input_ids"]) for row in rows]
        completions += [as_long_tensor(row["rejected_input_ids"]) for row in rows]
        sequences = list(zip(prompts + prompts, completions, strict=True))  # id = position here
        sizes = [len(p) + len(c) for p, c in sequences]
        bins = first_fit_decreasing(sizes, self.packing_length or sum(sizes))
        length = self._round_up(max(sum(sizes[i] for i in members) for members in bins))
        packed = _PackedBatch(len(bins), length, self.pad_token_id)
        for row, members in enumerate(bins):
            end = 0
            for sequence in members:
                prompt, completion = sequences[sequence]
                end = packed.put(row, end, prompt, 0, segment=sequence)
                end = packed.put(row, end, completion, len(prompt), sequence, 0, sequence)
        return _add_row_keys(packed.to_dict(PACKED_KEYS), rows)


def packed_attention_mask(
    segment_ids: torch.Tensor,
    branch_ids: torch.Tensor | None = None,
    position_ids: torch.Tensor | None = None,
    window: int | None = None,
) -> torch.Tensor:
    """(R, T) segment and branch ids -> (R, 1, T, T) bool mask, True where query i sees key j.

        mask[i, j] = j <= i and segment[j] == segment[i] and branch[j] in (0, branch[i])
                     [and position[i] - position[j] < window, when ``window`` is given]

    Branch 0 is a prefix shared by every branch of its segment (a pair's prompt); branches b > 0
    see the prefix and themselves only (chosen and rejected never see each other). Padding has a
    segment of its own, so every query sees at least itself and no softmax row is empty. The
    window is measured in (R, T) ``position_ids``, each sequence's own positions, which is the
    distance the model's sliding window cuts at (transformers: kv_idx > q_idx - window).
    """
    length = segment_ids.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool, device=segment_ids.device).tril()
    same = segment_ids[:, :, None] == segment_ids[:, None, :]  # (R, T, T)
    mask = same & causal
    if branch_ids is not None:
        key_branch = branch_ids[:, None, :]  # (R, 1, T)
        mask &= (key_branch == 0) | (key_branch == branch_ids[:, :, None])
    if window is not None:
        mask &= (position_ids[:, :, None] - position_ids[:, None, :]) < window
    return mask[:, None]  # (R, 1, T, T)


# Model types whose sliding-window layers take the window from the 4D mask dpokit passes, checked
# against the model's own two-row log-probs (tests/test_packing.py, tests/test_architectures.py).
# "all": the model applies one mask to every layer (all layers slide); "per_layer": transformers 5
# models taking {layer type: mask} (config.layer_types: Gemma-2 alternating, Gemma-3's pattern,
# Qwen2 from max_window_layers on). Other families with a window a row exceeds are refused.
WINDOW_MASKS = {
    "mistral": "all",
    "phi3": "all",
    "gemma2": "per_layer",
    "gemma3_text": "per_layer",
    "qwen2": "per_layer",
}


def _text_config(model_config):
    getter = getattr(model_config, "get_text_config", None)
    return getter() if getter is not None else model_config


def sliding_window(model_config) -> int | None:
    """Tokens a sliding-window layer of the model sees (the query included), or None when no
    layer slides (no ``sliding_window``, ``use_sliding_window`` false, no sliding layer type)."""
    config = _text_config(model_config)
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if not window or getattr(config, "use_sliding_window", True) is False:
        return None
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    return int(window)


def packed_window_problem(packing: str, model_config, longest: int) -> str | None:
    """Why ``packing`` cannot score this model exactly, or None. A problem: the model slides a
    window over some layers, a sequence (``longest`` tokens, prompt + completion) is longer than
    it, and the family is not one whose window dpokit puts into the packed mask (WINDOW_MASKS)."""
    window = sliding_window(model_config)
    model_type = getattr(_text_config(model_config), "model_type", None)
    if packing == "none" or window is None or longest <= window or model_type in WINDOW_MASKS:
        return None
    return (
        f"packing={packing}: {model_type} attends within a sliding window of {window} tokens and "
        f"the longest sequence has {longest} tokens; dpokit does not build a verified sliding "
        "window mask for this model family, so packed rows would attend past the window: use "
        "packing=none (two rows per pair) or packing=auto"
    )


def packed_attention_masks(
    model_config, segment_ids: torch.Tensor, branch_ids, position_ids: torch.Tensor
) -> torch.Tensor | dict[str, torch.Tensor]:
    """The packed mask(s) the model takes: one (R, 1, T, T) bool mask
    (:func:`packed_attention_mask`), with the window when every layer slides, or a dict
    {layer type: mask} when only some layers do. No window when no sequence reaches past it.

    Raises:
        ValueError: a sequence is longer than the window of a family not in WINDOW_MASKS, or
            a layer type other than full/sliding attention.
    """
    full = packed_attention_mask(segment_ids, branch_ids)
    window = sliding_window(model_config)
    if window is None or int(position_ids.max()) < window:  # positions 0..n-1: no cut
        return full
    config = _text_config(model_config)
    kind = WINDOW_MASKS.get(getattr(config, "model_type", None))
    if kind is None:
        longest = int(position_ids.max()) + 1
        raise ValueError(packed_window_problem("packed", model_config, longest))
    sliding = packed_attention_mask(segment_ids, branch_ids, position_ids, window)
    if kind == "all":
        return sliding
    masks = {"full_attention": full, "sliding_attention": sliding}
    unknown = set(config.layer_types) - set(masks)
    if unknown:
        raise ValueError(f"packed rows: no mask for layer types {sorted(unknown)}")
    return masks


def first_fit_decreasing(sizes: Sequence[int], capacity: int) -> list[list[int]]:
    """Indices of ``sizes`` grouped into bins of total <= ``capacity`` (an oversized item alone).

    Within a bin, indices are in increasing order, so packed rows read in the data's order.
    """
    bins: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(sizes)), key=lambda i: (-sizes[i], i)):
        for b, free in enumerate(room):
            if sizes[i] <= free:
                bins[b].append(i)
                room[b] -= sizes[i]
                break
        else:
            bins.append([i])
            room.append(capacity - sizes[i])
    return [sorted(members) for members in bins]


class AutoPairCollator(PairCollator):
    """Per batch, the cheaper of the two-row and the shared-prompt layout (both exact).

    The decoder's forward cost of a layout with rows of L_r tokens (padding included) is about

        sum_r L_r * (weights per layer) + sum_r L_r^2 * (attention per query-key pair)

    since attention under a custom mask is computed densely over each row. Sharing the prompt
    saves the second copy of the prompt's tokens but makes rows about twice as long, so it pays
    when prompts are long next to completions and attention is cheap next to the weights (wide
    models). ``attention_cost`` is the ratio of the two per-token costs (:func:`attention_cost`).
    """

    def __init__(self, pad_token_id: int, attention_cost: float, pad_to_multiple_of=None) -> None:
        super().__init__(pad_token_id, pad_to_multiple_of)
        self.attention_cost = attention_cost
        self.shared = SharedPromptCollator(pad_token_id, pad_to_multiple_of)

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return self.shared(rows) if self.prefers_shared(rows) else super().__call__(rows)

    def prefers_shared(self, rows: Sequence[Mapping]) -> bool:
        lengths = [
            (len(r["prompt_input_ids"]), len(r["chosen_input_ids"]), len(r["rejected_input_ids"]))
            for r in rows
        ]
        two_rows = self._round_up(max(p + max(c, j) for p, c, j in lengths))  # 2B rows
        shared = self._round_up(max(p + c + j + 1 for p, c, j in lengths))  # B rows
        cost_two_rows = 2 * len(rows) * (two_rows + self.attention_cost * two_rows**2)
        cost_shared = len(rows) * (shared + self.attention_cost * shared**2)
        return cost_shared < cost_two_rows


def attention_cost(model_config) -> float:
    """Forward FLOPs per query-key pair of attention over the FLOPs per token of one layer's
    weights: 4 x heads x head_dim / (2 x weights per layer). 0 if the config does not say."""
    config = (
        model_config.get_text_config() if hasattr(model_config, "get_text_config") else model_config
    )
    hidden = getattr(config, "hidden_size", None)
    heads = getattr(config, "num_attention_heads", None)
    inter = getattr(config, "intermediate_size", None)
    if not (hidden and heads and inter):
        return 0.0
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    weights = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim + 3 * hidden * inter
    return 4 * heads * head_dim / (2 * weights)


# --------------------------------------------------------------------------------------------------
# Length-grouped batching


def row_lengths(dataset) -> list[int]:
    """Tokens per row of a prepared dataset: the sum of every ``*input_ids`` column's lengths."""
    columns = [name for name in dataset.column_names if name.endswith("input_ids")]
    if not columns:
        raise ValueError("the dataset has no *input_ids columns to measure lengths with")
    table = dataset.with_format("arrow")[:]  # one Arrow table, no Python lists
    import pyarrow.compute as pc

    total = None
    for name in columns:
        lengths = pc.list_value_length(table.column(name))
        total = lengths if total is None else pc.add(total, lengths)
    return [int(x) for x in total.to_pylist()]


class LengthGroupedSampler(Sampler[int]):
    """Random order, but batches of similar length: less padding for the same randomness.

    Shuffle all rows with ``seed + epoch``, cut the order into mega-batches of
    ``batch_size * mega_batches`` rows, sort each mega-batch by length (longest first) and yield it;
    consecutive ``batch_size`` rows then have similar lengths. The longest batch is moved to the
    front so an out-of-memory error shows on the first step, not hours in. Every process draws the
    same order (accelerate then hands out the batches).
    """

    def __init__(self, lengths: Sequence[int], batch_size: int, seed: int = 0, mega_batches=50):
        if batch_size < 1 or mega_batches < 1:
            raise ValueError("batch_size and mega_batches must be >= 1")
        self.lengths = list(lengths)
        self.batch_size = batch_size
        self.seed = seed
        self.mega = batch_size * mega_batches
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.lengths)

    def __iter__(self):
        order = list(range(len(self.lengths)))
        random.Random(self.seed + self.epoch).shuffle(order)
        grouped = []
        for start in range(0, len(order), self.mega):
            mega = order[start : start + self.mega]
            grouped.extend(sorted(mega, key=lambda i: -self.lengths[i]))
        batches = [
            grouped[i : i + self.batch_size] for i in range(0, len(grouped), self.batch_size)
        ]
        if batches:
            longest = max(
                range(len(batches)), key=lambda b: max(self.lengths[i] for i in batches[b])
            )
            batches[0], batches[longest] = batches[longest], batches[0]
        return iter([i for batch in batches for i in batch])
