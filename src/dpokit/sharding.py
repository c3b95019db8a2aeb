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
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from dpokit.distributed import no_split_modules
from dpokit.errors import ConfigError, ModelError

logger = logging.getLogger("dpokit")

SHARDED_DIR = "sharded"  # inside a checkpoint: the torch.distributed.checkpoint files


def layer_classes(model: nn.Module) -> set[str]:
    """Class names of the blocks that become FSDP units: transformers' ``_no_split_modules`` of
    the (peft-unwrapped) model, e.g. ``{"LlamaDecoderLayer"}``. Raises ``ValueError`` if the model
    names none (sharding would then hold the whole model in one unit: no memory saved)."""
    names = set(no_split_modules(model) or ())
    if not names:
        base = getattr(model, "get_base_model", lambda: model)()  # peft: name the model inside
        raise ValueError(f"{type(base).__name__} names no _no_split_modules to shard by")
    return names


def shard_scorer(scorer: nn.Module, model: nn.Module, device_type: str = "cpu") -> nn.Module:
    """Shard ``scorer`` (a CompletionScorer around ``model``) over all processes, in place, with
    every process's shards holding process 0's weights.

    Each module of :func:`layer_classes` becomes an FSDP unit, then ``scorer`` the root unit
    (embeddings, final norm, LM head). Parameters become DTensors sharded on dim 0; a frozen
    model (a reference: every ``requires_grad`` False) is sharded the same way and only ever
    gathered for forwards. Only process 0 needs real weights: the others may build the model on
    the meta device (``dpokit.modeling.load_model(empty=True)``), so no process but the first
    ever holds the whole model (:func:`load_from_rank0`). The scorer's decoder then runs one
    pass per batch (``pass_tokens`` None): each pass gathers every layer, so the processes must
    run the same number. Needs an initialised process group. Returns ``scorer``.

    Raises ``ModelError`` when a process's model differs from process 0's (names, shapes or
    dtypes of parameters and buffers, or the model config).
    """
    mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    check_same_model(scorer, model)
    if getattr(scorer, "pass_tokens", None) is not None:
        # Every decoder pass all-gathers each layer: processes must run the same number of
        # passes, and rows split into groups by length would give each its own count (a hang).
        logger.info("FSDP2: decoder_pass_tokens=%s ignored: one pass per batch", scorer.pass_tokens)
        scorer.pass_tokens = None
    # Process 0's whole tensors, kept alive (no copy) past fully_shard, which replaces the
    # parameters by shards: the others' shards are cut from them.
    full = dict(scorer.state_dict()) if dist.get_rank() == 0 else {}
    names = layer_classes(model)
    layers = [m for m in model.modules() if type(m).__name__ in names]
    for layer in layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(scorer, mesh=mesh)
    load_from_rank0(scorer, full, mesh_device(device_type))
    logger.info(
        "FSDP2: %d %s units + root over %d processes",
        len(layers),
        "/".join(sorted(names)),
        dist.get_world_size(),
    )
    return scorer


def mesh_device(device_type: str) -> torch.device:
    """This process's device of ``device_type`` ("cpu", or the current accelerator index)."""
    if device_type == "cpu":
        return torch.device("cpu")
    return torch.device(device_type, torch.accelerator.current_device_index())


def model_signature(scorer: nn.Module, model: nn.Module) -> dict:
    """What must agree between processes before their shards can be filled from process 0:
    (name, shape, dtype) of every parameter and buffer, and the model config as a dict."""
    tensors = [
        (name, tuple(t.shape), str(t.dtype))
        for named in (scorer.named_parameters(), scorer.named_buffers())
        for name, t in named
    ]
    config = getattr(model, "config", None)
    return {
        "tensors": tensors,
        "config": config.to_dict() if config is not None else None,
        "scorer path": {"fast": getattr(scorer, "fast", None)},  # chunked or exact: same FSDP calls
    }


def check_same_model(scorer: nn.Module, model: nn.Module) -> None:
    """Raise ``ModelError`` on every process if any process built a model unlike process 0's
    (e.g. an empty model built from a config that ``model_init_kwargs`` would have changed).
    Collective; the signatures are small (names, shapes, config)."""
    signatures = [None] * dist.get_world_size()
    dist.all_gather_object(signatures, model_signature(scorer, model))
    for rank, signature in enumerate(signatures[1:], start=1):
        for part in ("tensors", "config", "scorer path"):
            if signature[part] != signatures[0][part]:
                mine, first = signature[part], signatures[0][part]
                diff = [x for x in mine if x not in first] if part == "tensors" else None
                if part != "tensors":
                    diff = {k: v for k, v in mine.items() if first.get(k) != v}
                raise ModelError(
                    f"sharding=fsdp: process {rank} built a model whose {part} differ from "
                    f"process 0's ({str(diff)[:300]}); its weights cannot come from process 0"
                )


def load_from_rank0(scorer: nn.Module, full: dict[str, torch.Tensor], device: torch.device):
    """Fill every process's shards and buffers of the sharded ``scorer`` from process 0.

    ``full``: on process 0 the whole state dict (tensors of any device), elsewhere ``{}``.
    Parameters and buffers still on the meta device get storage first (``to_empty``; FSDP2
    re-reads its sharded parameters at lazy init). Parameters: ``set_model_state_dict`` with
    ``full_state_dict`` and ``broadcast_from_rank0`` (one tensor at a time, each process keeps
    its slice). Buffers -- non-persistent ones such as RoPE's ``inv_freq`` are in no state dict
    -- are broadcast from process 0 whole, as FSDP2 leaves them unsharded. Collective.

    Raises ``RuntimeError`` if a parameter or buffer is still on the meta device afterwards.
    """
    if any(t.is_meta for t in (*scorer.parameters(), *scorer.buffers())):
        scorer.to_empty(device=device)  # keeps tied parameters one object
    options = StateDictOptions(full_state_dict=True, broadcast_from_rank0=True)
    set_model_state_dict(scorer, full, options=options)
    for buffer in scorer.buffers():
        dist.broadcast(buffer, src=0)
    left = [
        name
        for named in (scorer.named_parameters(), scorer.named_buffers())
        for name, t in named
        if t.is_meta or (isinstance(t, DTensor) and t.to_local().is_meta)
    ]
    if left:
        raise RuntimeError(f"still on the meta device after loading from process 0: {left[:5]}")


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


def check_layout(checkpoint: Path, sharded: bool) -> None:
    """Refuse, in one `ConfigError` line, a checkpoint this run cannot load whatever ``resume``
    says: FSDP2's sharded state (``sharded/``) into an unsharded run, or whole weights into a
    sharded one."""
    held = (checkpoint / "sharded").is_dir()
    if held == sharded:
        return
    kinds = {True: "sharded (sharding=fsdp, 2 or more processes)", False: "unsharded"}
    raise ConfigError(
        f"resume: {checkpoint} holds {kinds[held]} weights and optimizer state, and this run is "
        f"{kinds[sharded]}: resume it the way it was saved (the same sharding; a sharded "
        "checkpoint loads into any number of processes above 1)"
    )
