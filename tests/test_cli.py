"""The ``dpokit`` command as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

from dpokit.cli import main
from dpokit.losses import METHODS


def test_methods_lists_every_method(capsys):
    assert main(["methods"]) == 0
    out = capsys.readouterr().out
    for name in METHODS:
        assert name in out


def test_train_help_lists_config_keys():
    proc = subprocess.run(
        [sys.executable, "-m", "dpokit.cli", "train", "--help"], capture_output=True, text=True
    )
    assert proc.returncode == 0
    assert "max_prompt_length" in proc.stdout and "key=value" in proc.stdout


def test_bad_override_is_a_clear_error_before_loading(capsys):
    code = main(["train", "--model", "no/such/model", "--data", "x.jsonl", "learning_rat=1"])
    assert code == 2
    assert "Did you mean learning_rate" in capsys.readouterr().err


def test_train_end_to_end_through_the_cli(tiny_dir, tmp_path):
    data = tmp_path / "pairs.jsonl"
    rows = [{"prompt": f"Q{i}?", "chosen": " yes", "rejected": " no"} for i in range(8)]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--method",
            "simpo",
            "--model",
            str(tiny_dir),
            "--data",
            str(data),
            "--output-dir",
            str(out),
            "max_steps=2",
            "batch_size=4",
            "progress=false",
            "beta=2.5",
        ]
    )
    assert code == 0
    assert (out / "final" / "model.safetensors").exists()
    assert "beta: 2.5" in (out / "config.yaml").read_text()
    assert main(["plot", str(out)]) == 0
    assert (out / "plots" / "loss.png").exists()
