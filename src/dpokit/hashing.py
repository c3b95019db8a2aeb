"""The one place dpokit hashes things: cache keys, data fingerprints, model identities.

Every digest is SHA-256 in lowercase hex. JSON payloads are encoded with sorted keys and
``default=str`` (values JSON cannot hold are hashed as their string), so equal payloads give equal
digests across runs and processes. This module imports nothing from dpokit: every layer may use it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

# Digest length (hex characters) of derived data fingerprints and cache keys: 128 bits.
SHORT = 32


def sha256_hex(*parts: str | bytes, length: int | None = None) -> str:
    """SHA-256 of the concatenation of ``parts`` (strings encoded as UTF-8), in hex.

    ``length`` keeps the first ``length`` hex characters (None: all 64).
    """
    digest = hashlib.sha256()
    for part in parts:
        digest.update(part.encode() if isinstance(part, str) else part)
    return digest.hexdigest()[:length]


def json_digest(payload: Any, length: int | None = SHORT) -> str:
    """SHA-256 of ``payload`` as canonical JSON (sorted keys, ``default=str``), in hex.

    ``length`` keeps the first ``length`` hex characters (None: all 64).
    """
    return sha256_hex(json.dumps(payload, sort_keys=True, default=str), length=length)


def derive_fingerprint(fingerprint: str, tag: str) -> str:
    """The fingerprint of data derived from data with ``fingerprint`` by the step named ``tag``
    (a split, a selection, an added column): 32 hex characters."""
    return json_digest([fingerprint, tag])


def file_sha256(
    path: str | Path, prefix: str = "", block_size: int = 1 << 20, progress: bool = False
) -> str:
    """SHA-256 (all 64 hex characters) of ``prefix`` followed by the bytes of the file ``path``,
    read in ``block_size`` blocks (the file is never held in memory whole). ``progress``: show a
    bar in bytes (hashing a multi-GB checkpoint takes a while).

    Raises ``OSError`` when the file cannot be read.
    """
    digest = hashlib.sha256(prefix.encode())
    size = Path(path).stat().st_size
    desc = f"hashing {Path(path).name}"
    with (
        open(path, "rb") as handle,
        tqdm(total=size, desc=desc, unit="B", unit_scale=True, disable=not progress) as bar,
    ):
        for block in iter(lambda: handle.read(block_size), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()
