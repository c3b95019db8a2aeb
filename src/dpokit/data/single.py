"""Rows with ONE completion each (SFT, unpaired/KTO): the shared ``Dataset.map`` machinery.

A format module (:mod:`dpokit.data.sft`, :mod:`dpokit.data.unpaired`) subclasses
:class:`CompletionRowProcessor`, naming only the columns it adds after the two id columns
(``extra_columns``) and how to read them off a normalized example (``_extras``).
"""

from __future__ import annotations

from datasets import Features, List, Value

from .errors import InvalidRow
from .formats import Format, PairExample
from .loading import RowLocator
from .pipeline import RowGuard
from .summary import (
    COMPLETIONS_TRUNCATED,
    DROP_REASON,
    IDENTICAL,
    IDENTICAL_AFTER_TRUNCATION,
    PROMPT_TRUNCATED,
)
from .tokenization import PairEncoder


class CompletionRowProcessor(RowGuard):
    """``Dataset.map`` function: raw rows -> prompt/completion ids, extra columns, status columns.

    ``_completions_truncated`` counts the one completion of each row; ``_identical`` is always
    False (there is no pair) and no row is dropped.
    """

    extra_columns: tuple[str, ...] = ()

    def __init__(self, fmt: Format, encoder: PairEncoder, source_name: str, locator: RowLocator):
        self.fmt = fmt
        self.encoder = encoder
        self.source_name = source_name
        self.locator = locator

    def __call__(self, batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        n = len(indices)
        rows = [{column: values[i] for column, values in batch.items()} for i in range(n)]
        read = [
            self._guard(index, self._render, row) for row, index in zip(rows, indices, strict=True)
        ]
        # One tokenizer call per text column: fast tokenizers batch in Rust.
        prompts = self.encoder.tokenize([prompt for prompt, _, _ in read])
        completions = self.encoder.tokenize([completion for _, completion, _ in read])
        out = {"prompt_input_ids": [], "completion_input_ids": []}
        out.update({column: [] for column in self.extra_columns})
        out.update({PROMPT_TRUNCATED: [], COMPLETIONS_TRUNCATED: []})
        for index, prompt, completion, (_, _, extras) in zip(
            indices, prompts, completions, read, strict=True
        ):
            prompt, completion, prompt_cut, completion_cut = self._guard(
                index, self._finish, prompt, completion
            )
            out["prompt_input_ids"].append(prompt)
            out["completion_input_ids"].append(completion)
            for column, value in zip(self.extra_columns, extras, strict=True):
                out[column].append(value)
            out[PROMPT_TRUNCATED].append(prompt_cut)
            out[COMPLETIONS_TRUNCATED].append(completion_cut)
        out[DROP_REASON] = [""] * n
        out[IDENTICAL], out[IDENTICAL_AFTER_TRUNCATION] = [False] * n, [False] * n
        return out

    def _extras(self, example) -> tuple:
        """The values of ``extra_columns`` for one normalized example."""
        return ()

    def _render(self, row: dict) -> tuple[str, str, tuple]:
        example = self.fmt.normalize(row, self.encoder.config)
        # The pair encoder renders chat through the template; the completion fills both sides.
        pair = PairExample(example.kind, example.prompt, example.completion, example.completion)
        prompt, completion, _ = self.encoder.render(pair)
        return prompt, completion, self._extras(example)

    def _finish(self, prompt: list[int], completion: list[int]):
        encoder = self.encoder
        prompt = encoder.with_bos(prompt)
        if not prompt:
            raise InvalidRow(
                "the prompt encodes to no tokens: the first completion token needs context"
            )
        prompt, prompt_cut = encoder.truncate_prompt(prompt)
        completion, completion_cut = encoder.truncate_completion(
            "completion", len(prompt), encoder.with_eos(completion)
        )
        return prompt, completion, prompt_cut, completion_cut


def completion_features(extra: dict | None = None) -> Features:
    """Features of :class:`CompletionRowProcessor`'s output; ``extra``: the extra columns'."""
    ids = List(Value("int32"))
    return Features(
        {
            "prompt_input_ids": ids,
            "completion_input_ids": ids,
            **(extra or {}),
            PROMPT_TRUNCATED: Value("bool"),
            COMPLETIONS_TRUNCATED: Value("int8"),
            DROP_REASON: Value("string"),
            IDENTICAL: Value("bool"),
            IDENTICAL_AFTER_TRUNCATION: Value("bool"),
        }
    )
