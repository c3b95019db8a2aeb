"""Bad hyperparameters and inputs raise ValueError naming the parameter and its valid range."""

from __future__ import annotations

import warnings

import pytest
import torch

from dpokit.losses import (
    check_same_shape,
    dpo_loss,
    dpop_loss,
    ipo_loss,
    kto_loss,
    odpo_loss,
    odpo_offsets,
    odpo_valid_pairs,
    rdpo_loss,
    sequence_kl,
    simpo_loss,
    slic_loss,
    spin_loss,
    tdpo_loss,
)
from dpokit.losses.kto import kto_weight_balance

X = torch.tensor([-10.0, -11.0])
Y = torch.tensor([-12.0, -13.0])
R = torch.tensor([-11.0, -12.0])
FOUR = (X, Y, R, R)
KL = torch.tensor([0.3, 0.5])
DESIRABLE = torch.tensor([True, False])

BAD_CALLS = {
    "dpo_beta_zero": (lambda: dpo_loss(*FOUR, beta=0.0), r"beta must be > 0"),
    "dpo_beta_negative": (lambda: dpo_loss(*FOUR, beta=-0.1), r"beta must be > 0"),
    "dpop_beta": (lambda: dpop_loss(*FOUR, beta=0.0), r"beta"),
    "dpop_lam": (lambda: dpop_loss(*FOUR, lam=-1.0), r"lam must be >= 0"),
    "rdpo_eps_half": (lambda: rdpo_loss(*FOUR, eps=0.5), r"eps must be in \[0, 0\.5\)"),
    "rdpo_eps_big": (lambda: rdpo_loss(*FOUR, eps=0.7), r"eps must be in \[0, 0\.5\)"),
    "rdpo_eps_negative": (lambda: rdpo_loss(*FOUR, eps=-0.1), r"eps must be in \[0, 0\.5\)"),
    "rdpo_eps_nan": (lambda: rdpo_loss(*FOUR, eps=float("nan")), r"eps"),
    "ipo_tau_zero": (lambda: ipo_loss(*FOUR, tau=0.0), r"tau must be > 0"),
    "ipo_tau_negative": (lambda: ipo_loss(*FOUR, tau=-1.0), r"tau must be > 0"),
    "odpo_beta": (lambda: odpo_loss(*FOUR, KL, beta=0.0), r"beta"),
    "odpo_tie": (
        lambda: odpo_offsets(torch.tensor([0.9, 0.5]), torch.tensor([0.4, 0.5])),
        r"score_chosen > score_rejected.*\[1\]",
    ),
    "odpo_reversed": (
        lambda: odpo_offsets(torch.tensor([0.1]), torch.tensor([0.4])),
        r"score_chosen > score_rejected",
    ),
    "odpo_ratio_nonpositive": (
        lambda: odpo_offsets(torch.tensor([0.5]), torch.tensor([-0.4]), form="ratio"),
        r"score_chosen > score_rejected > 0",
    ),
    "odpo_ratio_zero": (
        lambda: odpo_offsets(torch.tensor([0.5]), torch.tensor([0.0]), form="ratio"),
        r"score_rejected > 0",
    ),
    "odpo_nan_score": (
        lambda: odpo_offsets(torch.tensor([float("nan")]), torch.tensor([0.1])),
        r"score",
    ),
    "odpo_form": (
        lambda: odpo_offsets(torch.tensor([0.9]), torch.tensor([0.4]), form="log"),
        r"form must be one of 'difference', 'ratio'",
    ),
    "odpo_alpha": (
        lambda: odpo_offsets(torch.tensor([0.9]), torch.tensor([0.4]), alpha=-1.0),
        r"alpha must be >= 0",
    ),
    "tdpo_variant": (lambda: tdpo_loss(*FOUR, KL, KL, variant="tdpo3"), r"variant.*tdpo1"),
    "tdpo_beta": (lambda: tdpo_loss(*FOUR, KL, KL, beta=0.0), r"beta must be > 0"),
    "tdpo_alpha": (lambda: tdpo_loss(*FOUR, KL, KL, alpha=-0.5), r"alpha must be >= 0"),
    "simpo_beta": (lambda: simpo_loss(X, Y, beta=0.0), r"beta must be > 0"),
    "simpo_gamma": (lambda: simpo_loss(X, Y, gamma=-1.0), r"gamma must be >= 0"),
    "slic_delta": (lambda: slic_loss(X, Y, X, delta=-1.0), r"delta must be >= 0"),
    "slic_lam": (lambda: slic_loss(X, Y, X, lam=-0.1), r"lam must be >= 0"),
    "kto_beta": (lambda: kto_loss(X, R, DESIRABLE, 0.0, beta=0.0), r"beta must be > 0"),
    "kto_desirable_weight": (
        lambda: kto_loss(X, R, DESIRABLE, 0.0, desirable_weight=0.0),
        r"desirable_weight must be > 0",
    ),
    "kto_undesirable_weight": (
        lambda: kto_loss(X, R, DESIRABLE, 0.0, undesirable_weight=-1.0),
        r"undesirable_weight must be > 0",
    ),
    "kto_baseline_not_scalar": (lambda: kto_loss(X, R, DESIRABLE, KL), r"kl_baseline"),
    "spin_lam": (lambda: spin_loss(*FOUR, lam=0.0), r"lam must be > 0"),
}


