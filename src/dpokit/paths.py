"""Checks on the paths a user gives, made before anything loads, each failing with one line.

A run that would fail after minutes of tokenizing or loading weights because its output directory
is a file, or its model path is mistyped while offline, fails here in milliseconds instead. Every
check raises `dpokit.errors.PathError` or `dpokit.errors.ModelError` naming the config key, the
path and what is wrong. Nothing is written: a writability probe creates and removes a temporary
file in the nearest directory that already exists.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from dpokit.errors import ModelError, PathError

OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")


def looks_like_path(name: str) -> bool:
    """Whether ``name`` can only be a local path, not a hub id (``name`` or ``org/name``)."""
    return (
        name.startswith(("/", ".", "~"))
        or "\\" in name
        or name.count("/") > 1
        or name.endswith("/")
    )


def offline() -> bool:
    """Whether the Hugging Face hub may not be contacted (``HF_HUB_OFFLINE=1`` or
    ``TRANSFORMERS_OFFLINE=1``)."""
    return any(
        os.environ.get(name, "").strip().upper() in ("1", "ON", "YES", "TRUE")
        for name in OFFLINE_VARIABLES
    )


def check_writable_dir(path: str | os.PathLike, key: str) -> None:
    """``path`` is a directory, or can be made as one, and files can be written in it.

    Raises `PathError`: the path is a file; a parent of it is a file; or the nearest existing
    directory refuses a new file (permissions, a read-only file system, no space).
    """
    path = Path(path).expanduser()
    if _exists(path) and not path.is_dir():
        raise PathError(f"{key}={path}: is a file, not a directory")
    existing = path
    while not _exists(existing) and existing.parent != existing:
        existing = existing.parent
    if not existing.is_dir():
        raise PathError(f"{key}={path}: {existing} is a file, so no directory can be made in it")
    try:
        handle, probe = tempfile.mkstemp(dir=existing, prefix=".dpokit-write-test-")
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise PathError(f"{key}={path}: cannot write in {existing} ({reason})") from None
    os.close(handle)
    os.unlink(probe)


def check_model_path(name: str | None, key: str = "model") -> None:
    """``name`` is a local model directory, or a hub id that can be had.

    Raises `ModelError` for a path that does not exist (a name that cannot be a hub id, or any
    name while offline that is not in the Hugging Face cache) and for a file given instead of the
    model's directory. Whether a hub id exists online is left to the download.
    """
    if not name:
        return
    path = Path(name).expanduser()
    if _exists(path):
        if not path.is_dir():
            raise ModelError(
                f"{key}={name}: is a file; give the directory that holds the model's config.json "
                "and weights (save_pretrained output)"
            )
        return
    if looks_like_path(name):
        raise ModelError(f"{key}={name}: no such directory")
    if offline() and not _in_hub_cache(name):
        variables = " / ".join(v for v in OFFLINE_VARIABLES if os.environ.get(v))
        raise ModelError(
            f"{key}={name}: not a local directory, and not in the Hugging Face cache; {variables} "
            "is set, so it cannot be downloaded (give a local path, or download it first)"
        )


def read_text_file(path: str | os.PathLike, key: str) -> str:
    """The UTF-8 text of a file the user named (a chat template, a prompts file).

    Raises `PathError` naming the key, the file and, for bytes that are not UTF-8, the line.
    """
    try:
        data = Path(path).expanduser().read_bytes()
    except OSError as err:
        raise PathError(f"{key}={path}: cannot read it ({err.strerror})") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[: err.start].count(b"\n") + 1
        raise PathError(
            f"{key}={path}, line {line}: not UTF-8 text (byte {data[err.start]:#04x})"
        ) from None


def check_run_paths(config) -> None:
    """Before anything loads, for a `dpokit.config.TrainConfig`: the model and reference exist (or
    can be downloaded), the run and cache directories can be written and the chat template file
    read (`ModelError` / `PathError`)."""
    check_model_path(config.model, "model")
    check_model_path(config.reference, "reference")
    check_writable_dir(config.output_dir, "output_dir")
    if config.reference_cache_dir:
        check_writable_dir(config.reference_cache_dir, "reference_cache_dir")
    if config.chat_template:
        read_text_file(config.chat_template, "chat_template")


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # e.g. permission denied on a parent: treat as absent, the probe decides
        return False


def _in_hub_cache(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache
    except ImportError:
        return False
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False
