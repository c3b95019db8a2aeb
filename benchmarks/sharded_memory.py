"""Per-process peak memory of training with and without dpokit's FSDP2 (``sharding=fsdp``).

A model whose weights + gradients + AdamW state dominate (default: a Llama of ~373M parameters,
hidden 1024, 24 layers, vocabulary 32,000, untied head) is trained for a few DPO-like steps on
random tokens (one pair per process, short rows, so activations are small). Run once with one
process (unsharded) and once with two (sharded); each process reports its peak RSS
(``ru_maxrss``) and the bytes of the parameters, gradients and optimizer state it holds.

    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 1 \
        benchmarks/sharded_memory.py --out benchmarks/results/sharded_memory_1.json
    OMP_NUM_THREADS=1 python -m torch.distributed.run --nproc_per_node 2 \
        benchmarks/sharded_memory.py --out benchmarks/results/sharded_memory_2.json

Not a test: it needs ~8 GB for one process (fp32: 4 + 4 + 8 bytes per parameter) and minutes.
With two processes only process 0 builds the model; process 1 builds it on the meta device and
receives its shards from process 0 (``shard_scorer``), as ``sharding=fsdp`` runs do.
``peak_rss_after_loading_gb`` is the peak once the model is built and sharded, before training.
A smaller model fits a small machine: ``--hidden 512 --intermediate 1408 --layers 12`` (71M).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor
from transformers import AutoConfig, AutoModelForCausalLM

from dpokit.modeling import build_scorer
from dpokit.sharding import clip_grad_norm, shard_scorer


def local_bytes(tensors) -> int:
    """Bytes this process holds for ``tensors`` (a DTensor counts its local shard only)."""
    total = 0
    for t in tensors:
        if t is None:
            continue
        local = t.to_local() if isinstance(t, DTensor) else t
        total += local.numel() * local.element_size()
    return total


def build(args, empty: bool) -> torch.nn.Module:
    """The benchmark's Llama, randomly initialised (seed 0); ``empty``: on the meta device, as
    a sharded run's processes other than 0 build it (its shards then come from process 0)."""
    config = AutoConfig.for_model(
        "llama",
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=args.hidden // 64,
        num_key_value_heads=args.hidden // 64,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    with torch.device("meta" if empty else "cpu"):
        model = AutoModelForCausalLM.from_config(config)
    model.config.use_cache = False
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--intermediate", type=int, default=2816)
    parser.add_argument("--layers", type=int, default=24)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    empty = world > 1 and rank != 0  # only process 0 holds the whole model, as in a run
    model = build(args, empty)
    params = sum(p.numel() for p in model.parameters())
    scorer = build_scorer(model, empty, chunk_size=256, fast=True)
    if world > 1:
        shard_scorer(scorer, model)
    loaded_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    optimizer = torch.optim.AdamW(scorer.parameters(), lr=1e-5, fused=True)
    ids = torch.randint(
        0, args.vocab, (2, args.tokens), generator=torch.Generator().manual_seed(rank)
    )
    completion = torch.zeros_like(ids, dtype=torch.bool)
    completion[:, args.tokens // 2 :] = True
    tick = time.perf_counter()
    for _ in range(args.steps):
        logps = scorer(ids, torch.ones_like(ids), completion).logps  # (2,): chosen, rejected
        loss = -torch.nn.functional.logsigmoid(0.1 * (logps[0] - logps[1]))
        loss.backward()
        clip_grad_norm(scorer.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # keep the gradients' memory: counted below
    seconds = (time.perf_counter() - tick) / args.steps
    state = [t for s in optimizer.state.values() for t in s.values() if torch.is_tensor(t)]
    record = {
        "processes": world,
        "rank": rank,
        "parameters": params,
        "model": {k: getattr(args, k) for k in ("hidden", "intermediate", "layers", "vocab")},
        "peak_rss_after_loading_gb": loaded_rss,
        "peak_rss_gb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20,
        "weights_gb": local_bytes(scorer.parameters()) / 2**30,
        "grads_gb": local_bytes(p.grad for p in scorer.parameters()) / 2**30,
        "optimizer_gb": local_bytes(state) / 2**30,
        "seconds_per_step": seconds,
    }
    records = [None] * world
    dist.all_gather_object(records, record)
    if rank == 0:
        with open(args.out, "w") as handle:
            json.dump(records, handle, indent=1)
        print(json.dumps(records, indent=1))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