@pytest.mark.parametrize("case", sorted(BAD_CALLS))
def test_bad_hyperparameter_raises(case):
    call, pattern = BAD_CALLS[case]
    with pytest.raises(ValueError, match=pattern):
        call()


def test_valid_boundaries_are_accepted():
    rdpo_loss(*FOUR, eps=0.0)
    rdpo_loss(*FOUR, eps=0.4999)
    dpop_loss(*FOUR, lam=0.0)
    slic_loss(X, Y, X, delta=0.0, lam=0.0)
    simpo_loss(X, Y, gamma=0.0)
    tdpo_loss(*FOUR, KL, KL, alpha=-1.0, variant="tdpo1")  # alpha is not used by TDPO1


SHAPE_CALLS = {
    "dpo": lambda: dpo_loss(X, Y, R, torch.tensor([-11.0, -12.0, -13.0])),
    "dpo_column": lambda: dpo_loss(X, Y, R, R.view(2, 1)),  # would broadcast to (2, 2)
    "odpo_offsets": lambda: odpo_loss(*FOUR, torch.zeros(3)),
    "tdpo_kl": lambda: tdpo_loss(*FOUR, KL, torch.zeros(3)),
    "simpo": lambda: simpo_loss(X, torch.zeros(3)),
    "slic_target": lambda: slic_loss(X, Y, torch.zeros(1)),
    "kto_desirable": lambda: kto_loss(X, R, torch.tensor([True]), 0.0),
    "score_shapes": lambda: odpo_offsets(torch.tensor([0.9, 0.8]), torch.tensor([0.4])),
}


@pytest.mark.parametrize("case", sorted(SHAPE_CALLS))
def test_mismatched_shapes_raise(case):
    with pytest.raises(ValueError, match="same shape"):
        SHAPE_CALLS[case]()


def test_check_same_shape_names_the_tensors():
    with pytest.raises(ValueError, match=r"a=\(2,\), b=\(3,\)"):
        check_same_shape(a=torch.zeros(2), b=torch.zeros(3))
    check_same_shape(a=torch.zeros(2), b=torch.ones(2), c=None)  # None is skipped


def test_sequence_kl_shape_errors():
    logits = torch.zeros(2, 3, 5)
    with pytest.raises(ValueError, match="same shape"):
        sequence_kl(logits, torch.zeros(2, 3, 6), torch.ones(2, 3))
    with pytest.raises(ValueError, match="loss_mask"):
        sequence_kl(logits, logits, torch.ones(2, 4))
    with pytest.raises(ValueError, match="chunk_size"):
        sequence_kl(logits, logits, torch.ones(2, 3), chunk_size=0)


def test_odpo_valid_pairs_marks_what_offsets_refuse():
    chosen = torch.tensor([0.9, 0.5, 0.2, 0.5])
    rejected = torch.tensor([0.4, 0.5, 0.4, -0.1])
    assert odpo_valid_pairs(chosen, rejected).tolist() == [True, False, False, True]
    assert odpo_valid_pairs(chosen, rejected, form="ratio").tolist() == [True, False, False, False]
    keep = odpo_valid_pairs(chosen, rejected)
    odpo_offsets(chosen[keep], rejected[keep])  # dropping the bad pairs makes it valid


def test_kto_weight_balance_warns_outside_recommended_range():
    with pytest.warns(UserWarning, match=r"\[1, 4/3\]"):
        assert kto_weight_balance(100, 400) == pytest.approx(0.25)
    # lam_D * 100 / (1 * 400) = 1.2 with lam_D = 4.8: inside [1, 4/3], no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kto_weight_balance(100, 400, desirable_weight=4.8) == pytest.approx(1.2)
