"""What the engine runs for each kind of data a method trains on.

The engine looks a method's ``spec.procedure`` (when registered here, e.g. SLiC's sampled target)
or else its ``spec.data`` up here and never asks for a method by name: a :class:`Procedure` says
how to prepare rows, collate a batch and compute one micro-batch's loss.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from dpokit.data import PairCollator, prepare_pairs
from dpokit.data.packing import pair_collator
from dpokit.procedures.kto import KTO_PARTS
from dpokit.procedures.pairwise import StepContext, StepOutput, pairwise_step
from dpokit.procedures.segment import SEGMENT_PARTS
from dpokit.procedures.slic import SLIC_PARTS
from dpokit.procedures.spin import run_spin
from dpokit.procedures.stepwise import run_stepwise


@dataclass(frozen=True)
class Procedure:
    prepare: Callable  # (source, tokenizer, DataConfig, split) -> PreparedData
    collator: Callable  # (pad_token_id) -> collate_fn
    step: Callable[[StepContext, dict], StepOutput]
    # Optional hooks the Trainer calls: `check(config, spec)` before anything loads (refuse a
    # config the procedure cannot run); `setup(trainer)` once data and policy exist, before the
    # data loaders are built (data warnings, extra columns such as SLiC's sampled targets).
    check: Callable | None = None
    setup: Callable | None = None
    # `packed_collator(pad_token_id, packing, packing_length, attention_cost=...)` for
    # config.packing other than "none" (dpokit.data.packing; attention_cost is for "auto");
    # None: this kind of data is collated one way only.
    packed_collator: Callable | None = None


PROCEDURES: dict[str, Procedure] = {
    "pairs": Procedure(
        prepare=prepare_pairs,
        collator=PairCollator,
        step=pairwise_step,
        packed_collator=pair_collator,
    ),
    "unpaired": Procedure(**KTO_PARTS),  # KTO
    "multiturn_pairs": Procedure(**SEGMENT_PARTS),  # segment DPO
    "slic_target": Procedure(**SLIC_PARTS),  # SLiC-HF (y_ref = chosen or a reference sample)
}

# Methods that are more than one training run (self-play rounds, staged references) name a driver
# in ``spec.procedure``; a driver takes the TrainConfig and runs the Trainer as often as it needs.
DRIVERS: dict[str, Callable] = {"spin": run_spin, "stepwise": run_stepwise}


def procedure_for(spec) -> Procedure:
    if spec.procedure in PROCEDURES:
        return PROCEDURES[spec.procedure]
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
