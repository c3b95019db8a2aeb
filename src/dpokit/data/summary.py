"""What happened to every input row: read, kept, truncated, dropped (with reasons)."""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.compute as pc

# Status columns the tokenizing map writes next to the token ids; the summary is computed from them,
# so it is the same whether the map ran or was loaded from the cache.
DROP_REASON = "_drop_reason"
IDENTICAL = "_identical"
# Texts differ but the token ids are the same: truncation cut both completions to the same start
# (or the tokenizer normalised the difference away). Such rows are also IDENTICAL.
IDENTICAL_AFTER_TRUNCATION = "_identical_after_truncation"
PROMPT_TRUNCATED = "_prompt_truncated"
COMPLETIONS_TRUNCATED = "_completions_truncated"
STATUS_COLUMNS = (
    DROP_REASON,
    IDENTICAL,
    IDENTICAL_AFTER_TRUNCATION,
    PROMPT_TRUNCATED,
    COMPLETIONS_TRUNCATED,
)
# The drop reasons of identical pairs (identical_pairs="drop").
IDENTICAL_REASON = "identical pair"
IDENTICAL_AFTER_TRUNCATION_REASON = "identical after truncation"


@dataclass
class DataSummary:
    """Counts for one prepared dataset; ``rows_read == rows_kept + sum(dropped.values())``.

    ``truncated_prompts`` counts rows, ``truncated_completions`` counts completions (two per row).
    ``identical_pairs`` counts rows whose chosen equals rejected, kept or dropped;
    ``identical_after_truncation`` of them differ as text but not as tokens (truncation cut both
    to the same tokens): ``identical_pairs`` (keep/drop) applies to them all.
    """

    source: str
    format_name: str
    rows_read: int
    rows_kept: int
    truncated_prompts: int = 0
    truncated_completions: int = 0
    identical_pairs: int = 0
    identical_after_truncation: int = 0
    identical_pairs_action: str = "keep"
    dropped: dict[str, int] = field(default_factory=dict)

    @property
    def rows_dropped(self) -> int:
        """Rows dropped, for every reason."""
        return sum(self.dropped.values())

    def format(self) -> str:
        """A short multi-line report, printed/logged before training starts."""
        dropped = ", ".join(f"{reason}: {n}" for reason, n in sorted(self.dropped.items()))
        identical = f"{self.identical_pairs} ({self.identical_pairs_action}"
        if self.identical_after_truncation:
            identical += f"; {self.identical_after_truncation} of them only after truncation"
        identical += ")"
        return "\n".join(
            [
                f"data: {self.source} (format: {self.format_name})",
                f"  rows read {self.rows_read}, kept {self.rows_kept}, "
                f"dropped {self.rows_dropped}" + (f" ({dropped})" if dropped else ""),
                f"  identical pairs {identical}, truncated prompts {self.truncated_prompts}, "
                f"truncated completions {self.truncated_completions}",
            ]
        )


def summarize(mapped, source: str, format_name: str, identical_action: str) -> DataSummary:
    """Count the status columns of the tokenized (not yet filtered) dataset."""
    table = mapped.data
    reasons = pc.value_counts(table.column(DROP_REASON)).to_pylist()
    dropped = {item["values"]: item["counts"] for item in reasons if item["values"]}
    rows_read = len(mapped)
    return DataSummary(
        source=source,
        format_name=format_name,
        rows_read=rows_read,
        rows_kept=rows_read - sum(dropped.values()),
        truncated_prompts=_sum(table.column(PROMPT_TRUNCATED)),
        truncated_completions=_sum(table.column(COMPLETIONS_TRUNCATED)),
        identical_pairs=_sum(table.column(IDENTICAL)),
        identical_after_truncation=_sum(table.column(IDENTICAL_AFTER_TRUNCATION)),
        identical_pairs_action=identical_action,
        dropped=dropped,
    )


def _sum(column) -> int:
    # pc.sum of an empty column is null
    return int(pc.sum(pc.cast(column, "int64")).as_py() or 0)
