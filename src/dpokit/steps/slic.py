"""SLiC-HF's regularization target y_ref: the chosen answer, or a sample of the reference model.

    loss = max(0, delta - logp(y_w) + logp(y_l)) - lam * logp(y_ref)

With ``target=chosen`` (default, the "direct" variant) y_ref = y_w and SLiC trains as any pairwise
method. With ``target=reference_sample`` (the seed's variant) y_ref is drawn from the reference
(SFT) model -- ``--reference PATH``, else the starting policy -- once per prompt before training
(ancestral sampling at ``temperature``, at most ``max_new_tokens`` and ``max_length`` tokens), with
:func:`dpokit.generation.generate_completions`. The samples are cached in the run directory
(``RUN_DIR/reference_samples/<split>.jsonl`` with its checksum, keyed by the model, the data and
the sampling settings), so a resumed run trains on the same targets; a damaged file is reported,
removed and sampled again (:mod:`dpokit.cache`). A sample stops at any end token the model declares
(:func:`dpokit.generation.end_token_ids`: EOS, Llama-3's ``<|eot_id|>``, ...) and keeps it; one cut
by the length limit has none and is scored as it is.

Batches then carry the targets as a third block of rows (:class:`TargetPairCollator`): chosen,
rejected, target -- one forward for all three, and
:func:`~dpokit.steps.pairwise.pairwise_batch_loss` hands the third block to the loss as
``policy_target_logps``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from datasets import List, Value

from dpokit import jsonl
from dpokit.cache import read_verified, write_verified
from dpokit.data import PairCollator, prepare_pairs
from dpokit.data.packing import pair_collator
from dpokit.generation import generate_completions
from dpokit.hashing import derive_fingerprint, json_digest
from dpokit.modeling import is_peft_model, load_model, loading_kwargs
from dpokit.reference_cache import model_identity
from dpokit.steps.base import Procedure
from dpokit.steps.pairwise import pairwise_batch_loss

logger = logging.getLogger("dpokit")

TARGET_COLUMN = "target_input_ids"
SAMPLES_DIR = "reference_samples"
SAMPLES_VERSION = 1


class TargetPairCollator(PairCollator):
    """:class:`~dpokit.data.PairCollator`, plus the y_ref rows when the data carry them.

    Without ``target_input_ids`` in the rows: exactly PairCollator's batch. With them,
    ``input_ids``/``attention_mask``/``completion_mask`` are (3B, T): chosen rows, rejected rows,
    then prompt_i + target_i.
    """

    def __call__(self, rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        batch = super().__call__(rows)
        if not rows or TARGET_COLUMN not in rows[0]:
            return batch
        prompts = [list(row["prompt_input_ids"]) for row in rows]
        targets = [list(row[TARGET_COLUMN]) for row in rows]
        width = max(len(p) + len(t) for p, t in zip(prompts, targets, strict=True))
        width = self._round_up(max(width, batch["input_ids"].shape[1]))
        target_rows = _right_padded(prompts, targets, width, self.pad_token_id)
        for key, value in (("input_ids", self.pad_token_id), ("attention_mask", 0)):
            batch[key] = torch.cat([_pad_to(batch[key], width, value), target_rows[key]])
        batch["completion_mask"] = torch.cat(
            [_pad_to(batch["completion_mask"], width, False), target_rows["completion_mask"]]
        )
        return batch


def packed_target_collator(
    pad_token_id: int, packing: str, packing_length: int | None = None, attention_cost: float = 0.0
):
    """``packing`` layouts (dpokit.data.packing) for y_ref = chosen; rows that carry sampled
    targets have no packed layout and are collated by :class:`TargetPairCollator`."""
    packed = pair_collator(pad_token_id, packing, packing_length, attention_cost=attention_cost)
    plain = TargetPairCollator(pad_token_id)

    def collate(rows: Sequence[Mapping]) -> dict[str, torch.Tensor]:
        return plain(rows) if rows and TARGET_COLUMN in rows[0] else packed(rows)

    return collate


def _pad_to(tensor: torch.Tensor, width: int, value) -> torch.Tensor:
    return F.pad(tensor, (0, width - tensor.shape[1]), value=value)


def _right_padded(prompts, completions, width: int, pad_token_id: int) -> dict[str, torch.Tensor]:
    """prompt + completion rows, right-padded to ``width``. (B, width) each."""
    n = len(prompts)
    input_ids = torch.full((n, width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((n, width), dtype=torch.long)
    completion_mask = torch.zeros((n, width), dtype=torch.bool)
    for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
        start, end = len(prompt), len(prompt) + len(completion)
        input_ids[i, :end] = torch.tensor(prompt + completion, dtype=torch.long)
        attention_mask[i, :end] = 1
        completion_mask[i, start:end] = True
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "completion_mask": completion_mask,
    }


# ---- sampling y_ref -----------------------------------------------------------------------------


def attach_reference_samples(trainer) -> None:
    """Trainer setup hook: with ``target=reference_sample``, give every split a target column."""
    if trainer.hyperparameters.get("target") != "reference_sample":
        return
    for split, data in (("train", trainer.train_data), ("eval", trainer.eval_data)):
        if data is None:
            continue
        targets = reference_samples(trainer, data, split)
        data.dataset = data.dataset.add_column(
            TARGET_COLUMN,
            targets,
            feature=List(Value("int32")),
            new_fingerprint=derive_fingerprint(data.fingerprint, samples_key(trainer, data)),
        )


def samples_key(trainer, data) -> str:
    """What decides the samples: the sampling model's weights, the data, the settings."""
    config, hp = trainer.config, trainer.hyperparameters
    return json_digest(
        {
            "version": SAMPLES_VERSION,
            "model": model_identity(config.reference or config.model),
            "data": data.fingerprint,
            "max_length": config.max_length,
            "seed": config.seed,
            "sampling": {k: hp[k] for k in ("temperature", "max_new_tokens")},
        }
    )


