"""Shared pieces of the loss functions: the output container, the input container, and checks.

Every loss in :mod:`dpokit.losses` is a pure function of per-sequence tensors of shape ``(B,)``
(log-probabilities summed over completion tokens unless a name says ``avg``) and returns a
:class:`LossOutput`. The engine fills a :class:`LossInputs` once per step and each method's adapter
(see :mod:`dpokit.losses.registry`) picks what it needs from it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field, fields

from torch import Tensor


@dataclass
class LossOutput:
    """What every loss function returns.

    Attributes:
        losses: ``(B,)`` per-example losses, differentiable. The engine reduces them (usually the
            mean, see :attr:`loss`), so that micro-batching and padding stay its business.
        chosen_rewards: ``(B,)`` detached implicit reward of the chosen answer (pairwise methods);
            what each method logs is stated in its docstring (``beta * rho_w`` for DPO).
        rejected_rewards: ``(B,)`` detached implicit reward of the rejected answer.
        rewards: ``(B,)`` detached reward of each example of an unpaired method (KTO).
        metrics: extra detached ``(B,)`` tensors worth logging (penalties, offsets, KL terms).
    """

    losses: Tensor
    chosen_rewards: Tensor | None = None
    rejected_rewards: Tensor | None = None
    rewards: Tensor | None = None
    metrics: dict[str, Tensor] = field(default_factory=dict)

    @property
    def loss(self) -> Tensor:
        """Mean of :attr:`losses`: the scalar to call ``backward()`` on in the plain case."""
        return self.losses.mean()


@dataclass
class LossInputs:
    """Everything a method's adapter may need for one batch; each adapter reads only its part.

    All tensors are ``(B,)``. Log-probs are SUMMED over completion tokens (prompt and padding
    masked); adapters that need per-token averages (SimPO, IPO with ``average=True``) divide by
    ``chosen_lengths`` / ``rejected_lengths`` -- the same lengths for policy and reference.

    Pairwise methods: ``policy_chosen_logps``, ``policy_rejected_logps`` and, when the method has a
    reference, ``reference_chosen_logps``, ``reference_rejected_logps``. SPIN puts the human
    answer in ``chosen``, the previous iterate's sample in ``rejected`` and the previous iterate
    (the opponent) in ``reference_*``. Segment DPO passes log-probs summed over the segment's
    agent turns only.

    TDPO: ``chosen_seq_kl``, ``rejected_seq_kl`` from :func:`dpokit.losses.sequence_kl`.
    ODPO: ``score_chosen``, ``score_rejected``.
    SLiC: ``policy_target_logps`` = log-prob of y_ref (``None`` means y_ref = chosen).
    KTO (unpaired): ``policy_logps``, ``reference_logps``, ``desirable`` (bool) and the scalar
    ``kl_baseline`` z0 from :func:`dpokit.losses.kto_kl_baseline`.
    BCO (``bco_pair``): ``reward_baseline``, the scalar running mean of the rewards
    (:class:`dpokit.losses.bco.RewardBaseline`), owned and updated by the engine.
    Options (:mod:`dpokit.losses.options`): ``ld_policy_chosen_logps``/``ld_policy_rejected_logps``
    (LD-DPO sums; the ``reference_*`` fields then hold the reference's LD sums) and
    ``chosen_log_sum_sq``/``rejected_log_sum_sq`` (WPO: sum over completion tokens of
    ``log sum_v p_v**2``).
    """

    policy_chosen_logps: Tensor | None = None
    policy_rejected_logps: Tensor | None = None
    chosen_lengths: Tensor | None = None
    rejected_lengths: Tensor | None = None
    reference_chosen_logps: Tensor | None = None
    reference_rejected_logps: Tensor | None = None
    chosen_seq_kl: Tensor | None = None
    rejected_seq_kl: Tensor | None = None
    score_chosen: Tensor | None = None
    score_rejected: Tensor | None = None
    policy_target_logps: Tensor | None = None
    policy_logps: Tensor | None = None
    reference_logps: Tensor | None = None
    desirable: Tensor | None = None
    kl_baseline: Tensor | float | None = None
    reward_baseline: Tensor | float | None = None
    # Options on pairwise methods (dpokit.losses.options), filled by the pairwise step when on:
    # LD-DPO's length-desensitised policy sums and WPO's sums of log sum_v p_v**2 (no grad).
    ld_policy_chosen_logps: Tensor | None = None
    ld_policy_rejected_logps: Tensor | None = None
    chosen_log_sum_sq: Tensor | None = None
    rejected_log_sum_sq: Tensor | None = None

    def require(self, method: str, *names: str) -> tuple[Tensor, ...]:
        """Return the named inputs, or raise ``ValueError`` naming every missing one."""
        missing = [name for name in names if getattr(self, name) is None]
        if missing:
            given = [f.name for f in fields(self) if getattr(self, f.name) is not None]
            raise ValueError(
                f"method {method} needs {', '.join(missing)} in LossInputs "
                f"(given: {', '.join(given) or 'nothing'})"
            )
        return tuple(getattr(self, name) for name in names)


def check_same_shape(**tensors: Tensor | None) -> None:
    """Raise ``ValueError`` unless all given (non-None) tensors have the same shape.

    Broadcasting would silently turn a ``(B,)`` and a ``(B, 1)`` into a ``(B, B)`` loss; catch it.
    """
    shapes = {name: tuple(t.shape) for name, t in tensors.items() if t is not None}
    if len(set(shapes.values())) > 1:
        listing = ", ".join(f"{name}={shape}" for name, shape in shapes.items())
        raise ValueError(f"per-example tensors must all have the same shape (B,); got {listing}")


def describe_range(
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> str:
    """Human-readable interval: ``"in [0, 0.5)"``, ``"> 0"``, ``">= 0"`` or ``"any number"``."""
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return "any number"


def check_range(
    name: str,
    value: float,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
) -> None:
    """Raise ``ValueError("<name> must be in [low, high), got ...")`` when value is outside.

    NaN is always outside. ``low_open``/``high_open`` make that end exclusive.
    """
    ok = not (isinstance(value, float) and math.isnan(value))
    if ok and low is not None:
        ok = value > low if low_open else value >= low
    if ok and high is not None:
        ok = value < high if high_open else value <= high
    if not ok:
        interval = describe_range(low, high, low_open=low_open, high_open=high_open)
        raise ValueError(f"{name} must be {interval}, got {value!r}")


def check_choice(name: str, value: str, choices: Sequence[str]) -> None:
    """Raise ``ValueError`` unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
