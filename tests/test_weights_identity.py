"""The resume fingerprint's model identity (``dpokit.rundir.weights_identity``, issue 11): cheap
for a model of hundreds of GB, yet it sees a change in ANY tensor of a safetensors file and any
byte of a ``torch.save`` zip; the documented blind spot (the inside of a safetensors tensor,
between its sampled ends) is pinned too, so that a change of policy is deliberate.
"""

from __future__ import annotations

import shutil

import torch
from safetensors.torch import load_file, save_file

from dpokit.rundir import weights_identity

MIB = 1 << 20


def ten_tensors(path) -> dict[str, torch.Tensor]:
    """A 10 MiB model file of ten 1 MiB float32 tensors; returns them."""
    path.mkdir(parents=True, exist_ok=True)
    tensors = {f"layer{i}.weight": torch.full((MIB // 4,), float(i)) for i in range(10)}
    save_file(tensors, str(path / "model.safetensors"))
    (path / "config.json").write_text('{"model_type": "llama"}')
    return tensors


def test_identity_is_stable_and_follows_the_content_not_the_path(tmp_path):
    ten_tensors(tmp_path / "a")
    shutil.copytree(tmp_path / "a", tmp_path / "copy")
    first = weights_identity(str(tmp_path / "a"))
    assert (
        first == weights_identity(str(tmp_path / "a")) == weights_identity(str(tmp_path / "copy"))
    )
    assert weights_identity("org/some-model") == "hub:org/some-model"  # not a local directory
    assert weights_identity(None) is None


def test_a_change_in_any_one_tensor_changes_the_identity(tmp_path):
    """layer2 lies in bytes 2-3 MiB of the data: outside the start, middle (4.5-5.5 MiB) and end
    blocks a file-level sample reads, as a LoRA merged into some projections would be."""
    tensors = ten_tensors(tmp_path / "a")
    before = weights_identity(str(tmp_path / "a"))
    for name in tensors:
        changed = dict(tensors)
        changed[name] = tensors[name] + 1e-3  # a fine-tune moves every value of what it trains
        save_file(changed, str(tmp_path / "a" / "model.safetensors"))
        assert weights_identity(str(tmp_path / "a")) != before, name


def test_a_renamed_tensor_or_another_config_changes_the_identity(tmp_path):
    tensors = ten_tensors(tmp_path / "a")
    before = weights_identity(str(tmp_path / "a"))
    renamed = {name.replace("layer9", "head"): value for name, value in tensors.items()}
    save_file(renamed, str(tmp_path / "a" / "model.safetensors"))
    assert weights_identity(str(tmp_path / "a")) != before
    save_file(tensors, str(tmp_path / "a" / "model.safetensors"))
    assert weights_identity(str(tmp_path / "a")) == before
    (tmp_path / "a" / "config.json").write_text('{"model_type": "mistral"}')
    assert weights_identity(str(tmp_path / "a")) != before


def test_the_inside_of_a_tensor_between_its_sampled_ends_is_not_read(tmp_path):
    """The documented blind spot: one value in the middle of a 1 MiB tensor (4 KiB sampled at
    each end) edited by hand. A training run changes the ends too (previous test)."""
    ten_tensors(tmp_path / "a")
    before = weights_identity(str(tmp_path / "a"))
    tensors = load_file(str(tmp_path / "a" / "model.safetensors"))
    tensors["layer3.weight"][MIB // 8] = -1.0  # byte 512 KiB of 1 MiB
    save_file(tensors, str(tmp_path / "a" / "model.safetensors"))
    assert weights_identity(str(tmp_path / "a")) == before


def test_a_torch_save_file_is_checked_whole_through_its_crcs(tmp_path):
    """``pytorch_model.bin``: the zip's CRC-32 of each tensor covers every byte."""
    path = tmp_path / "bin"
    path.mkdir()
    tensors = {f"layer{i}.weight": torch.full((MIB // 4,), float(i)) for i in range(10)}
    torch.save(tensors, path / "pytorch_model.bin")
    before = weights_identity(str(path))
    tensors["layer3.weight"][MIB // 8] = -1.0  # one value, far from every sampled block
    torch.save(tensors, path / "pytorch_model.bin")
    assert weights_identity(str(path)) != before


def test_a_file_that_is_not_safetensors_inside_is_sampled_as_any_file(tmp_path):
    """A broken header (a truncated download) gives an identity, not a traceback: the load of
    the model reports the file; a fingerprint never does."""
    path = tmp_path / "broken"
    path.mkdir()
    (path / "model.safetensors").write_bytes(b"\xff" * 64)
    first = weights_identity(str(path))
    (path / "model.safetensors").write_bytes(b"\xff" * 63 + b"\x00")
    assert first is not None and weights_identity(str(path)) != first
