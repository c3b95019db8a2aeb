"""What the engine runs for each kind of data a method trains on.

The engine looks a method's ``spec.data`` up here and never asks for a method by name: a
:class:`Procedure` says how to prepare rows, collate a batch and compute one micro-batch's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dpokit.data import PairCollator, prepare_pairs
from dpokit.procedures.pairwise import StepContext, StepOutput, pairwise_step


@dataclass(frozen=True)
class Procedure:
    prepare: Callable  # (source, tokenizer, DataConfig, split) -> PreparedData
    collator: Callable  # (pad_token_id) -> collate_fn
    step: Callable[[StepContext, dict], StepOutput]


PROCEDURES: dict[str, Procedure] = {
    "pairs": Procedure(prepare=prepare_pairs, collator=PairCollator, step=pairwise_step),
}

# Methods that are more than one training run (self-play rounds, staged references) name a driver
# in ``spec.procedure``; a driver takes the TrainConfig and runs the Trainer as often as it needs.
DRIVERS: dict[str, Callable] = {}


def procedure_for(spec) -> Procedure:
    if spec.data not in PROCEDURES:
        raise NotImplementedError(
            f"method {spec.name} trains on {spec.data!r} data, which `dpokit train` does not "
            f"support yet; trainable methods: the pairwise ones"
        )
    return PROCEDURES[spec.data]


__all__ = [
    "DRIVERS",
    "PROCEDURES",
    "Procedure",
    "StepContext",
    "StepOutput",
    "pairwise_step",
    "procedure_for",
]
