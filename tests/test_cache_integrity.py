"""Caches are verified before they are trusted (issue 11, section 3).

Each cache a run reads back -- the tokenized pairs (Arrow) and the pre-computed reference
log-probs (safetensors) here; SLiC samples, SPIN generations and stepwise plans in
tests/test_text_roundtrip.py -- is damaged on disk between two runs: a few flipped bits, a
truncation, a missing checksum file. The second run must say so in one line, recompute, and end
with the weights of a run that never saw the damage.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import load_file

import dpokit
from dpokit import train
from dpokit.cache import manifest_path, read_verified
from dpokit.data import DataConfig, prepare_pairs
from dpokit.data.pipeline import verified_cache
from helpers import train_config
from test_engine import write_pairs


@pytest.fixture(scope="module")
def pairs_file(tmp_path_factory):
    return write_pairs(tmp_path_factory.mktemp("data") / "pairs.jsonl", rows=16)


def run(tiny_dir, data, root: Path, name: str):
    """A 3-step DPO run with a pre-computed reference; its reference cache under ``root``, its
    tokenized data in the datasets cache (``root/hf-datasets`` in these tests)."""
    config = train_config(
        tiny_dir,
        data,
        root / name,
        root / "reference-cache",
        max_steps=3,
        shuffle=False,
        reference_mode="precomputed",
    )
    result = train(config)
    return load_file(str(Path(result.final_dir) / "model.safetensors"))


def assert_same_weights(got: dict, expected: dict) -> None:
    assert got.keys() == expected.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, atol=1e-6, rtol=0)


def reference_file(root: Path) -> Path:
    (file,) = (root / "reference-cache").glob("*.safetensors")
    return file


def arrow_file(root: Path) -> Path:
    (file,) = (root / "hf-datasets" / "dpokit").glob("pairs-*.arrow")
    return file


def tensor_offset(path: Path, name: str) -> int:
    """Where tensor ``name``'s data starts in a safetensors file (8-byte header size, JSON
    header, then the data)."""
    data = path.read_bytes()
    size = int.from_bytes(data[:8], "little")
    return 8 + size + json.loads(data[8 : 8 + size])[name]["data_offsets"][0]


def flip_bits(path: Path, offset: int, mask: int = 0b101) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= mask
    path.write_bytes(bytes(data))


def cache_warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "dpokit.cache"]


@pytest.fixture(scope="module")
def clean_weights(tiny_dir, pairs_file, tmp_path_factory):
    """The weights of a run whose caches were never damaged."""
    root = tmp_path_factory.mktemp("clean")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(datasets.config, "HF_DATASETS_CACHE", root / "hf-datasets")
        return run(tiny_dir, pairs_file, root, "run")


def test_flipped_bits_in_reference_logps_are_detected_and_recomputed(
    tiny_dir, pairs_file, tmp_path, clean_weights, caplog
):
    run(tiny_dir, pairs_file, tmp_path, "first")
    file = reference_file(tmp_path)
    before = load_safetensors(file.read_bytes())["logps"]
    flip_bits(file, tensor_offset(file, "logps") + 6)  # row 0: rejected log-prob, high bits
    assert not torch.equal(load_safetensors(file.read_bytes())["logps"], before)  # it matters
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"):
        weights = run(tiny_dir, pairs_file, tmp_path, "second")
    (message,) = cache_warnings(caplog)
    assert message.startswith("reference log-probs cache: ") and str(file) in message
    assert "corrupt" in message and "recomputing" in message
    assert_same_weights(weights, clean_weights)
    torch.testing.assert_close(load_file(str(file))["logps"], before, atol=0, rtol=0)
    assert read_verified(file, "test") is not None  # rewritten with its checksum


def test_flipped_bits_in_tokenized_arrow_are_detected_and_recomputed(
    tiny_dir, pairs_file, tmp_path, clean_weights, caplog
):
    run(tiny_dir, pairs_file, tmp_path, "first")
    file = arrow_file(tmp_path)
    original = datasets.Dataset.from_file(str(file))
    ids = original[0]["chosen_input_ids"]
    needle = torch.tensor(ids, dtype=torch.int32).numpy().tobytes()
    offset = file.read_bytes().find(needle)
    assert offset > 0
    flip_bits(file, offset, mask=0b11)  # the first token id of row 0's chosen answer
    assert datasets.Dataset.from_file(str(file))[0]["chosen_input_ids"] != ids  # it matters
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"):
        weights = run(tiny_dir, pairs_file, tmp_path, "second")
    messages = cache_warnings(caplog)
    assert messages[0].startswith("tokenized data cache: ") and str(file) in messages[0]
    assert "corrupt" in messages[0] and len(messages) == 1
    assert_same_weights(weights, clean_weights)
    assert datasets.Dataset.from_file(str(file))[0]["chosen_input_ids"] == ids


@pytest.mark.parametrize("cache", ["reference", "arrow"])
def test_truncated_cache_files_are_detected_and_recomputed(
    tiny_dir, pairs_file, tmp_path, clean_weights, caplog, cache
):
    run(tiny_dir, pairs_file, tmp_path, "first")
    file = reference_file(tmp_path) if cache == "reference" else arrow_file(tmp_path)
    size = file.stat().st_size
    file.write_bytes(file.read_bytes()[: size // 2])
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"):
        weights = run(tiny_dir, pairs_file, tmp_path, "second")
    (message,) = cache_warnings(caplog)
    assert f"{file} is truncated ({size // 2} of {size} bytes)" in message
    assert_same_weights(weights, clean_weights)
    assert file.stat().st_size == size


@pytest.mark.parametrize("cache", ["reference", "arrow"])
def test_a_missing_checksum_file_is_a_miss(
    tiny_dir, pairs_file, tmp_path, clean_weights, caplog, cache
):
    run(tiny_dir, pairs_file, tmp_path, "first")
    file = reference_file(tmp_path) if cache == "reference" else arrow_file(tmp_path)
    manifest_path(file).unlink()
    file.write_bytes(b"\0" * file.stat().st_size)  # would be read as garbage if trusted
    with caplog.at_level(logging.WARNING, logger="dpokit.cache"):
        weights = run(tiny_dir, pairs_file, tmp_path, "second")
    (message,) = cache_warnings(caplog)
    assert f"{file} has no checksum file {manifest_path(file).name}" in message
    assert_same_weights(weights, clean_weights)
    assert manifest_path(file).exists()


def test_a_verified_entry_is_a_quiet_hit(tiny_dir, pairs_file, tmp_path, caplog):
    run(tiny_dir, pairs_file, tmp_path, "first")
    files = [reference_file(tmp_path), arrow_file(tmp_path)]
    stamps = [f.stat().st_mtime_ns for f in files]
    with caplog.at_level(logging.INFO):
        run(tiny_dir, pairs_file, tmp_path, "second")
    assert cache_warnings(caplog) == []
    assert any("reference log-probs: cache hit" in r.getMessage() for r in caplog.records)
    assert [f.stat().st_mtime_ns for f in files] == stamps  # not rewritten


# ---- two writers at once ------------------------------------------------------------------------

# Plain subprocesses running only what they need: spawning workers that import this test module
# (torch, transformers, the engine) would take most of the test's time on a busy machine.
WRITER = """
import sys
from pathlib import Path
from dpokit.cache import write_verified
fill = int(sys.argv[2])
for _ in range(100):
    write_verified(Path(sys.argv[1]), bytes([fill]) * (1000 + fill))
