"""Pre-computed reference log-probs: the table, and its on-disk cache.

:class:`PrecomputedReference` holds sequence log-probs computed once before training; the cache
keeps them under a key (:class:`CacheKey`) that hashes the reference weights' identity
(:func:`model_identity`), the dataset fingerprint and the tokenization settings, verified on load
(:mod:`dpokit.cache`). :mod:`dpokit.reference` builds and uses them.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from dpokit.cache import discard, read_verified, write_verified
from dpokit.hashing import file_sha256, json_digest, sha256_hex
from dpokit.logprobs import ScoreOutput

logger = logging.getLogger("dpokit.reference")

CACHE_FORMAT_VERSION = 1
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model")


class PrecomputedReference:
    """Sequence log-probs looked up by the row ``index`` each batch carries."""

    def __init__(self, logps: torch.Tensor, token_counts: torch.Tensor):
        self.logps = logps  # (num_rows, 2): chosen, rejected
        self.token_counts = token_counts  # (num_rows, 2)
        self.local_rows = 0  # rows this process scored when it computed the table (0: cached)

    def score(self, batch: dict[str, torch.Tensor], return_hidden: bool = False) -> ScoreOutput:
        """The table's ``(2B,)`` log-probs (chosen rows, then rejected rows) of the ``(B,)`` rows
        ``batch["index"]``. Raises ``ValueError`` for ``return_hidden`` (no hidden states)."""
        if return_hidden:
            raise ValueError("pre-computed reference log-probs carry no hidden states")
        index = batch["index"].cpu()  # (B,)
        device = batch["input_ids"].device
        logps = torch.cat([self.logps[index, 0], self.logps[index, 1]]).to(device)  # (2B,)
        counts = torch.cat([self.token_counts[index, 0], self.token_counts[index, 1]]).to(device)
        return ScoreOutput(logps=logps, token_counts=counts, avg_logps=logps / counts.clamp(min=1))


# ---- the on-disk cache ------------------------------------------------------------------------


def model_identity(name_or_path: str, progress: bool = False) -> str:
    """A hash of what the reference weights are.

    For a local directory: the contents of its weight and config files (streamed; memoised by
    path, size and mtime so a run hashes a 15 GB checkpoint at most once). For a hub id: the id
    and the resolved snapshot (its commit hash is part of the cached path) when available.
    ``progress``: a bar per weight file while it is hashed.
    """
    path = Path(name_or_path)
    if not path.is_dir():
        return _hub_identity(name_or_path)
    parts = []
    for file in sorted(p for p in path.iterdir() if p.suffix in WEIGHT_SUFFIXES):
        if file.name.startswith("tokenizer") or file.name == "special_tokens_map.json":
            continue  # tokenizer files are part of the tokenization key, not the weights
        parts += [file.name, _file_digest(file, progress)]
    return sha256_hex(*parts)


_FILE_DIGESTS: dict[tuple[str, int, int], str] = {}


def _file_digest(file: Path, progress: bool = False) -> str:
    stat = file.stat()
    memo_key = (str(file.resolve()), stat.st_size, stat.st_mtime_ns)
    if memo_key not in _FILE_DIGESTS:
        _FILE_DIGESTS[memo_key] = file_sha256(file, block_size=1 << 24, progress=progress)
    return _FILE_DIGESTS[memo_key]


def _hub_identity(repo_id: str) -> str:
    try:
        from huggingface_hub import snapshot_download

        snapshot = snapshot_download(repo_id, local_files_only=True)
        return sha256_hex(f"hub:{repo_id}:{Path(snapshot).name}")
    except Exception:  # not cached locally: fall back to the id itself
        return sha256_hex(f"hub:{repo_id}")


@dataclass(frozen=True)
class CacheKey:
    """What produced a table of reference log-probs."""

    reference_identity: str
    data_fingerprint: str
    settings: str  # tokenization + scoring settings that change the numbers (JSON)

    @property
    def digest(self) -> str:
        """32 hex characters naming the cached table's file."""
        return json_digest(
            [CACHE_FORMAT_VERSION, self.reference_identity, self.data_fingerprint, self.settings]
        )


def default_cache_dir() -> Path:
    """``$DPOKIT_CACHE/reference_logps`` (default ``~/.cache/dpokit/reference_logps``)."""
    root = os.environ.get("DPOKIT_CACHE", Path.home() / ".cache" / "dpokit")
    return Path(root) / "reference_logps"


CACHE_NAME = "reference log-probs cache"


def load_cached(cache_dir: Path, key: CacheKey, num_rows: int) -> PrecomputedReference | None:
    """The cached table of ``key`` when it exists, matches its checksum (:mod:`dpokit.cache`)
    and has ``num_rows`` rows, else None. A corrupt, truncated or unchecked file is reported in
    one line and removed."""
    file = cache_dir / f"{key.digest}.safetensors"
    data = read_verified(file, CACHE_NAME)
    if data is None:
        return None
    try:
        tensors = load_safetensors(data)
        logps, counts = tensors["logps"], tensors["token_counts"]
    except Exception as error:  # noqa: BLE001 - a verified file a reader refuses: written bad
        discard(file, CACHE_NAME, f"{file} does not load ({type(error).__name__})")
        return None
    if logps.shape != (num_rows, 2) or counts.shape != (num_rows, 2):
        discard(file, CACHE_NAME, f"{file} holds {logps.shape[0]} rows, not {num_rows}")
        return None
    return PrecomputedReference(logps, counts)


def save_cached(cache_dir: Path, key: CacheKey, reference: PrecomputedReference) -> Path:
    """Write the table with its checksum, atomically: a killed run never leaves a half-written
    table behind, and two runs writing it at once leave one valid file."""
    file = cache_dir / f"{key.digest}.safetensors"
    metadata = {
        "reference_identity": key.reference_identity,
        "data_fingerprint": key.data_fingerprint,
        "settings": key.settings,
    }
    tensors = {"logps": reference.logps, "token_counts": reference.token_counts}
    return write_verified(file, save_safetensors(tensors, metadata=metadata))
