"""Loss functions of the DPO family and the method table the engine reads.

One module per method, each a pure function of per-sequence tensors returning a
:class:`LossOutput`; :data:`METHODS` maps a method name to its :class:`MethodSpec`. Segment-level
DPO (``segment_dpo``) and stepwise DPO (``stepwise_dpo``) use :func:`dpo_loss` on other inputs
(segment-masked log-probs; a reference that moves between data chunks), and SPIN calls it with
``beta=lam``: there is one DPO loss in the code base.
"""

from dpokit.losses.aot import aot_loss, aot_unpaired_loss
from dpokit.losses.apo import apo_down_loss, apo_zero_loss
from dpokit.losses.base import LossInputs, LossOutput, check_same_shape
from dpokit.losses.bco import RewardBaseline, bco_pair_loss
from dpokit.losses.cdpo import cdpo_loss
from dpokit.losses.combine import combine_losses
from dpokit.losses.cpo import cpo_loss
from dpokit.losses.discopop import discopop_loss
from dpokit.losses.dpo import dpo_loss
from dpokit.losses.dpop import dpop_loss
from dpokit.losses.exo import exo_pair_loss
from dpokit.losses.hinge import hinge_loss
from dpokit.losses.hyperparameters import Hyperparameter, resolve_hyperparameters
from dpokit.losses.ipo import ipo_loss
from dpokit.losses.kto import kto_kl_baseline, kto_loss, kto_weight_balance
from dpokit.losses.listing import format_methods
from dpokit.losses.nca import nca_pair_loss
from dpokit.losses.nll import add_chosen_nll, chosen_nll_term
from dpokit.losses.odpo import odpo_data_kl, odpo_loss, odpo_offsets, odpo_valid_pairs
from dpokit.losses.orpo import orpo_loss
from dpokit.losses.rdpo import rdpo_loss
from dpokit.losses.registry import METHODS, MethodSpec, get_method
from dpokit.losses.sigmoid_norm import sigmoid_norm_loss
from dpokit.losses.simpo import simpo_loss
from dpokit.losses.slic import slic_loss
from dpokit.losses.spin import spin_loss
from dpokit.losses.sppo import sppo_hard_loss
from dpokit.losses.tdpo import sequence_kl, tdpo_loss

__all__ = [
    "METHODS",
    "Hyperparameter",
    "LossInputs",
    "LossOutput",
    "MethodSpec",
    "RewardBaseline",
    "add_chosen_nll",
    "aot_loss",
    "aot_unpaired_loss",
    "apo_down_loss",
    "apo_zero_loss",
    "bco_pair_loss",
    "cdpo_loss",
    "check_same_shape",
    "chosen_nll_term",
    "combine_losses",
    "cpo_loss",
    "discopop_loss",
    "dpo_loss",
    "dpop_loss",
    "exo_pair_loss",
    "format_methods",
    "get_method",
    "hinge_loss",
    "ipo_loss",
    "kto_kl_baseline",
    "kto_loss",
    "kto_weight_balance",
    "nca_pair_loss",
    "odpo_data_kl",
    "odpo_loss",
    "odpo_offsets",
    "odpo_valid_pairs",
    "orpo_loss",
    "rdpo_loss",
    "resolve_hyperparameters",
    "sequence_kl",
    "sigmoid_norm_loss",
    "simpo_loss",
    "slic_loss",
    "spin_loss",
    "sppo_hard_loss",
    "tdpo_loss",
]