"""

TOKENIZER = """
import sys
from pathlib import Path
import datasets
from transformers import AutoTokenizer
from dpokit.data import DataConfig, prepare_pairs
data, tokenizer_dir, cache_dir, hf_cache = sys.argv[1:]
datasets.config.HF_DATASETS_CACHE = Path(hf_cache)
settings = DataConfig(cache_dir=cache_dir, max_length=64, max_prompt_length=32)
prepare_pairs(data, AutoTokenizer.from_pretrained(tokenizer_dir), settings)
"""


def start(script: str, *args) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(Path(dpokit.__file__).parents[1])}
    return subprocess.Popen([sys.executable, "-c", script, *map(str, args)], env=env)


def test_concurrent_writers_leave_a_valid_entry(tmp_path):
    """Two processes publish different contents under one name 100 times each: the entry is
    always one writer's whole file with that file's checksum, also to a reader in between."""
    path = tmp_path / "entry.bin"
    writers = [start(WRITER, path, fill) for fill in (1, 2)]
    valid, seen = {b"\1" * 1001, b"\2" * 1002}, set()
    while any(writer.poll() is None for writer in writers):
        data = read_verified(path, "test")
        if data is not None:
            seen.add(data)
    assert [writer.wait() for writer in writers] == [0, 0]
    assert read_verified(path, "test") in valid
    assert seen <= valid
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".entry.bin.lock",
        "entry.bin",
        "entry.bin.sha256.json",
    ]  # no temporary file left behind


def test_concurrent_tokenizing_runs_leave_a_valid_arrow_entry(tiny_dir, tiny_tokenizer, tmp_path):
    data = write_pairs(tmp_path / "pairs.jsonl", rows=200)
    cache = tmp_path / "cache"
    writers = [start(TOKENIZER, data, tiny_dir, cache, tmp_path / "hf") for _ in range(2)]
    assert [writer.wait() for writer in writers] == [0, 0]
    (file,) = (cache / "dpokit").glob("pairs-*.arrow")
    assert verified_cache(str(file))
    settings = DataConfig(cache_dir=str(cache), max_length=64, max_prompt_length=32)
    prepared = prepare_pairs(data, tiny_tokenizer, settings)
    assert prepared.from_cache
    fresh = prepare_pairs(data, tiny_tokenizer, DataConfig(max_length=64, max_prompt_length=32))
    assert not fresh.from_cache
    assert prepared.dataset["chosen_input_ids"] == fresh.dataset["chosen_input_ids"]
