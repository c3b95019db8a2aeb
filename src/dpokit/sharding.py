"""dpokit's own parameter sharding: PyTorch FSDP2 (``torch.distributed.fsdp.fully_shard``).

accelerate 1.15 turns its FSDP plugin on only for GPU-like devices (``AcceleratorState`` switches
to ``DistributedType.FSDP`` from the MULTI_GPU/NPU/XPU/... branch; a CPU run stays MULTI_CPU and
silently trains unsharded). FSDP2 itself runs on CPU over gloo, so with ``sharding=fsdp`` dpokit
shards the model itself, behind the same config on CPU and GPU, and accelerate keeps doing what
it does well (process group, data sharding, metrics, RNG and scheduler state).

Layout (:func:`shard_scorer`): every decoder layer (the model's ``_no_split_modules``) is its own
FSDP unit, gathered only while it runs; the root unit is the whole
:class:`~dpokit.logprobs.CompletionScorer`, so embeddings, final norm and LM head are gathered at
the start of the scorer's forward and stay whole until backward has used them (FSDP2 does not
reshard the root after forward). The chunked LM head therefore reads the *whole* head weight, and
no (tokens x vocab) logits tensor is ever built under sharding; TDPO's token KL, computed after
the forward from the same head weights, sees them whole too.

Checkpoints are sharded (``torch.distributed.checkpoint``: each process writes its own shards of
the weights and optimizer state, and can load them into a different number of processes); the
final model is gathered on the main process into an ordinary ``save_pretrained`` directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

logger = logging.getLogger("dpokit")

SHARDED_DIR = "sharded"  # inside a checkpoint: the torch.distributed.checkpoint files


def layer_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks that become FSDP units: transformers' ``_no_split_modules`` of
    the (peft-unwrapped) model, e.g. ``{"LlamaDecoderLayer"}``. Raises ``ValueError`` if the model
    names none (sharding would then hold the whole model in one unit: no memory saved)."""
    get_base = getattr(model, "get_base_model", None)  # peft
    base = get_base() if callable(get_base) else model
    names = set(getattr(base, "_no_split_modules", None) or ())
    if not names:
        raise ValueError(f"{type(base).__name__} names no _no_split_modules to shard by")
    return names


def shard_scorer(scorer: nn.Module, model: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Shard ``scorer`` (a CompletionScorer around ``model``) over all processes, in place.

    Each module of :func:`layer_classes` becomes an FSDP unit, then ``scorer`` the root unit
    (embeddings, final norm, LM head). Parameters become DTensors sharded on dim 0; a frozen
    model (a reference: every ``requires_grad`` False) is sharded the same way and only ever
    gathered for forwards. Needs an initialised process group. Returns ``scorer``.
    """
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(scorer, mesh=mesh)
    logger.info(
        "FSDP2: %d %s units + root over %d processes",
        len(layers),
        "/".join(sorted(names)),
        dist.get_world_size(),
    )
    return scorer


def clip_grad_norm(parameters, max_norm: float) -> torch.Tensor:
    """``torch.nn.utils.clip_grad_norm_`` over sharded (DTensor) gradients: the norm of the
    *whole* gradient (a collective), returned as a plain scalar tensor. Every process calls it."""
    norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
    return norm.full_tensor() if isinstance(norm, DTensor) else norm


def save_sharded_state(model: nn.Module, optimizer, directory: Path) -> None:
    """Write the sharded weights and optimizer state of ``model`` under ``directory/sharded``
    (``torch.distributed.checkpoint``: every process writes its shards). Collective."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.save(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))


def load_sharded_state(model: nn.Module, optimizer, directory: Path) -> None:
    """Load what :func:`save_sharded_state` wrote into the sharded ``model`` and ``optimizer``,
    in place (resharding if the number of processes changed). Collective."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    dcp.load(state, checkpoint_id=str(Path(directory) / SHARDED_DIR))
    set_state_dict(
        model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"]
    )


def gathered_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The whole weights of a sharded ``model`` as plain CPU tensors on process 0 (an empty dict
    elsewhere). Collective: every process calls it. Peaks at one full copy on process 0."""
    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    return get_model_state_dict(model, options=options)
