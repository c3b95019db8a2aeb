"""Prompt and completion tokens for preference pairs.

The prompt and each completion are tokenized SEPARATELY and concatenated, so no BPE merge crosses
the boundary and the completion tokens are exactly the ones the model is scored on. Chat data is
rendered with the chat template: the prompt with ``add_generation_prompt=True``, the completion as
the rendered full conversation minus the rendered prompt.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from dpokit.errors import ModelError
from dpokit.hashing import json_digest

from .config import DataConfig
from .errors import DataError, InvalidRow
from .formats import PairExample

CHAT_TEMPLATE_HINT = (
    "set tokenizer.chat_template or pass --chat-template FILE (DataConfig.chat_template)"
)


@dataclass
class EncodedPair:
    """Token ids of one pair; completions end with exactly one EOS unless truncated."""

    prompt_input_ids: list[int]
    chosen_input_ids: list[int]
    rejected_input_ids: list[int]
    prompt_truncated: bool = False
    completions_truncated: int = 0


class PairEncoder:
    """Turns `PairExample`s into `EncodedPair`s with one tokenizer and one `DataConfig`."""

    def __init__(self, tokenizer, config: DataConfig) -> None:
        if tokenizer.eos_token_id is None:
            raise ModelError(
                f"the tokenizer {getattr(tokenizer, 'name_or_path', '')!r} has no eos_token; "
                "completions must end with one: set tokenizer.eos_token and save it"
            )
        self.tokenizer = tokenizer
        self.config = config
        self.chat_template = config.chat_template or getattr(tokenizer, "chat_template", None)
        self.eos_id = tokenizer.eos_token_id
        self.bos_id = tokenizer.bos_token_id if adds_bos(tokenizer) else None

    def require_chat_template(self, source: str) -> None:
        """Raises `DataError` naming ``source`` when the tokenizer has no chat template."""
        if not self.chat_template:
            raise DataError(
                f"conversational data needs a chat template and the tokenizer has none; "
                f"{CHAT_TEMPLATE_HINT}",
                source=source,
            )

    # ---- text --------------------------------------------------------------------------------

    def render(self, example: PairExample) -> tuple[str, str, str]:
        """(prompt text, chosen completion text, rejected completion text)."""
        if example.kind == "text":
            return example.prompt, example.chosen, example.rejected
        prompt = self._apply_template(example.prompt, add_generation_prompt=True)
        chosen = self._completion_text(example.prompt, prompt, example.chosen)
        rejected = self._completion_text(example.prompt, prompt, example.rejected)
        return prompt, chosen, rejected

    def _completion_text(self, messages: list, prompt: str, completion: list) -> str:
        full = self._apply_template(messages + completion, add_generation_prompt=False)
        if not full.startswith(prompt):
            raise InvalidRow(
                "the chat template does not render the prompt (with add_generation_prompt=True) "
                "as a prefix of the full conversation, so the completion cannot be cut from it; "
                f"use a template where it does ({CHAT_TEMPLATE_HINT})"
            )
        return full[len(prompt) :]

    def _apply_template(self, messages: list, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(
            messages,
            chat_template=self.chat_template,
            tokenize=False,
            add_generation_prompt=add_generation_prompt,
        )

    # ---- tokens ------------------------------------------------------------------------------

    def tokenize(self, texts: list[str]) -> list[list[int]]:
        """Plain token ids, no special tokens added (one batched call to a fast tokenizer)."""
        if not texts:
            return []
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def finish(self, prompt: list[int], chosen: list[int], rejected: list[int]) -> EncodedPair:
        """Add BOS/EOS and truncate; raises `InvalidRow` for an empty prompt or in error mode."""
        prompt = self.with_bos(prompt)
        if not prompt:
            raise InvalidRow(
                "the prompt encodes to no tokens: the first completion token needs context"
            )
        prompt, prompt_truncated = self.truncate_prompt(prompt)
        completions, truncated = [], 0
        for name, ids in (("chosen", chosen), ("rejected", rejected)):
            ids, cut = self.truncate_completion(name, len(prompt), self.with_eos(ids))
            completions.append(ids)
            truncated += cut
        return EncodedPair(prompt, completions[0], completions[1], prompt_truncated, truncated)

    def with_bos(self, ids: list[int]) -> list[int]:
        """One BOS in front when the tokenizer uses one; a chat template may already render it."""
        if self.bos_id is None:
            return list(ids)
        ids = list(ids) if ids[:1] == [self.bos_id] else [self.bos_id, *ids]
        while ids[1:2] == [self.bos_id]:
            del ids[1]
        return ids

    def with_eos(self, ids: list[int]) -> list[int]:
        """Exactly one EOS at the end.

        A chat template may close the turn with EOS plus formatting whitespace (Zephyr: "</s>\\n");
        generation stops at EOS, so that whitespace is never produced and is cut.
        """
        ids = list(ids)
        if self.eos_id in ids:
            last = len(ids) - 1 - ids[::-1].index(self.eos_id)
            tail = ids[last + 1 :]
            if tail and not self.tokenizer.decode(tail).strip():
                ids = ids[: last + 1]
        while ids[-2:] == [self.eos_id, self.eos_id]:
            ids.pop()
        if ids[-1:] != [self.eos_id]:
            ids.append(self.eos_id)
        return ids

    def truncate_prompt(self, ids: list[int]) -> tuple[list[int], bool]:
        """Keep the END of the prompt (the part next to the completion) and the BOS in front."""
        limit = self.config.effective_max_prompt_length
        if limit is None or len(ids) <= limit:
            return ids, False
        if self.config.truncation == "error":
            raise InvalidRow(
                f"the prompt has {len(ids)} tokens, more than max_prompt_length={limit}; "
                "raise the limit or set truncation='truncate'"
            )
        head = ids[:1] if self.bos_id is not None and ids[:1] == [self.bos_id] else []
        keep = max(limit - len(head), 0)
        return head + ids[len(ids) - keep :], True

    def truncate_completion(self, name: str, prompt_length: int, ids: list[int]):
        """Keep the START of the completion so prompt + completion fits ``max_length``."""
        max_length = self.config.max_length
        if max_length is None or prompt_length + len(ids) <= max_length:
            return ids, 0
        if self.config.truncation == "error":
            raise InvalidRow(
                f"prompt + {name} completion is {prompt_length + len(ids)} tokens, more than "
                f"max_length={max_length}; raise the limit or set truncation='truncate'"
            )
        return ids[: max_length - prompt_length], 1


def adds_bos(tokenizer) -> bool:
    """Whether encoding with special tokens puts BOS in front (Llama-style tokenizers)."""
    bos = tokenizer.bos_token_id
    if bos is None:
        return False
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    without = tokenizer("a", add_special_tokens=False)["input_ids"]
    return with_special[:1] == [bos] and without[:1] != [bos]


def tokenizer_fingerprint(tokenizer, chat_template: str | None) -> str:
    """Hash of what decides the token ids: vocabulary/merges/added tokens, special tokens, template.

    The backend's truncation/padding state is left out: it changes when someone calls the tokenizer
    with ``truncation=True`` but does not change our ids.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        state = json.loads(backend.to_str())
        state.pop("truncation", None)
        state.pop("padding", None)
    else:
        state = sorted(tokenizer.get_vocab().items())
    special = {
        name: getattr(tokenizer, name, None)
        for name in ("bos_token", "eos_token", "pad_token", "unk_token")
    }
    payload = {
        "class": type(tokenizer).__name__,
        "backend": state,
        "special": special,
        "adds_bos": adds_bos(tokenizer),
        "chat_template": chat_template,
    }
    return json_digest(payload, length=None)
