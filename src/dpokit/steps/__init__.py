"""Per-batch steps: what the engine runs for one micro-batch of each kind of data.

This layer sits BELOW the engine: it imports data, losses, log-probs and the reference models,
never :mod:`dpokit.engine` or :mod:`dpokit.recipes`. A method's table entry names its step
(``spec.step``), and the engine looks it up here; it never asks for a method by name.

==========  =======================================================================
``step``    serves
==========  =======================================================================
pairwise    DPO, DPOP, IPO, SimPO, ODPO, rDPO, TDPO1/2, the catalogue (cdpo ... cpo_simpo),
            combined (and each run of SPIN, sDPO)
kto         KTO_STEP: unpaired examples, reference point z0 from mismatched pairs
slic        SLiC-HF: pairs plus the regularizer's target y_ref (chosen or sampled)
segment     segment DPO: multi-turn pairs, log-probs over one segment's agent turns
sft         supervised fine-tuning (``dpokit sft``; not a preference method)
==========  =======================================================================

:mod:`dpokit.steps.baseline` holds the engine's running reward baseline (BCO), passed to a step as
``StepContext.reward_baseline``.
"""

from __future__ import annotations

from dpokit.losses import MethodSpec
from dpokit.steps.base import Procedure, StepContext, StepOutput, batch_rows, resolve_packing
from dpokit.steps.kto import KTO_STEP
from dpokit.steps.pairwise import PAIRWISE_STEP, pairwise_batch_loss
from dpokit.steps.segment import SEGMENT_STEP
from dpokit.steps.sft import SFT_STEP
from dpokit.steps.slic import SLIC_STEP

STEPS: dict[str, Procedure] = {
    "pairwise": PAIRWISE_STEP,
    "kto": KTO_STEP,
    "slic": SLIC_STEP,
    "segment": SEGMENT_STEP,
    "sft": SFT_STEP,
}


def procedure_for(spec: MethodSpec) -> Procedure:
    """The :class:`Procedure` of ``spec.step``.

    Raises ``KeyError`` naming the known steps when the table names an unknown one.
    """
    if spec.step not in STEPS:
        raise KeyError(f"method {spec.name}: no step {spec.step!r}; known: {', '.join(STEPS)}")
    return STEPS[spec.step]


__all__ = [
    "STEPS",
    "Procedure",
    "StepContext",
    "StepOutput",
    "batch_rows",
    "pairwise_batch_loss",
    "procedure_for",
    "resolve_packing",
]
