"""Preference data: load, detect the format, validate, tokenize once, collate.

prepared = prepare_pairs("pairs.jsonl", tokenizer, DataConfig(max_length=1024))
print(prepared.summary.format())
train, held_out = train_eval_split(prepared.dataset, 0.05, seed=0)
collate = PairCollator(resolve_pad_token_id(tokenizer))
"""

from .collate import PairCollator, resolve_pad_token_id
from .config import DataConfig
from .errors import DataError
from .formats import FORMATS, Format, PairExample, detect_format, register_format
from .pipeline import PreparedData, prepare_pairs
from .split import train_eval_split
from .summary import DataSummary

__all__ = [
    "FORMATS",
    "DataConfig",
    "DataError",
    "DataSummary",
    "Format",
    "PairCollator",
    "PairExample",
    "PreparedData",
    "detect_format",
    "prepare_pairs",
    "register_format",
    "resolve_pad_token_id",
    "train_eval_split",
]
