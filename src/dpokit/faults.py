"""What goes wrong in a training step, said so the user can act: non-finite values and OOM.

The engine raises :class:`NonFiniteLossError` when a loss or gradient turns NaN/inf (after saving
the last good weights) and :class:`OutOfMemoryError` with :func:`oom_message`'s advice when a
micro-batch does not fit on the device.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from dpokit.errors import EXIT_OUT_OF_MEMORY, NonFiniteError, UserError


class NonFiniteLossError(NonFiniteError):
    """The loss or gradient turned NaN/inf; the message names the step and the batch rows."""


class OutOfMemoryError(UserError, RuntimeError):
    """The device ran out of memory in a training step; the message says what to change."""

    exit_code = EXIT_OUT_OF_MEMORY


# torch.OutOfMemoryError is torch >= 2.5; torch.cuda.OutOfMemoryError is its alias there.
OUT_OF_MEMORY_ERRORS = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def oom_message(config, step: int, batch: dict, reference_mode: str) -> str:
    """What ran out of memory (batch shape) and the settings that need less, cheapest first.

    ``config``: the run's :class:`~dpokit.config.TrainConfig`; ``step``: the 1-based optimizer
    step; ``batch['input_ids']``: ``(rows, T)``; ``reference_mode``: the run's reference mode.
    """
    rows, length = batch["input_ids"].shape  # (rows in the forward, padded length)
    lines = [
        f"out of memory at step {step}: a micro-batch of {rows} rows x {length} tokens "
        f"(batch_size={config.batch_size} per process, max_length={config.max_length}). "
        "What needs less memory:",
    ]
    if config.batch_size > 1:
        half = config.batch_size // 2
        accumulation = config.gradient_accumulation_steps * config.batch_size // half
        lines.append(
            f"  - batch_size={half} gradient_accumulation_steps={accumulation} "
            "(about the same batch per optimizer step)"
        )
    if not config.gradient_checkpointing:
        lines.append("  - gradient_checkpointing=true (recompute activations in backward)")
    if reference_mode == "model":
        lines.append(
            "  - reference_mode=precomputed (no reference model in memory; sequence-level "
            "methods) or lora=true (the reference is the policy with its adapter off)"
        )
    if not config.lora:
        lines.append("  - lora=true (train adapters only: no full optimizer state)")
    lines.append(
        f"  - a smaller max_length (now {config.max_length}) or logps_chunk_size "
        f"(now {config.logps_chunk_size}), or mixed_precision=bf16"
    )
    return "\n".join(lines)


def all_finite(value: torch.Tensor | None, accelerator) -> bool:
    """True on every process only if ``value`` (any shape) is finite on all of them.

    None counts as finite (unknown, e.g. DeepSpeed clips inside its own step). With several
    processes this is a collective: every process must call it.
    """
    if value is None:
        return True
    flag = torch.tensor(
        [float(torch.isfinite(torch.as_tensor(value)).all())], device=accelerator.device
    )
    if accelerator.num_processes > 1:
        # accelerate's reduce knows only sum and mean: finite everywhere <=> sum == processes
        flag = accelerator.reduce(flag, reduction="sum")
    return bool(flag.item() == accelerator.num_processes)


@contextlib.contextmanager
def explain_oom(config, step: int, batch: dict, reference_mode: str) -> Iterator[None]:
    """Turn a device out-of-memory error inside the block into an :class:`OutOfMemoryError`
    that names the batch shape and the settings that shrink memory (:func:`oom_message`)."""
    try:
        yield
    except OUT_OF_MEMORY_ERRORS as err:
        raise OutOfMemoryError(oom_message(config, step, batch, reference_mode)) from err
