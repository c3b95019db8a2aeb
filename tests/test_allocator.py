"""dpokit.allocator: with glibc's mmap threshold fixed, freed CPU tensors leave the resident set.

Run in a subprocess each: the setting is process-wide and would slow the rest of the suite.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from dpokit import distributed
from dpokit.engine import Trainer
from helpers import make_config

SRC = Path(__file__).resolve().parents[1] / "src"

# Frees 40 tensors of 8 MiB made between long-lived ones of 256 KiB (so no hole sits at the top
# of the heap, where glibc would trim it anyway) and reports how much of the 330 MiB allocated
# stays resident.
SCRIPT = """
import json, sys, torch
from dpokit.allocator import map_large_allocations
mapped = map_large_allocations() if sys.argv[1] == "map" else None
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096 / 2**20
torch.ones(4 << 20)  # 16 MiB, freed at once: glibc then raises its threshold past 8 MiB
big, keep = [], []
before = rss_mb()
for _ in range(40):
    big.append(torch.ones(2 << 20))  # 8 MiB, touched
    keep.append(torch.ones(1 << 16))  # 256 KiB: from the top of the heap, after the last block
del big
print(json.dumps({"mapped": mapped, "retained_mb": rss_mb() - before}))
"""


def _run(mode: str) -> dict:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(SRC), os.environ.get("PYTHONPATH", "")]))
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, env=env, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc's mallopt only",
)
def test_map_large_allocations_returns_freed_tensors_to_the_os():
    mapped = _run("map")
    assert mapped["mapped"] is True
    assert mapped["retained_mb"] < 40  # of 320 MiB freed only the 10 MiB of keepers remain
    # Without it glibc serves the 8 MiB blocks from its heap and the freed ones stay resident:
    # the reason for the module (glibc's dynamic threshold, unchanged since glibc 2.5).
    assert _run("default")["retained_mb"] > 250


@pytest.mark.parametrize("checkpointing", [False, True])
def test_trainer_maps_large_allocations_with_gradient_checkpointing_on_cpu(
    tiny_dir, tmp_path, monkeypatch, checkpointing
):
    calls = []
    monkeypatch.setattr(distributed, "map_large_allocations", lambda: calls.append("mapped"))
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(4)]
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    Trainer(make_config(tiny_dir, str(data), tmp_path, gradient_checkpointing=checkpointing))
    assert calls == (["mapped"] if checkpointing else [])
