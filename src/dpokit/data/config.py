"""Settings for loading, validating and tokenizing preference data."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

TRUNCATION_MODES = ("truncate", "error")
IDENTICAL_PAIR_MODES = ("keep", "drop")
BAD_SCORE_MODES = ("drop", "error")


@dataclass
class DataConfig:
    """How to read, check and tokenize a preference dataset.

    Lengths count tokens. ``max_length`` bounds prompt + completion, ``max_prompt_length`` the
    prompt; ``None`` means no bound. Over-long prompts keep their END (the BOS stays in front),
    over-long completions keep their START; ``truncation="error"`` raises instead.
    ``identical_pairs``: keep or drop rows whose chosen equals rejected (counted either way).
    ``bad_scores``: drop or raise on score ties / reversed scores when ``require_scores`` is set
    (ODPO).
    ``chat_template``: a Jinja template string that overrides the tokenizer's.
    ``implicit_prompt_marker``: for chosen/rejected texts without a prompt field (Anthropic HH), the
    prompt is the shared prefix up to and including the last occurrence of this marker.
    ``cache_dir``: where ``datasets`` and the tokenized-pairs cache live (default: the HF datasets
    cache); setting it also caches in-memory sources.
    """

    max_length: int | None = 1024
    max_prompt_length: int | None = 512
    truncation: str = "truncate"
    identical_pairs: str = "keep"
    bad_scores: str = "error"
    require_scores: bool = False
    num_proc: int | None = None
    chat_template: str | None = None
    prompt_field: str = "prompt"
    chosen_field: str = "chosen"
    rejected_field: str = "rejected"
    score_chosen_field: str = "score_chosen"
    score_rejected_field: str = "score_rejected"
    implicit_prompt_marker: str = "\n\nAssistant:"
    cache_dir: str | None = None

    def __post_init__(self) -> None:
        _check_choice("truncation", self.truncation, TRUNCATION_MODES)
        _check_choice("identical_pairs", self.identical_pairs, IDENTICAL_PAIR_MODES)
        _check_choice("bad_scores", self.bad_scores, BAD_SCORE_MODES)
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            raise ValueError(
                f"max_prompt_length must be >= 1 or None, got {self.max_prompt_length}"
            )
        if (
            self.max_length is not None
            and self.max_prompt_length is not None
            and self.max_prompt_length >= self.max_length
        ):
            raise ValueError(
                f"max_prompt_length ({self.max_prompt_length}) must be < max_length "
                f"({self.max_length}) so every completion keeps at least one token"
            )
        if self.num_proc is not None and self.num_proc < 1:
            raise ValueError(f"num_proc must be >= 1 or None, got {self.num_proc}")

    @classmethod
    def from_train_config(cls, config, require_scores: bool = False) -> DataConfig:
        """The data settings of a run: ``config`` is a :class:`dpokit.config.TrainConfig` (read by
        attribute, so this layer does not import it). ``require_scores``: the method reads
        ``score_chosen``/``score_rejected`` (ODPO). The chat template file is read here.

        Raises ``OSError`` when ``config.chat_template`` names a file that cannot be read, and
        ``ValueError`` for settings out of range.
        """
        template = Path(config.chat_template).read_text() if config.chat_template else None
        return cls(
            max_length=config.max_length,
            max_prompt_length=config.max_prompt_length,
            truncation=config.truncation,
            identical_pairs=config.identical_pairs,
            bad_scores=config.bad_scores,
            require_scores=require_scores,
            num_proc=config.num_proc,
            chat_template=template,
        )

    @property
    def effective_max_prompt_length(self) -> int | None:
        """The prompt bound actually applied: without one, leave room for one completion token."""
        if self.max_prompt_length is not None:
            return self.max_prompt_length
        return None if self.max_length is None else self.max_length - 1

    def fingerprint_settings(self) -> dict:
        """The settings that change the tokenized output (not how or where it is computed)."""
        settings = asdict(self)
        for key in ("num_proc", "cache_dir"):
            settings.pop(key)
        return settings


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
