"""The optimizer, the learning-rate schedule and the number of optimizer steps of a run."""

from __future__ import annotations

import math

import torch
from transformers import get_scheduler


def build_optimizer(config, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """``config.optimizer`` (``adamw`` or ``rmsprop``) over ``params`` with the run's learning
    rate, weight decay and (AdamW) betas. ``config``: a :class:`~dpokit.config.TrainConfig`."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(
            params,
            lr=config.learning_rate,
            weight_decay=config.weight_decay,
            betas=(config.adam_beta1, config.adam_beta2),
            # One kernel over all parameters (CPU and GPU); the default is a Python loop over
            # parameters on CPU.
            fused=config.fused_optimizer or None,
        )
    return torch.optim.RMSprop(params, lr=config.learning_rate, weight_decay=config.weight_decay)


def count_steps(config, micro_batches: int, num_processes: int) -> tuple[int, int]:
    """(optimizer steps per epoch, optimizer steps of the run) for ``micro_batches`` batches of
    the whole data set: ``config.max_steps``, else ``num_epochs`` epochs (rounded up)."""
    # Per process after sharding: accelerate gives every process ceil(batches / processes).
    per_process = math.ceil(micro_batches / num_processes)
    steps_per_epoch = max(1, math.ceil(per_process / config.gradient_accumulation_steps))
    max_steps = config.max_steps or math.ceil(config.num_epochs * steps_per_epoch)
    return steps_per_epoch, max_steps


def build_scheduler(config, optimizer: torch.optim.Optimizer, max_steps: int):
    """The learning-rate schedule (``config.lr_scheduler``, with ``warmup_steps`` or
    ``warmup_ratio`` of ``max_steps`` warm-up), to be stepped once per optimizer step."""
    warmup = config.warmup_steps
    if warmup is None:
        warmup = int(config.warmup_ratio * max_steps)
    schedule = "constant_with_warmup" if config.lr_scheduler == "constant" else config.lr_scheduler
    return get_scheduler(schedule, optimizer, num_warmup_steps=warmup, num_training_steps=max_steps)
