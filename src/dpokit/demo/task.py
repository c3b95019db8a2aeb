"""The built-in task: short product reviews scored by a programmatic judge.

In the spirit of the DPO paper's controlled-sentiment experiment (generate a positive IMDb review
given a prefix, scored by a sentiment classifier), scaled down so that a 2-layer model learns it in
minutes on a laptop CPU:

- a prompt is ``"Review of the <modifier> <item>:"``;
- a completion is a short sequence of words (sentiment words and fillers) that should end in ".";
- the judge is a pure function of the completion's text:

      judge(y) = clip(sentiment(y) + format(y), -1, 1)
      sentiment(y) = (#positive words - #negative words) / #words            in [-1, 1]
      format(y) = -0.5 if y does not end with "."  - 0.5 if #words not in [MIN_WORDS, MAX_WORDS]

The SFT data come from a MIXED distribution: each review draws its own positivity p ~ U(0, 1), so
the SFT model writes good and bad reviews alike and its samples have a wide spread of rewards;
preference methods must shift that distribution towards the positive end. Everything is generated
from a seed.
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field

POSITIVE = (
    "great",
    "good",
    "excellent",
    "lovely",
    "wonderful",
    "superb",
    "perfect",
    "amazing",
)
NEGATIVE = (
    "bad",
    "awful",
    "terrible",
    "poor",
    "horrible",
    "boring",
    "broken",
    "cheap",
)
FILLERS = (
    "it",
    "is",
    "was",
    "very",
    "quite",
    "and",
    "but",
    "really",
    "overall",
    "the",
    "design",
    "price",
    "quality",
    "color",
)
ITEMS = (
    "lamp",
    "phone",
    "chair",
    "film",
    "book",
    "game",
    "coffee",
    "jacket",
    "bike",
    "camera",
    "watch",
    "desk",
    "kettle",
    "tent",
    "guitar",
    "radio",
    "sofa",
    "printer",
    "blender",
    "backpack",
)
MODIFIERS = (
    "red",
    "blue",
    "old",
    "new",
    "small",
    "large",
    "green",
    "black",
    "white",
    "tiny",
    "fancy",
    "wooden",
)

MIN_WORDS, MAX_WORDS = 3, 10
WORD_RE = re.compile(r"[a-z']+")


def judge(completion: str, prompt: str | None = None) -> float:
    """The ground-truth reward of a completion, in [-1, 1] (the prompt does not change it).

    >>> judge(" great good lovely it.")   # 3 positive of 4 words, well formed
    0.75
    >>> judge(" bad it is")               # -1/3 sentiment, no final "." -> -0.8333...
    -0.8333333333333334
    """
    words = WORD_RE.findall(completion.lower())
    if not words:
        return -1.0
    positive = sum(word in POSITIVE for word in words)
    negative = sum(word in NEGATIVE for word in words)
    score = (positive - negative) / len(words)
    if not completion.rstrip().endswith("."):
        score -= 0.5
    if not MIN_WORDS <= len(words) <= MAX_WORDS:
        score -= 0.5
    return max(-1.0, min(1.0, score))


@dataclass
class ReviewTask:
    """Prompts and SFT reviews drawn from a seed; ``judge`` scores any completion.

    ``eval_fraction`` of the prompts (item/modifier combinations) are held out: evaluation samples
    on prompts never seen in training.
    """

    seed: int = 0
    eval_fraction: float = 0.25
    sentiment_rate: float = 0.5  # chance a word is a sentiment word rather than a filler
    period_rate: float = 0.8  # chance an SFT review ends with "." (the format the judge wants)
    train_prompts: list[str] = field(init=False)
    eval_prompts: list[str] = field(init=False)

    def __post_init__(self) -> None:
        prompts = [f"Review of the {m} {item}:" for item in ITEMS for m in MODIFIERS]
        random.Random(self.seed).shuffle(prompts)
        n_eval = max(1, round(len(prompts) * self.eval_fraction))
        self.eval_prompts = sorted(prompts[:n_eval])
        self.train_prompts = sorted(prompts[n_eval:])

    judge = staticmethod(judge)

    def review(
        self,
        rng: random.Random,
        positivity: float | None = None,
        sentiment_rate: float | None = None,
    ) -> str:
        """One review. ``positivity`` p: a sentiment word is positive with probability p; None
        draws p ~ U(0, 1) (the mixed SFT distribution)."""
        p = rng.random() if positivity is None else positivity
        rate = self.sentiment_rate if sentiment_rate is None else sentiment_rate
        n = rng.randint(MIN_WORDS + 1, MAX_WORDS - 2)
        words = []
        for _ in range(n):
            if rng.random() < rate:
                words.append(rng.choice(POSITIVE if rng.random() < p else NEGATIVE))
            else:
                words.append(rng.choice(FILLERS))
        end = "." if rng.random() < self.period_rate else ""
        return " " + " ".join(words) + end

    def sft_rows(self, n: int, seed: int | None = None) -> list[dict]:
        """``n`` prompt/completion rows from the mixed distribution, over the training prompts."""
        rng = random.Random(self.seed * 7919 + 1 if seed is None else seed)
        return [
            {"prompt": rng.choice(self.train_prompts), "completion": self.review(rng)}
            for _ in range(n)
        ]

    def expert_rows(self, n: int, seed: int | None = None) -> list[dict]:
        """High-quality demonstrations (positive sentiment words only, few fillers, always well
        formed): SPIN's "human" data."""
        rng = random.Random(self.seed * 7919 + 2 if seed is None else seed)
        rows = []
        for _ in range(n):
            text = self.review(rng, positivity=1.0, sentiment_rate=0.8).rstrip(".") + "."
            rows.append({"prompt": rng.choice(self.train_prompts), "completion": text})
        return rows

    def corpus(self) -> list[str]:
        """Texts to train the tokenizer on: every prompt, every word, and sample reviews."""
        words = " ".join(POSITIVE + NEGATIVE + FILLERS)
        reviews = [row["prompt"] + row["completion"] for row in self.sft_rows(2000, seed=12345)]
        return self.train_prompts + self.eval_prompts + [words] * 20 + reviews
