"""A DeepSpeed accelerate config on a machine without a GPU is refused in one line.

accelerate 1.15 enables DeepSpeed only off CPU (``AcceleratorState``: DeepSpeed ``and not cpu``):
launched on CPU with ``configs/accelerate/deepspeed_zero*.yaml`` it would train as plain DDP,
unsharded, with nothing said. ``accelerate launch`` tells the process through
``ACCELERATE_USE_DEEPSPEED=true``, which is what this test sets.
"""

from __future__ import annotations

import json

import pytest
import torch

from dpokit.cli import main
from dpokit.errors import EXIT_CONFIG

ROWS = [{"prompt": f"Question {i}?", "chosen": " yes", "rejected": " no"} for i in range(4)]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_deepspeed_config_on_cpu_is_refused(tiny_dir, tmp_path, monkeypatch, capsys):
    data = tmp_path / "pairs.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    out = tmp_path / "run"
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    argv = ["train", "--model", str(tiny_dir), "--data", str(data), "--output-dir", str(out)]
    code = main([*argv, "progress=false", "batch_size=2", "max_steps=1"])
    err = capsys.readouterr().err
    assert code == EXIT_CONFIG, err
    assert "Traceback" not in err
    (line,) = [x for x in err.splitlines() if x.startswith("dpokit: error: ")]
    assert "DeepSpeed" in line and "sharding=fsdp" in line
    assert not out.exists()  # refused before anything is written
