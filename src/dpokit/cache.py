"""Cache entries that are verified before they are trusted.

Every file dpokit writes to read back later -- tokenized data (Arrow), pre-computed reference
log-probs (safetensors), SLiC reference samples, SPIN generations, stepwise chunk plans -- is an
*entry*: one or more data files plus a sidecar manifest ``<entry>.sha256.json`` holding the size
and SHA-256 (:mod:`dpokit.hashing`) of each file. On load the files are checked against it; an
entry that is corrupt (a flipped bit), truncated, partial (a file missing) or has no manifest
(an older dpokit, or a run killed between writing the data and the manifest) is reported in ONE
log line (which cache, which file, why), removed, and the caller recomputes it.

Writes are atomic: data goes to a private temporary file in the same directory, is flushed to
disk and renamed over the entry; the manifest is written the same way, last. Publishing (rename
+ manifest) and removing hold an exclusive ``flock`` on ``.<entry>.lock`` and verifying a shared
one, so two runs writing the same entry at once leave one valid entry, and a reader never
removes an entry another process has just published. (Without ``fcntl``, e.g. on Windows, the
lock is skipped; the renames stay atomic.)
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
from collections.abc import Iterator, Sequence
from pathlib import Path

from dpokit.hashing import file_sha256, sha256_hex

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks
    fcntl = None

logger = logging.getLogger("dpokit.cache")

MANIFEST_SUFFIX = ".sha256.json"
MANIFEST_VERSION = 1


def manifest_path(path: str | Path) -> Path:
    """The sidecar manifest of the entry whose main file is ``path``."""
    path = Path(path)
    return path.with_name(path.name + MANIFEST_SUFFIX)


@contextlib.contextmanager
def entry_lock(path: str | Path, exclusive: bool) -> Iterator[None]:
    """Hold the entry's advisory lock (``.<name>.lock`` beside it) for the duration; none when
    the lock file cannot be created (a read-only cache directory)."""
    path = Path(path)
    if fcntl is None:
        yield
        return
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(path.with_name(f".{path.name}.lock"), "a+b")  # noqa: SIM115 - held below
    except OSError:  # a read-only cache: nothing is written there, so nothing to serialise
        handle = None
    if handle is None:
        yield
        return
    with handle:
        fcntl.flock(handle, fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def atomic_write(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to ``path`` through a private temporary file, fsync and rename: a killed
    process leaves the old file or none, never part of one. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.tmp")
    try:
        with os.fdopen(handle, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return path


def _manifest_bytes(files: dict[str, tuple[int, str]]) -> bytes:
    payload = {
        "version": MANIFEST_VERSION,
        "files": {
            name: {"bytes": size, "sha256": digest} for name, (size, digest) in files.items()
        },
    }
    return (json.dumps(payload, indent=1, sort_keys=True) + "\n").encode()


def write_verified(path: str | Path, data: bytes) -> Path:
    """Publish ``data`` as the one-file entry ``path`` with its manifest (atomic, locked).

    Raises ``OSError`` when the directory cannot be written.
    """
    path = Path(path)
    record = {path.name: (len(data), sha256_hex(data))}
    with entry_lock(path, exclusive=True):
        atomic_write(path, data)
        atomic_write(manifest_path(path), _manifest_bytes(record))
    return path


def record_entry(path: str | Path, files: Sequence[str | Path]) -> bool:
    """Write the manifest of the entry ``path`` for ``files`` (same directory) that another
    library has already written in place (datasets' Arrow files), digesting them as they are
    now, under the exclusive lock. Returns False, writing nothing, when one of them is gone
    (another process removed it meanwhile): the entry then stays unverified, a miss next time."""
    path = Path(path)
    with entry_lock(path, exclusive=True):
        record = {}
        for file in map(Path, files):
            try:
                record[file.name] = (file.stat().st_size, file_sha256(file))
            except FileNotFoundError:
                return False
        atomic_write(manifest_path(path), _manifest_bytes(record))
    return True


def _problem(path: Path, data: bytes | None = None) -> tuple[str | None, list[Path]]:
    """(why the entry ``path`` is not valid or None, the files its manifest lists). ``data``:
    the bytes of ``path`` already read (they are checked instead of the file)."""
    manifest = manifest_path(path)
    try:
        listed = json.loads(manifest.read_bytes())["files"]
        files = {
            path.parent / name: (int(v["bytes"]), str(v["sha256"])) for name, v in listed.items()
        }
    except FileNotFoundError:
        return f"{path} has no checksum file {manifest.name}", []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{path}: its checksum file {manifest.name} is unreadable", []
    for file, (size, digest) in files.items():
        in_memory = data if file == path else None
        try:
            actual = len(in_memory) if in_memory is not None else file.stat().st_size
        except FileNotFoundError:
            return f"{file} is missing (partial entry)", list(files)
        if actual < size:
            return f"{file} is truncated ({actual} of {size} bytes)", list(files)
        if actual > size:
            return f"{file} has {actual} bytes, {size} recorded", list(files)
        found = sha256_hex(in_memory) if in_memory is not None else file_sha256(file)
        if found != digest:
            return f"{file} is corrupt (its SHA-256 differs from the recorded one)", list(files)
    return None, list(files)


def check_entry(
    path: str | Path, what: str, candidates: Sequence[str | Path] = ()
) -> list[Path] | None:
    """The files of the entry ``path`` (as its manifest lists them) when every one matches the
    manifest, else None.

    An entry none of whose files (``path``, ``candidates``, the manifest) exists is a quiet miss.
    Otherwise a bad entry is logged in one warning line naming ``what`` (e.g. "reference
    log-probs cache"), the file and why, and removed with ``candidates``.
    """
    path = Path(path)
    owned = [path, manifest_path(path), *map(Path, candidates)]
    if not any(file.exists() for file in owned):
        return None
    with entry_lock(path, exclusive=False):
        problem, listed = _problem(path)
    if problem is None:
        return listed
    discard(path, what, problem, candidates, recheck=True)
    return None


def read_verified(path: str | Path, what: str) -> bytes | None:
    """The bytes of the one-file entry ``path`` when they match its manifest, else None (a miss;
    a bad entry is logged in one line and removed, see :func:`check_entry`).

    The bytes returned are the ones verified: parse them, do not read the file again.
    """
    path = Path(path)
    if not path.exists() and not manifest_path(path).exists():
        return None
    with entry_lock(path, exclusive=False):
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            data = None
        problem, _ = _problem(path, data)
    if problem is None and data is not None:
        return data
    discard(path, what, problem or f"{path} is missing", recheck=True)
    return None


def discard(
    path: str | Path,
    what: str,
    reason: str,
    candidates: Sequence[str | Path] = (),
    recheck: bool = False,
) -> None:
    """Remove the entry ``path`` (its manifest, the files it lists and ``candidates``) and log
    ``reason`` in one warning line. ``recheck``: keep an entry that verifies by the time the
    exclusive lock is held (another process republished it meanwhile)."""
    path = Path(path)
    with entry_lock(path, exclusive=True):
        problem, listed = _problem(path)
        if recheck and problem is None:
            return
        for file in {path, *listed, *map(Path, candidates), manifest_path(path)}:
            with contextlib.suppress(FileNotFoundError):
                file.unlink()
    logger.warning("%s: %s; removed it, recomputing", what, reason)
