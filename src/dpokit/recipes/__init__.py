"""Recipes: what calls the engine. :func:`run` is ``dpokit train`` / :func:`dpokit.train`.

This layer sits ABOVE the engine: it imports :mod:`dpokit.engine` at the top of its modules like
any caller, and nothing below it imports a recipe. A method that is one training run needs no
recipe: :func:`run` hands it to one :class:`~dpokit.engine.Trainer`. A method that is several runs
names its recipe in the method table (``spec.recipe``), and the hyperparameter counting its runs
(``spec.stage_count``):

- ``spin``: self-play rounds (:mod:`dpokit.recipes.spin`), ``iterations`` runs;
- ``stepwise``: sDPO's data chunks with a moving reference (:mod:`dpokit.recipes.stepwise`),
  ``chunks`` runs (or one per value of the data's ``chunk`` column).

Both chain ordinary runs through :mod:`dpokit.recipes.stages`. :func:`dpokit.recipes.sft.run_sft`
is ``dpokit sft``.
"""

from __future__ import annotations

from collections.abc import Callable

from dpokit.config import TrainConfig
from dpokit.distributed import init_processes
from dpokit.engine import Trainer, TrainResult
from dpokit.losses import get_method
from dpokit.paths import check_run_paths
from dpokit.recipes.spin import run_spin
from dpokit.recipes.stepwise import run_stepwise

# spec.recipe -> the function that runs the whole method from its TrainConfig.
RECIPES: dict[str, Callable[[TrainConfig], TrainResult]] = {
    "spin": run_spin,
    "stepwise": run_stepwise,
}


def run(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.method`` (see TrainConfig).

    Methods whose table entry names a recipe (SPIN's rounds, stepwise DPO's chunks) run through
    it; every other method is one :class:`~dpokit.engine.Trainer` run. Raises ``ValueError`` for
    an unknown method, :class:`~dpokit.config.ConfigError` / :class:`~dpokit.data.DataError` for
    bad settings or data (before any weights load).
    """
    check_run_paths(config)  # one-line errors before anything loads (dpokit.paths)
    init_processes()  # before a recipe's first PartialState(): it would settle the backend
    spec = get_method(config.method)
    if spec.recipe is None:
        return Trainer(config).train()
    return RECIPES[spec.recipe](config)


__all__ = ["RECIPES", "run"]
