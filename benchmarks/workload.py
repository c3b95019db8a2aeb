"""The benchmark workload: a Llama-style model, a 32k BPE tokenizer and preference pairs, offline.

Everything is built from a seed, saved with ``save_pretrained`` and loaded back by path, so every
contender (dpokit, TRL, the plain loop) reads the same checkpoint and the same JSONL file.

Texts are made of synthetic words; the byte-level pre-tokenizer splits at spaces, so a text's
tokens are the concatenation of its words' tokens and a completion of exactly ``n`` tokens can be
assembled word by word. A completion ends with EOS in every pipeline (dpokit appends the id, TRL
appends the ``</s>`` text), so ``n`` counts the EOS.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import torch


@dataclass(frozen=True)
class Shape:
    """Model and data shape of one benchmark run."""

    name: str
    hidden_size: int = 256
    intermediate_size: int = 688  # Llama's 8/3 ratio, rounded to a multiple of 16
    num_layers: int = 4
    num_heads: int = 4
    num_kv_heads: int = 2
    vocab_size: int = 32000
    arch: str = "llama"
    prompt_tokens: tuple[int, int] = (6, 14)  # inclusive range, uniform
    completion_tokens: tuple[int, int] = (140, 200)  # inclusive range, uniform, includes EOS
    pairs_per_step: int = 4
    # Model-only settings (the tokenizer keeps ``vocab_size`` entries either way).
    model_vocab_size: int | None = None  # embedding rows; None: the tokenizer's length
    tie_word_embeddings: bool = False
    rope_theta: float | None = None  # None: the architecture's default
    rms_norm_eps: float | None = None
    max_position_embeddings: int = 4096

    @property
    def max_length(self) -> int:
        return self.prompt_tokens[1] + self.completion_tokens[1]

    def to_dict(self) -> dict:
        return asdict(self)


PRESETS = {
    # The anchor shape: prompts of ~10 tokens, completions of ~170, 4 pairs per step.
    "issue": Shape("issue"),
    # Longer completions and prompts of mixed length, where the logits dominate even more.
    "long": Shape("long", prompt_tokens=(8, 96), completion_tokens=(256, 512)),
    # Long contexts, short answers (retrieval, summarisation): where sharing the prompt pays.
    "long_prompt": Shape("long_prompt", prompt_tokens=(256, 512), completion_tokens=(32, 128)),
    # Qwen2.5-0.5B's width and vocabulary with 2 of its 24 layers (benchmarks/bench_memory.py sets
    # the completion length). Numbers from https://huggingface.co/Qwen/Qwen2.5-0.5B config.json:
    # hidden_size 896, intermediate_size 4864, 14 heads, 2 KV heads, vocab_size 151936, tied
    # embeddings, rope_theta 1e6, rms_norm_eps 1e-6, max_position_embeddings 32768. The tokenizer
    # is the benchmark's 32k BPE: the model's 151,936-row head is what costs memory, as in Qwen,
    # whose own tokenizer also has fewer entries (151,665) than its embedding has rows.
    "qwen2.5-0.5b": Shape(
        "qwen2.5-0.5b",
        arch="qwen2",
        hidden_size=896,
        intermediate_size=4864,
        num_layers=2,
        num_heads=14,
        num_kv_heads=2,
        model_vocab_size=151936,
        tie_word_embeddings=True,
        rope_theta=1e6,
        rms_norm_eps=1e-6,
        max_position_embeddings=32768,
        prompt_tokens=(64, 64),
        completion_tokens=(1024, 1024),
        pairs_per_step=1,
    ),
}

_CONSONANTS = "bcdfghjklmnprstvwz"
_VOWELS = "aeiou"


def _words(rng: random.Random, count: int) -> list[str]:
    words = set()
    while len(words) < count:
        syllables = rng.randint(1, 4)
        words.add("".join(rng.choice(_CONSONANTS) + rng.choice(_VOWELS) for _ in range(syllables)))
    return sorted(words)


def _corpus(rng: random.Random, words: list[str], lines: int) -> list[str]:
    weights = [1.0 / (rank + 1) ** 0.8 for rank in range(len(words))]  # Zipf-like
    return [" ".join(rng.choices(words, weights, k=rng.randint(8, 40))) for _ in range(lines)]


def build_tokenizer(vocab_size: int, save_dir: Path, seed: int = 0):
    """A byte-level BPE tokenizer with ``vocab_size`` entries trained on synthetic text."""
    from dpokit.tiny import build_tiny_tokenizer

    rng = random.Random(seed)
    words = _words(rng, 60000)
    texts = _corpus(rng, words, 40000) + words  # every word once so rare words still merge
    return build_tiny_tokenizer(texts, save_dir, vocab_size=vocab_size)


def build_model(shape: Shape, tokenizer, save_dir: Path, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    extra = {}
    if shape.rope_theta is not None:
        extra["rope_theta"] = shape.rope_theta
    if shape.rms_norm_eps is not None:
        extra["rms_norm_eps"] = shape.rms_norm_eps
    config = AutoConfig.for_model(
        shape.arch,
        vocab_size=shape.model_vocab_size or len(tokenizer),
        hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size,
        num_hidden_layers=shape.num_layers,
        num_attention_heads=shape.num_heads,
        num_key_value_heads=shape.num_kv_heads,
        max_position_embeddings=shape.max_position_embeddings,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=shape.tie_word_embeddings,
        **extra,
    )
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(str(save_dir))
    return model


class TextMaker:
    """Texts of an exact token count from words whose token counts are known."""

    def __init__(self, tokenizer, rng: random.Random, pool: int = 4000):
        self.rng = rng
        self.tokenizer = tokenizer
        candidates = _words(rng, pool)
        counts = tokenizer([" " + w for w in candidates], add_special_tokens=False)["input_ids"]
        self.by_count: dict[int, list[str]] = {}
        for word, ids in zip(candidates, counts, strict=True):
            self.by_count.setdefault(len(ids), []).append(word)
        if 1 not in self.by_count:
            raise RuntimeError("no single-token word: the tokenizer cannot pad texts exactly")

    def text(self, tokens: int) -> str:
        """`` w1 w2 ...`` (leading space) encoding to exactly ``tokens`` tokens."""
        parts, left = [], tokens
        sizes = sorted(self.by_count)
        while left > 0:
            fitting = [s for s in sizes if s <= left]
            size = self.rng.choice(fitting)
            parts.append(" " + self.rng.choice(self.by_count[size]))
            left -= size
        text = "".join(parts)
        assert len(self.tokenizer(text, add_special_tokens=False)["input_ids"]) == tokens
        return text


def write_pairs(shape: Shape, tokenizer, path: Path, rows: int, seed: int = 0) -> Path:
    """``rows`` prompt/chosen/rejected rows with lengths drawn from ``shape``'s ranges."""
    rng = random.Random(seed)
    maker = TextMaker(tokenizer, rng)
    head = len(tokenizer("Q:", add_special_tokens=False)["input_ids"])
    with path.open("w") as handle:
        for _ in range(rows):
            # The prompt starts without a space and ends before the completion's leading space.
            prompt = "Q:" + maker.text(rng.randint(*shape.prompt_tokens) - head)
            chosen = maker.text(rng.randint(*shape.completion_tokens) - 1)  # + EOS
            rejected = maker.text(rng.randint(*shape.completion_tokens) - 1)
            handle.write(json.dumps({"prompt": prompt, "chosen": chosen, "rejected": rejected}))
            handle.write("\n")
    return path


def prepare_workload(shape: Shape, root: Path, rows: int, model_path: str | None = None) -> dict:
    """Build (or reuse) the model, tokenizer and data of ``shape`` under ``root``.

    With ``model_path`` the user's checkpoint and its tokenizer are used instead of building one.
    Returns {"model": path, "data": path, "rows": rows}.
    """
    from transformers import AutoTokenizer

    root.mkdir(parents=True, exist_ok=True)
    if model_path is None:
        model_dir = root / f"model-{shape.name}"
        if not (model_dir / "config.json").exists():
            tokenizer_dir = root / f"tokenizer-{shape.vocab_size}"
            if not (tokenizer_dir / "tokenizer.json").exists():
                build_tokenizer(shape.vocab_size, tokenizer_dir)
            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
            tokenizer.save_pretrained(str(model_dir))
            build_model(shape, tokenizer, model_dir)
        model_path = str(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    data = root / f"pairs-{shape.name}-{rows}-{Path(model_path).name}.jsonl"
    if not data.exists():
        write_pairs(shape, tokenizer, data, rows)
    return {"model": model_path, "data": str(data), "rows": rows}
