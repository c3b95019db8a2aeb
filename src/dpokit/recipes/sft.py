"""``dpokit sft``: supervised fine-tuning, one engine run with the SFT step."""

from __future__ import annotations

from dpokit.config import TrainConfig
from dpokit.engine import Trainer, TrainResult
from dpokit.steps.sft import SFT_SPEC


def run_sft(config: TrainConfig) -> TrainResult:
    """Fine-tune ``config.model`` on the SFT rows in ``config.data``; returns a TrainResult.

    Method hyperparameters in ``config`` are ignored (SFT has none). Raises ``ValueError`` when
    ``model`` or ``data`` is missing, :class:`~dpokit.data.DataError` for bad rows.
    """
    return Trainer(config, spec=SFT_SPEC).train()
