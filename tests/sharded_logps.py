"""Worker for tests/test_sharded.py, run under torchrun: chunked log-probs of a sharded scorer.

Each process shards a CompletionScorer with dpokit's FSDP2 and scores its half of a fixed batch
on the chunked path (``fast=True``; the exact path is made to raise, so no (tokens x vocab)
logits exist); the main process writes to JSON the gathered log-probs, whether the head is
sharded before and whole after the forward, and TDPO's token KL against a second sharded model
(a frozen reference).
"""

from __future__ import annotations

import json
import sys

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor

from dpokit.logprobs import CompletionScorer, sequence_kl_from_hidden
from dpokit.modeling import load_model
from dpokit.sharding import shard_scorer


def no_full_logits(*args, **kwargs):
    raise AssertionError("the exact path (full logits) ran under sharding")


def main(model_dir: str, reference_dir: str, out_path: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    policy_model = load_model(model_dir, torch.float32)
    policy = CompletionScorer(policy_model, chunk_size=3, fast=True)
    policy._completion_logits = no_full_logits
    shard_scorer(policy, policy_model)
    reference_model = load_model(reference_dir, torch.float32).requires_grad_(False)
    reference = CompletionScorer(reference_model, chunk_size=3, fast=True)
    shard_scorer(reference, reference_model)
    sharded_before = isinstance(policy.head.weight, DTensor)
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(4, 300, (4, 12), generator=generator)
    completion = torch.zeros(4, 12, dtype=torch.bool)
    completion[:, 5:] = True
    completion[1, 9:] = False
    mine = slice(rank * 4 // world, (rank + 1) * 4 // world)
    out = policy(ids[mine], torch.ones_like(ids[mine]), completion[mine], return_hidden=True)
    with torch.no_grad():
        ref = reference(ids[mine], torch.ones_like(ids[mine]), completion[mine], return_hidden=True)
    kl = sequence_kl_from_hidden(out, ref, policy.head, reference.head, chunk_size=3)
    whole_after = not isinstance(policy.head.weight, DTensor)
    gathered = [None] * world
    dist.all_gather_object(gathered, (out.logps.tolist(), kl.tolist()))
    if rank == 0:
        record = {
            "logps": [x for part in gathered for x in part[0]],
            "kl": [x for part in gathered for x in part[1]],
            "head_sharded_before": sharded_before,
            "head_whole_after_forward": whole_after,
        }
        with open(out_path, "w") as handle:
            json.dump(record, handle)
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], sys.argv[3])
