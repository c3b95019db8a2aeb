"""Worker for tests/test_uneven_epochs.py, run under torchrun: several runs in one launch.

``python -m torch.distributed.run --nproc_per_node=P tests/uneven_runs.py RUNS.json``: each entry
of the JSON list is ``{"entry": "train" | "sft", "config": {TrainConfig keys}}``, run in order in
the same process group (one launch pays the start-up of the processes once).
"""

from __future__ import annotations

import json
import sys

from dpokit import train
from dpokit.config import TrainConfig
from dpokit.distributed import init_processes
from dpokit.recipes.sft import run_sft

ENTRIES = {"train": train, "sft": run_sft}


def main(path: str) -> None:
    init_processes()  # gloo on a CPU box, before any Accelerator
    with open(path, encoding="utf-8") as handle:
        runs = json.load(handle)
    for run in runs:
        ENTRIES[run["entry"]](TrainConfig.from_dict(run["config"]))


if __name__ == "__main__":
    main(sys.argv[1])
