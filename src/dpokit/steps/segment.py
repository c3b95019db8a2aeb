"""Segment-level DPO (SDPO, Kong et al. 2025, arXiv:2501.01821): DPO on one segment of a dialogue.

    loss = -log sigmoid(beta * (rho_w - rho_l)),   rho = sum over the segment's ASSISTANT tokens of
                                                         log pi_theta(t | ...) - log pi_ref(t | ...)

Chosen and rejected sessions share the dialogue up to the first differing assistant turn e and
end at the same turn k; the shared history and the partner's turns inside [e, k] are context.
Nothing here is new code for the loss: :mod:`dpokit.data.multiturn` tokenizes each session turn by
turn and builds a completion mask that is True exactly on the segment's assistant tokens (each
turn's EOS included), and :class:`~dpokit.data.multiturn.SegmentCollator` emits
:class:`~dpokit.data.PairCollator`'s batch with that non-contiguous mask. The pairwise step
(:func:`~dpokit.steps.pairwise.pairwise_batch_loss`) then computes DPO unchanged: the scorer sums
the log-probs of exactly the masked tokens (it gathers position t-1 for every masked token t, so
gaps in the mask are fine), and a pre-computed reference table stores (chosen, rejected) segment
log-probs per row as it does for pairs.
"""

from __future__ import annotations

from dpokit.data.multiturn import SegmentCollator, prepare_segments
from dpokit.steps.base import Procedure
from dpokit.steps.pairwise import pairwise_batch_loss

# Multi-turn pairs: segment masks from the data layer, DPO from the pairwise step.
SEGMENT_STEP = Procedure(
    prepare=prepare_segments, collator=SegmentCollator, batch_loss=pairwise_batch_loss
)
