"""What changes when a run is spread over several processes.

DDP (and DeepSpeed ZeRO-1/2) keep a full copy of the weights on every process: nothing changes
but the data, which accelerate shards. FSDP and DeepSpeed ZeRO-3 *shard the parameters*: a weight
is whole only inside the forward of the module that owns it, where the wrapper gathers it. Two
shortcuts the engine takes on one process then go wrong:

1. the chunked scorer (:class:`~dpokit.logprobs.CompletionScorer`'s fast path) reads the LM head's
   ``weight`` directly instead of calling the head, so under ZeRO-3 (or an FSDP policy that wraps
   the head in its own unit) it would read a shard;
2. a separate frozen reference model is loaded with ``from_pretrained``, which under ZeRO-3's
   ``zero.Init`` (and FSDP's CPU-RAM-efficient loading) yields partitioned / empty weights that
   nothing gathers.

So under parameter sharding :func:`sharded_plan` picks the paths that stay correct: every scorer
calls the full model (the exact path: the head's forward gathers its weight), the reference
log-probs are pre-computed by the prepared policy itself before its first step (it *is* the
reference then), a LoRA reference switches the adapter off inside the sharded wrapper, and a
separate online reference model is refused with what to use instead.

dpokit's own FSDP2 (``sharding=fsdp``, :mod:`dpokit.sharding`, chosen by :func:`own_sharding`)
has none of these limits: its root unit keeps the LM head whole through forward and backward,
and it shards a separate reference model too. Its sharding name is ``"fsdp2"``.
"""

from __future__ import annotations

import contextlib
import logging
import os

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration

from dpokit.allocator import map_large_allocations
from dpokit.config import ConfigError
from dpokit.config_checks import check_tracker

logger = logging.getLogger("dpokit")


def _has_gpu() -> bool:
    if getattr(torch, "accelerator", None) is not None:
        return torch.accelerator.is_available()
    return torch.cuda.is_available()


def refuse_deepspeed_on_cpu() -> None:
    """Raise ConfigError when ``accelerate launch`` asked for DeepSpeed on a machine without a
    GPU: accelerate 1.15 enables DeepSpeed only off CPU and would train as plain DDP, unsharded
    and unsaid (or fail with a traceback when deepspeed is not installed)."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true" or _has_gpu():
        return
    raise ConfigError(
        "a DeepSpeed accelerate config on a machine without a GPU: accelerate does not enable "
        "DeepSpeed on CPU and would train as plain DDP, unsharded. Use sharding=fsdp (dpokit's "
        "FSDP2 runs on CPU) or configs/accelerate/ddp.yaml"
    )


def cpu_only_multiprocess() -> bool:
    """True when launched with several processes (torchrun) on a machine without a GPU.

    accelerate only builds a CPU process group (gloo) when told it runs on CPU; without this a
    CPU ``torchrun --nproc_per_node 2`` would start two independent single-process runs.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return False
    return not _has_gpu()


def init_processes():
    """The process state, set up once per process before anything else asks for it: the first
    ``PartialState()`` (a recipe's, the Trainer's Accelerator) decides the backend for good."""
    from accelerate import PartialState

    return PartialState(cpu=cpu_only_multiprocess())


@contextlib.contextmanager
def uneven_batches(accelerator):
    """Data loaders prepared inside this block deal each batch of the data to ONE process and
    repeat no row: accelerate's ``even_batches=False``, set back on exit.

    accelerate's default (``even_batches=True``) completes the last batches of an epoch with rows
    from its start, so that every process gets as many full batches: those rows are then trained
    (and counted in metrics) twice. With this, a process may get one batch fewer (or none, with
    fewer batches than processes) and a shorter last batch; the engine fills the missing ones
    with weightless micro-batches (:func:`dpokit.accumulation.epoch_micro_batches`) so that every
    process still joins every collective. Loaders read through ``gather_for_metrics`` (the
    reference table) keep the default: it drops the repeated rows itself.
    """
    before = accelerator.even_batches
    accelerator.even_batches = False
    try:
        yield
    finally:
        accelerator.even_batches = before


def gather_rows(values: torch.Tensor, accelerator) -> torch.Tensor:
    """``(N_0 + ... + N_{P-1}, ...)``: every process's ``(N_p, ...)`` ``values``, in process
    order, where the ``N_p`` may differ (0 included; accelerate's ``gather`` needs equal shapes,
    which the last batches of an uneven epoch do not have). One process: ``values``. A
    collective: every process must call it."""
    if accelerator.num_processes <= 1:
        return values
    count = torch.tensor([values.shape[0]], dtype=torch.int64, device=values.device)
    counts = accelerator.gather(count).tolist()  # (P,)
    padded = accelerator.pad_across_processes(values, dim=0)  # (max N_p, ...)
    gathered = accelerator.gather(padded)  # (P * max N_p, ...)
    width = padded.shape[0]
    return torch.cat([gathered[p * width : p * width + n] for p, n in enumerate(counts)])


def parameter_sharding(accelerator) -> str | None:
    """``"fsdp"``, ``"zero3"`` or None (every process holds whole weights)."""
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind == "FSDP":
        return "fsdp"
    if kind == "DEEPSPEED":
        plugin = accelerator.state.deepspeed_plugin
        if plugin is not None and int(plugin.zero_stage) == 3:
            return "zero3"
    return None


