"""Worker for tests/test_sharded.py, run under torchrun: loading a sharded model from process 0.

Process 0 loads the checkpoint (``load_model``); every other process builds it on the meta device
(``empty=True``), optionally adds LoRA, and :func:`dpokit.sharding.shard_scorer` fills its shards
from process 0. Each process writes ``rank{r}.pt``: whether its parameters and buffers were all
on meta before sharding and the bytes they held then, whether the tied embedding is still one
parameter, and every parameter (gathered whole) and buffer after loading.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dpokit.modeling import apply_lora, build_scorer, load_model
from dpokit.sharding import shard_scorer


def held_bytes(tensors) -> int:
    """Bytes of storage ``tensors`` hold on a real device (meta tensors hold none)."""
    return sum(t.numel() * t.element_size() for t in tensors if not t.is_meta)


def main(model_dir: str, lora: str, out_dir: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.manual_seed(100 + rank)  # LoRA's random init differs by process: it must be broadcast
    model = load_model(model_dir, torch.float32, empty=rank != 0)
    if lora == "lora":
        model = apply_lora(model, 4, 8, 0.0, "q_proj,v_proj")
    scorer = build_scorer(model, rank != 0, chunk_size=3, fast=True)
    tensors = [*scorer.parameters(), *scorer.buffers()]
    record = {
        "all_meta_before": all(t.is_meta for t in tensors),
        "bytes_before": held_bytes(tensors),
        "tensors": len(tensors),
    }
    shard_scorer(scorer, model)
    base = model.get_base_model() if lora == "lora" else model
    record["tied"] = base.lm_head.weight is base.model.embed_tokens.weight
    record["sharded"] = all(isinstance(p, DTensor) for p in scorer.parameters())
    # Names as the unsharded model spells them (without the scorer's "model." prefix).
    record["parameters"] = {
        name.removeprefix("model."): p.full_tensor().detach().clone()
        for name, p in scorer.named_parameters()
    }
    record["buffers"] = {
        name.removeprefix("model."): b.detach().clone() for name, b in scorer.named_buffers()
    }
    torch.save(record, Path(out_dir) / f"rank{rank}.pt")
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
