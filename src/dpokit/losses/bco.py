"""BCO: binary classifier optimization, pairwise form with its reward baseline (Jung et al., 2024,
"Binary Classifier Optimization for Large Language Model Alignment", arXiv:2404.04656)."""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def bco_pair_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    reference_chosen_logps: Tensor,
    reference_rejected_logps: Tensor,
    reward_baseline: Tensor | float,
    *,
    beta: float = 0.1,
) -> LossOutput:
    """Pairwise BCO loss per example: a binary classifier whose logit is the shifted reward.

    Equation (r = beta * rho, rho = logp(y) - ref(y), delta = ``reward_baseline``)::

        loss = -log sigmoid(r_w - delta) - log sigmoid(-(r_l - delta))

    y_w is classified as "good" and y_l as "bad" independently; the reward shift delta (the
    running mean of all rewards, see :class:`RewardBaseline`) tightens the paper's bound of the
    DPO loss by this binary cross-entropy.

    Args:
        policy_chosen_logps, policy_rejected_logps, reference_chosen_logps,
        reference_rejected_logps: ``(B,)`` log-probs summed over completion tokens, as for DPO.
        reward_baseline: scalar delta in reward units (the same units as ``beta * rho``), e.g.
            ``RewardBaseline.value`` after ``update``; treated as a constant (no gradient).
            ``0.0`` reproduces TRL 1.16's ``bco_pair``, which has no baseline.
        beta: > 0 (default 0.1).

    Returns:
        :class:`LossOutput` with rewards ``beta * rho`` (detached) and
        ``metrics["reward_baseline"]`` (delta broadcast to ``(B,)``).

    Raises:
        ValueError: ``beta`` <= 0, a non-scalar or non-finite ``reward_baseline``, or tensors of
        different shapes.

    Traps: TRL's pre-1.0 ``DPOTrainer`` and its ``BCOTrainer`` subtract a running mean; TRL 1.16's
    ``DPOTrainer`` dropped it (delta = 0). Both update the mean with the CURRENT batch before
    computing the loss, so delta already includes this batch's rewards. With policy == reference
    and delta = 0 the loss is 2 ln 2 = 1.386294, not ln 2.
    """
    check_range("beta", beta, 0.0, low_open=True)
    check_same_shape(
        policy_chosen_logps=policy_chosen_logps,
        policy_rejected_logps=policy_rejected_logps,
        reference_chosen_logps=reference_chosen_logps,
        reference_rejected_logps=reference_rejected_logps,
    )
    delta = torch.as_tensor(
        reward_baseline, dtype=policy_chosen_logps.dtype, device=policy_chosen_logps.device
    ).detach()
    if delta.ndim != 0:
        raise ValueError(f"reward_baseline must be a scalar, got shape {tuple(delta.shape)}")
    if not bool(torch.isfinite(delta)):
        raise ValueError(f"reward_baseline must be finite, got {delta.item()!r}")
    chosen_rewards = beta * (policy_chosen_logps - reference_chosen_logps)  # (B,) r_w
    rejected_rewards = beta * (policy_rejected_logps - reference_rejected_logps)  # (B,) r_l
    losses = -F.logsigmoid(chosen_rewards - delta) - F.logsigmoid(-(rejected_rewards - delta))
    return LossOutput(
        losses=losses,
        chosen_rewards=chosen_rewards.detach(),
        rejected_rewards=rejected_rewards.detach(),
        metrics={"reward_baseline": delta.expand_as(losses)},
    )


class RewardBaseline:
    """Running mean of implicit rewards: BCO's reward shift delta, with a checkpointable state.

    The update is TRL's ``RunningMoments.update`` (pre-1.0 ``trl/trainer/utils.py``) restricted to
    the mean: for a batch of n rewards with mean m, ``mean += (m - mean) * n / (count + n)`` and
    ``count += n`` -- the exact mean of every reward seen so far. TRL starts ``count`` at 1e-24
    (so its first mean is m * n / (n + 1e-24)); this starts at 0, so the first mean is m exactly.

    Use, once per micro-batch and before the loss (as TRL does)::

        rewards = beta * torch.cat([policy_w - ref_w, policy_l - ref_l]).detach()   # (2B,)
        baseline.update(rewards)            # all-gather across processes first
        out = bco_pair_loss(..., baseline.value, beta=beta)

    Attributes:
        mean: the running mean (a Python float, in reward units beta * rho); 0.0 before any update.
        count: number of rewards averaged so far (float, like TRL's).

    Traps: all processes must update with the SAME rewards (gather them first, as TRL's
    ``get_global_statistics`` does), or their baselines -- and so their losses -- drift apart. Do
    not update during evaluation (TRL's ``BCOTrainer`` passes ``do_train=False``). TRL's pre-1.0
    ``DPOTrainer`` fed the batch MEAN (a count of 1 per batch), its ``BCOTrainer`` every reward;
    the two means agree when all batches have the same size.
    """

    def __init__(self) -> None:
        self.mean = 0.0
        self.count = 0.0

    @property
    def value(self) -> float:
        """The current delta to pass to :func:`bco_pair_loss`."""
        return self.mean

    @torch.no_grad()
    def update(self, rewards: Tensor) -> float:
        """Fold a batch of rewards (any shape, detached or not) into the mean; return the new mean.

        Raises ``ValueError`` on an empty batch or a non-finite reward: one NaN would poison
        the baseline for the rest of training.
        """
        n = rewards.numel()
        if n == 0:
            raise ValueError("rewards must hold at least one value to update the baseline")
        if not bool(torch.isfinite(rewards).all()):
            raise ValueError("rewards must all be finite to update the baseline")
        batch_mean = rewards.detach().double().mean().item()
        total = self.count + n
        self.mean += (batch_mean - self.mean) * n / total
        self.count = total
        return self.mean

    def state_dict(self) -> dict[str, float]:
        """``{"mean": float, "count": float}``: everything needed to resume exactly."""
        return {"mean": self.mean, "count": self.count}

    def load_state_dict(self, state: Mapping[str, float]) -> None:
        """Restore from :meth:`state_dict`; raises ``ValueError`` on missing or invalid values."""
        missing = {"mean", "count"} - set(state)
        if missing:
            raise ValueError(f"reward baseline state lacks {', '.join(sorted(missing))}")
        mean, count = float(state["mean"]), float(state["count"])
        if not math.isfinite(mean):
            raise ValueError(f"reward baseline mean must be finite, got {mean!r}")
        if not math.isfinite(count):
            raise ValueError(f"reward baseline count must be finite, got {count!r}")
        check_range("count", count, 0.0)
        self.mean, self.count = mean, count

    def __repr__(self) -> str:
        return f"RewardBaseline(mean={self.mean!r}, count={self.count!r})"