def no_split_modules(model) -> list[str] | None:
    """The decoder-layer class names FSDP wraps one by one (transformers' ``_no_split_modules``);
    the engine hands accelerate a scorer around the model, which would otherwise offer none."""
    get_base = getattr(model, "get_base_model", None)  # peft
    base = get_base() if callable(get_base) else model
    names = getattr(base, "_no_split_modules", None)
    return list(names) if names else None


SHARDING_NAMES = {"fsdp": "FSDP", "zero3": "DeepSpeed ZeRO-3", "fsdp2": "dpokit's FSDP2"}


def own_sharding(config, accelerator) -> bool:
    """True when dpokit shards the model itself with PyTorch FSDP2 (:mod:`dpokit.sharding`):
    ``sharding=fsdp``, or ``sharding=auto`` under accelerate's FSDP config (``accelerate launch
    --config_file configs/accelerate/fsdp.yaml``) on a machine without a GPU, where accelerate
    1.15 would silently run unsharded (it enables FSDP for GPU-like devices only). One process:
    False (nothing to shard over). Raises ConfigError for ``sharding=fsdp`` under accelerate's own
    FSDP or DeepSpeed (two wrappers would shard the same weights)."""
    if accelerator.num_processes <= 1 or config.sharding == "none":
        return False
    if config.sharding == "auto":
        asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
        return asked and cpu_only_multiprocess()
    kind = str(accelerator.distributed_type).rsplit(".", 1)[-1]
    if kind in ("FSDP", "DEEPSPEED"):
        raise ConfigError(
            f"sharding=fsdp and an accelerate {kind} config both shard the weights: launch with "
            "torchrun or configs/accelerate/ddp.yaml, or set sharding=auto"
        )
    return True


def refuse_separate_reference(sharding: str | None) -> None:
    """An online frozen reference model is a second, unsharded load: refuse it under
    accelerate's FSDP / ZeRO-3 (dpokit's own FSDP2, ``"fsdp2"``, shards the reference too)."""
    if sharding in (None, "fsdp2"):
        return
    raise ConfigError(
        f"under {SHARDING_NAMES[sharding]} a separate frozen reference model is not sharded by "
        "the run (its weights would be partitioned or empty on some processes). Use lora=true "
        "(the reference is the policy with its adapter off, scored through the sharded "
        "wrapper), reference_mode=precomputed for sequence-level methods, or a DDP / ZeRO-2 "
        "config (configs/accelerate/ddp.yaml, deepspeed_zero2.yaml)"
    )


def refuse_other_reference(sharding: str | None, reference: str) -> None:
    """Pre-computing with another model than the starting policy needs that model loaded whole
    (or sharded by dpokit's own FSDP2, ``"fsdp2"``, which is allowed)."""
    if sharding in (None, "fsdp2"):
        return
    raise ConfigError(
        f"under {SHARDING_NAMES[sharding]} the reference log-probs are pre-computed by the "
        f"policy itself before its first step, so --reference {reference} (another model) "
        "cannot score them. Pre-compute them once without sharding (the same command under "
        "configs/accelerate/ddp.yaml or on one process, with the same reference_cache_dir, "
        "dtype and mixed_precision): the sharded run then reads the cached table"
    )


def log_sharded_plan(sharding: str | None, reference_mode: str) -> None:
    """Say (once, as a warning) which paths a run with sharded parameters takes."""
    if sharding is None:
        return
    if sharding == "fsdp2":
        logger.warning(
            "dpokit's FSDP2 shards weights, gradients and optimizer state; the LM head is "
            "gathered whole for the chunked scorer; reference: %s",
            reference_mode,
        )
        return
    logger.warning(
        "%s shards the parameters: scoring with the full model forward (exact; logits are kept "
        "for the completion positions only) so that the LM head weight is gathered; reference: %s",
        SHARDING_NAMES[sharding],
        reference_mode,
    )


def build_accelerator(config) -> Accelerator:
    """The run's ``Accelerator`` from its :class:`~dpokit.config.TrainConfig`: mixed precision
    (``auto``: bf16 on a GPU that has it, else none), gradient accumulation, trackers, and a
    seedable sampler so data order follows ``config.seed`` on every process. With gradient
    checkpointing on a machine without a GPU, freed CPU tensors go back to the OS from here on
    (:func:`dpokit.allocator.map_large_allocations`: the user chose memory over speed). Raises
    ConfigError for a DeepSpeed launch on a machine without a GPU
    (:func:`refuse_deepspeed_on_cpu`)."""
    refuse_deepspeed_on_cpu()
    if config.report_to != "none":  # before anything loads; accelerate would only warn
        check_tracker(config.report_to)
    if config.gradient_checkpointing and not _has_gpu():
        map_large_allocations()  # memory over speed: freed activations leave the resident set
    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if bf16_ok else "no"  # CPU bf16 is far slower than fp32
    trackers = None if config.report_to == "none" else config.report_to
    return Accelerator(
        cpu=cpu_only_multiprocess(),  # torchrun on a CPU-only machine: gloo, not 1-process runs
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )
