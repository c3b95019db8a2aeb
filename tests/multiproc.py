"""Running ``dpokit`` in child processes from tests: launchers, environment, timeouts."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DDP_CONFIG = REPO / "configs" / "accelerate" / "ddp.yaml"


def free_port() -> int:
    """A TCP port nobody listens on now (the OS picks it), for the rendezvous."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def child_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The parent's environment with private caches, offline hubs and one thread per process."""
    env = dict(os.environ)
    env.update(
        DPOKIT_CACHE=str(tmp_path / "dpokit-cache"),
        HF_DATASETS_CACHE=str(tmp_path / "hf-datasets"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",
        PYTHONUNBUFFERED="1",
    )
    env.pop("WORLD_SIZE", None)
    env.update(extra)
    return env


def dpokit_command(args: list[str]) -> list[str]:
    return [sys.executable, "-m", "dpokit.cli", *args]


def torchrun_command(nproc: int, port: int, args: list[str]) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--master_port={port}",
        "-m",
        "dpokit.cli",
        *args,
    ]


def accelerate_command(nproc: int, port: int, args: list[str]) -> list[str]:
    """``accelerate launch`` with the repository's DDP config (runs over gloo on a CPU box)."""
    return [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--config_file",
        str(DDP_CONFIG),
        "--num_processes",
        str(nproc),
        "--main_process_port",
        str(port),
        "-m",
        "dpokit.cli",
        *args,
    ]


def run(command: list[str], env: dict[str, str], timeout: float = 240) -> str:
    """Run to completion; on failure or timeout raise with the output's tail (the child's error)."""
    try:
        proc = subprocess.run(
            command, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired as err:
        tail = (err.stdout or b"")[-3000:], (err.stderr or b"")[-3000:]
        raise AssertionError(f"timed out after {timeout}s: {command}\n{tail}") from None
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        # The launcher's summary ends the output; the children's errors come before it.
        errors = [line for line in output.splitlines() if "Error" in line or "error:" in line]
        summary = "\n".join(errors[-20:])
        raise AssertionError(
            f"exit {proc.returncode}: {' '.join(command)}\n{summary}\n{output[-4000:]}"
        )
    return output
