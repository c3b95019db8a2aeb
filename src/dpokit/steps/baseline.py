"""The engine's running reward baseline, for the methods whose table row asks for one (BCO).

A row with ``baseline_rewards`` (:class:`~dpokit.losses.MethodSpec`) reads a running mean of
implicit rewards as ``LossInputs.reward_baseline``. The engine owns ONE
:class:`~dpokit.losses.RewardBaseline` per run through a :class:`RewardBaselineHook`:

- training: once per micro-batch, after the forward and BEFORE the loss (TRL's order), the
  batch's rewards are gathered from every process and folded into the mean; the loss then reads
  the updated mean;
- evaluation: the mean is read, never updated;
- checkpoints: :meth:`RewardBaselineHook.checkpoint_state` goes into the trainer state and
  :meth:`RewardBaselineHook.restore` reads it back, so a resumed run equals an uninterrupted one.

For every other method the hook is inert: no view, no state.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Mapping
from typing import Any

import torch

from dpokit.distributed import gather_rows
from dpokit.losses import LossInputs, MethodSpec, RewardBaseline

logger = logging.getLogger("dpokit")

STATE_KEY = "reward_baseline"

# What a per-batch step calls: (LossInputs with policy and reference log-probs) -> baseline value.
BaselineView = Callable[[LossInputs], float]


class RewardBaselineHook:
    """One run's reward baseline: updated in training, read in evaluation, checkpointed.

    Args:
        spec: the method's (bound) table row; inert unless ``spec.baseline_rewards``.
        hyperparameters: the method's resolved hyperparameters.
        accelerator: gathers the rewards of all processes (``None``: one process).
    """

    def __init__(
        self, spec: MethodSpec, hyperparameters: Mapping[str, Any], accelerator: Any = None
    ) -> None:
        self.rewards_of = spec.baseline_rewards
        self.hyperparameters = dict(hyperparameters)
        self.accelerator = accelerator
        self.state = RewardBaseline() if self.rewards_of is not None else None

    @property
    def active(self) -> bool:
        """Whether the method reads a running baseline."""
        return self.state is not None

    def observe(self, inputs: LossInputs, *, update: bool, filler: bool = False) -> float:
        """The baseline value for this micro-batch, after folding in its rewards when ``update``.

        The rewards (``(N,)``, from ``spec.baseline_rewards``) are gathered across processes so
        that every process keeps the same mean; the processes' N may differ (the last batches
        of an epoch), and a ``filler`` micro-batch (:mod:`dpokit.accumulation`) gives none.
        Non-finite rewards are not folded in (one NaN would poison the mean for the rest of the
        run): the batch's loss is non-finite anyway and the engine stops or skips it.
        """
        if update:
            rewards = self.rewards_of(inputs, self.hyperparameters)
            if rewards is not None:
                rewards = rewards.detach().reshape(-1)
                if filler:
                    rewards = rewards[:0]
                if self.accelerator is not None:
                    rewards = gather_rows(rewards, self.accelerator)
                if bool(torch.isfinite(rewards).all()):
                    self.state.update(rewards)
                else:
                    logger.warning("non-finite rewards: the reward baseline keeps its value")
        return self.state.value

    def for_split(self, split: str, filler: bool = False) -> BaselineView | None:
        """The view a per-batch step calls: updating for ``"train"``, read-only otherwise;
        ``filler``: for filler micro-batches (they join the gather with no rewards). None when
        the method has no baseline."""
        if not self.active:
            return None
        return functools.partial(self.observe, update=split == "train", filler=filler)

    def checkpoint_state(self) -> dict[str, Any]:
        """``{"reward_baseline": {"mean", "count"}}`` to merge into the trainer state, or ``{}``."""
        return {STATE_KEY: self.state.state_dict()} if self.active else {}

    def restore(self, trainer_state: Mapping[str, Any]) -> None:
        """Load the baseline from a trainer state written with :meth:`checkpoint_state`.

        Raises ``ValueError`` when the method needs a baseline and the checkpoint has none
        (written by another method or an older dpokit): resuming would silently restart it.
        """
        if not self.active:
            return
        if STATE_KEY not in trainer_state:
            raise ValueError(
                "the checkpoint has no reward baseline state, which this method's loss reads; "
                "resume from a checkpoint of the same method or start afresh"
            )
        self.state.load_state_dict(trainer_state[STATE_KEY])


__all__ = ["STATE_KEY", "BaselineView", "RewardBaselineHook"]