def reference_samples(trainer, data, split: str) -> list[list[int]]:
    """One sample of the reference model per row of ``data``: from the run's cache, else drawn
    (by the main process first; the others then read its file)."""
    path = Path(trainer.config.output_dir) / SAMPLES_DIR / f"{split}.jsonl"
    key = samples_key(trainer, data)
    with trainer.accelerator.main_process_first():
        cached = load_samples(path, key, len(data.dataset))
        if cached is not None:
            logger.info("SLiC y_ref: %d %s samples from %s", len(cached), split, path)
            return cached
        targets = draw_samples(trainer, data)
        if trainer.accelerator.is_main_process:
            save_samples(path, key, targets)
            logger.info(
                "SLiC y_ref: sampled %d %s targets, cached in %s", len(targets), split, path
            )
    return targets


def draw_samples(trainer, data) -> list[list[int]]:
    """Sample y_ref for every prompt of ``data`` from the reference model (no gradient)."""
    config, hp = trainer.config, trainer.hyperparameters
    device = trainer.accelerator.device
    if config.reference is not None:
        loading = loading_kwargs(config)
        model, switch = (
            load_model(config.reference, trainer.dtype, loading=loading).to(device),
            None,
        )
    else:
        model = trainer.policy.model.to(device)  # the starting policy, before any step
        switch = model.disable_adapter() if is_peft_model(model) else None  # LoRA: the base
    prompts = [list(ids) for ids in data.dataset["prompt_input_ids"]]
    # prompt + target <= max_length (None: no bound, max_new_tokens only)
    budgets = [(config.max_length or len(p) + hp["max_new_tokens"]) - len(p) for p in prompts]
    with switch or contextlib.nullcontext():
        targets = generate_completions(
            model,
            trainer.tokenizer,
            prompts,
            max_new_tokens=max(1, min(hp["max_new_tokens"], max(budgets))),
            temperature=hp["temperature"],
            top_p=1.0,
            batch_size=hp["generation_batch_size"],
            seed=config.seed,
            do_sample=hp["temperature"] > 0,
        )
    return [target[:budget] for target, budget in zip(targets, budgets, strict=True)]


SAMPLES_CACHE = "SLiC reference samples"


def load_samples(path: Path, key: str, rows: int) -> list[list[int]] | None:
    """The cached y_ref token ids of ``path`` when they match their checksum
    (:mod:`dpokit.cache`: a damaged file is reported in one line and removed) and were made for
    ``key`` and ``rows`` rows, else None."""
    data = read_verified(path, SAMPLES_CACHE)
    if data is None:
        return None
    header, *targets = jsonl.parse(data, str(path))
    if header.get("key") != key or header.get("rows") != rows or len(targets) != rows:
        logger.info("SLiC y_ref: %s is for other data or settings; sampling again", path)
        return None
    return targets


def save_samples(path: Path, key: str, targets: list[list[int]]) -> None:
    """Atomic, with a checksum: a killed run leaves the old file or none, never half of one."""
    write_verified(path, jsonl.encode([{"key": key, "rows": len(targets)}, *targets]))


# Pairs plus, with target=reference_sample, a third block of rows: prompt + sampled y_ref.
SLIC_STEP = Procedure(
    prepare=prepare_pairs,
    collator=TargetPairCollator,
    batch_loss=pairwise_batch_loss,
    setup=attach_reference_samples,
    packed_collator=packed_target_collator,
)
