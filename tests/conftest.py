"""Shared fixtures: a tiny real tokenizer and model, saved to disk and loaded back by path."""

from __future__ import annotations

import datasets
import pytest
from transformers import AutoModelForCausalLM, AutoTokenizer

from dpokit.tiny import build_tiny_model, build_tiny_tokenizer

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Human: What is the capital of France? Assistant: Paris is the capital of France.",
    "I like apples and bananas, but not cherries.",
    "Hello there! How are you doing today? I am fine, thank you.",
    "good bad great terrible wonderful awful yes no maybe",
] * 20


@pytest.fixture(autouse=True)
def _private_caches(tmp_path, monkeypatch):
    """Keep the datasets cache and dpokit's reference-log-prob cache out of the home directory."""
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "hf-datasets")
    monkeypatch.setenv("DPOKIT_CACHE", str(tmp_path / "dpokit-cache"))


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """Directory holding a saved tiny Llama model and its tokenizer (with a chat template)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    tokenizer = build_tiny_tokenizer(CORPUS, path, vocab_size=400)
    build_tiny_model(tokenizer, path, arch="llama")
    return path


@pytest.fixture(scope="session")
def tiny_bos_dir(tmp_path_factory):
    """A tiny model whose tokenizer prepends BOS to every encoding, as Llama's does."""
    path = tmp_path_factory.mktemp("tiny-llama-bos")
    tokenizer = build_tiny_tokenizer(CORPUS, path, vocab_size=400, add_bos=True)
    build_tiny_model(tokenizer, path, arch="llama")
    return path


@pytest.fixture(scope="module")
def other_model_dir(tiny_dir, tmp_path_factory):
    """Another tiny model on the same tokenizer: a reference that differs from the policy."""
    path = tmp_path_factory.mktemp("other-model")
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_dir))
    build_tiny_model(tokenizer, path, seed=7)
    tokenizer.save_pretrained(str(path))
    return path


@pytest.fixture()
def tiny_tokenizer(tiny_dir):
    return AutoTokenizer.from_pretrained(str(tiny_dir))


@pytest.fixture()
def tiny_model(tiny_dir):
    return AutoModelForCausalLM.from_pretrained(str(tiny_dir))
