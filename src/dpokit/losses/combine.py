"""Several objectives in one run: a weighted sum of per-example losses, logged per component.

TRL 1.16 accepts ``loss_type`` as a list with ``loss_weights`` (MPO, Wang et al., 2024,
arXiv:2411.10442: ``[sigmoid, bco_pair, sft]`` with ``[0.8, 0.2, 1.0]``) and trains on
``sum_k weight_k * mean(loss_k)``. Summing the per-example losses first and then taking the mean
is the same number, and keeps the per-example form every dpokit loss has.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

from dpokit.losses.base import LossOutput, check_range, check_same_shape


def combine_losses(
    outputs: Mapping[str, LossOutput],
    weights: Mapping[str, float] | None = None,
) -> LossOutput:
    """Weighted sum of several :class:`LossOutput` s of the same batch.

    Equation::

        loss = sum_k weight_k * loss_k      (per example; the engine then takes the mean)

    Args:
        outputs: component name -> its :class:`LossOutput` (losses ``(B,)``, same B for all),
            e.g. ``{"sigmoid": dpo_out, "bco_pair": bco_out, "sft": nll_out}``. Order matters
            only for the rewards (below).
        weights: component name -> weight, each finite and >= 0; ``None`` gives every
            component 1.0 (TRL's default). Must name exactly the components of ``outputs``.

    Returns:
        :class:`LossOutput` with the weighted sum as ``losses``; the chosen/rejected rewards of
        the first component that has them (likewise ``rewards``); metrics
        ``loss/<name>`` = each component's UNWEIGHTED per-example losses (detached; the engine
        logs their mean), and every component metric ``m`` as ``<name>/m``.

    Raises:
        ValueError: no component; weights naming other components; a weight negative, infinite
        or NaN; components of different shapes.
    """
    if not outputs:
        raise ValueError("combine_losses needs at least one component")
    if weights is None:
        weights = dict.fromkeys(outputs, 1.0)
    if set(weights) != set(outputs):
        raise ValueError(
            f"loss_weights must name exactly the components {sorted(outputs)}; "
            f"got {sorted(weights)}"
        )
    for name, weight in weights.items():
        if not math.isfinite(weight):
            raise ValueError(f"loss_weights[{name!r}] must be finite, got {weight!r}")
        check_range(f"loss_weights[{name!r}]", weight, 0.0)
    check_same_shape(**{f"losses of {name}": out.losses for name, out in outputs.items()})

    losses = sum(weights[name] * out.losses for name, out in outputs.items())
    metrics = {}
    for name, out in outputs.items():
        metrics[f"loss/{name}"] = out.losses.detach()
        metrics.update({f"{name}/{key}": value for key, value in out.metrics.items()})
    paired = [out for out in outputs.values() if out.chosen_rewards is not None]
    unpaired = [out for out in outputs.values() if out.rewards is not None]
    return LossOutput(
        losses=losses,
        chosen_rewards=paired[0].chosen_rewards if paired else None,
        rejected_rewards=paired[0].rejected_rewards if paired else None,
        rewards=unpaired[0].rewards if unpaired else None,
        metrics=metrics,
    )
