"""Loss functions of the DPO family and the method table the engine reads.

One module per method, each a pure function of per-sequence tensors returning a
:class:`LossOutput`; :data:`METHODS` maps a method name to its :class:`MethodSpec`. Segment-level
DPO (``segment_dpo``) and stepwise DPO (``stepwise_dpo``) use :func:`dpo_loss` on other inputs
(segment-masked log-probs; a reference that moves between data chunks), and SPIN calls it with
``beta=lam``: there is one DPO loss in the code base.
"""

from dpokit.losses.base import LossInputs, LossOutput, check_same_shape
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.dpop import dpop_loss
from dpokit.losses.hyperparameters import Hyperparameter, resolve_hyperparameters
from dpokit.losses.ipo import ipo_loss
from dpokit.losses.kto import kto_kl_baseline, kto_loss, kto_weight_balance
from dpokit.losses.listing import format_methods
from dpokit.losses.odpo import odpo_data_kl, odpo_loss, odpo_offsets, odpo_valid_pairs
from dpokit.losses.rdpo import rdpo_loss
from dpokit.losses.registry import METHODS, MethodSpec, get_method
from dpokit.losses.simpo import simpo_loss
from dpokit.losses.slic import slic_loss
from dpokit.losses.spin import spin_loss
from dpokit.losses.tdpo import sequence_kl, tdpo_loss

__all__ = [
    "METHODS",
    "Hyperparameter",
    "LossInputs",
    "LossOutput",
    "MethodSpec",
    "check_same_shape",
    "dpo_loss",
    "dpop_loss",
    "format_methods",
    "get_method",
    "ipo_loss",
    "kto_kl_baseline",
    "kto_loss",
    "kto_weight_balance",
    "odpo_data_kl",
    "odpo_loss",
    "odpo_offsets",
    "odpo_valid_pairs",
    "rdpo_loss",
    "resolve_hyperparameters",
    "sequence_kl",
    "simpo_loss",
    "slic_loss",
    "spin_loss",
    "tdpo_loss",
]
