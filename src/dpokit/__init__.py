"""dpokit: the DPO family of preference-optimization methods, correct, fast, and in one place.

``dpokit.losses`` holds the losses (pure functions) and the method table; ``dpokit.train(config)``
trains (:func:`dpokit.recipes.run`). Heavy modules load on first use so ``import dpokit`` stays
cheap.
"""

from __future__ import annotations

__version__ = "0.1.0"


def train(config):
    """Train with a :class:`dpokit.config.TrainConfig` (or a dict of its keys); returns the
    :class:`~dpokit.engine.TrainResult`. Raises ``ConfigError`` for bad settings."""
    from dpokit.config import TrainConfig
    from dpokit.recipes import run

    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return run(config)
