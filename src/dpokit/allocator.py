"""Freed CPU tensors back to the operating system, so a training process's resident memory
follows the tensors it holds (glibc only; a no-op elsewhere).

glibc's malloc serves a request below its mmap threshold from heaps it keeps, and raises that
threshold (up to 32 MiB on 64-bit) each time a larger mmapped block is freed. A few steps into
training on CPU every activation under 32 MiB comes from those heaps, and what is freed there
mostly stays resident: up to 500 MB of a 4.5 GB peak for one pair of 2k-token completions of a
Qwen2.5-0.5B-shaped model (benchmarks/memory_probe.py, PERFORMANCE.md). A fixed threshold
serves every tensor of at least that size with its own mapping, unmapped when freed. The price
is a page fault per page of each such allocation (about 0.5 ms per MB here), which is a few per
cent of a step that recomputes activations, but up to a fifth of a small model's fast step.
"""

from __future__ import annotations

import ctypes
import logging
import sys

logger = logging.getLogger(__name__)

M_MMAP_THRESHOLD = -3  # glibc <malloc.h>: mallopt's parameter number for the mmap threshold


def map_large_allocations(threshold_mb: float = 1.0) -> bool:
    """Make glibc serve every allocation of at least ``threshold_mb`` MiB with its own mmap
    (returned to the OS when freed) and stop it raising that threshold. Process-wide, for the
    rest of the process. Returns True if set; False where there is no glibc ``mallopt``
    (not Linux, musl) or it refused (threshold above its 32 MiB maximum)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = bool(mallopt(M_MMAP_THRESHOLD, int(threshold_mb * 2**20)))
    if ok:
        logger.info(
            "CPU allocations of %g MiB or more now return to the OS when freed", threshold_mb
        )
    return ok
