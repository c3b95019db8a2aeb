#!/usr/bin/env bash
# One command on a machine with a CUDA GPU (see benchmarks/gpu_check.py for the steps):
#
#   bash benchmarks/gpu_check.sh OUT_DIR [--install] [--cpu] [--budget SECONDS] [--no-bench]
#
# Runs from a fresh checkout: dpokit is imported from src/ (no install needed when its
# dependencies are there). With --install it pip-installs, each optional and time-limited:
#   - dpokit's own dependencies (`pip install -e .`), only when they are missing;
#   - trl>=1.16, when missing;
#   - liger-kernel (--no-deps), when missing and CUDA is there;
#   - flash-attn (--no-deps --only-binary=:all:, or a wheel from the folder $GPU_CHECK_WHEELS),
#     when missing and CUDA is there.
# What could not be installed is reported as skipped and the check carries on without it.
# Environment: PYTHON (default python3), GPU_CHECK_TIMEOUT (hard stop in seconds, default 1200).
set -euo pipefail

if [[ $# -lt 1 || "$1" == -* ]]; then
    echo "usage: bash benchmarks/gpu_check.sh OUT_DIR [--install] [--cpu] [--budget S] [--no-bench]" >&2
    exit 2
fi
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PY="${PYTHON:-python3}"
export PYTHONPATH="$ROOT/src${PYTHONPATH:+:$PYTHONPATH}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1

if ! "$PY" -c "import dpokit.config, transformers, accelerate, datasets, peft" 2>/dev/null; then
    if [[ " $* " == *" --install "* ]]; then
        echo "gpu_check: installing dpokit's dependencies (pip install -e $ROOT)" >&2
        timeout 300 "$PY" -m pip install --disable-pip-version-check -e "$ROOT"
    else
        echo "gpu_check: dpokit's dependencies are missing for $PY; install them" \
             "(pip install -e $ROOT) or pass --install" >&2
        exit 2
    fi
fi

# The Python driver keeps to its own --budget; this is the backstop if something hangs anyway.
exec timeout --kill-after=30 "${GPU_CHECK_TIMEOUT:-1200}" "$PY" "$HERE/gpu_check.py" "$@"
