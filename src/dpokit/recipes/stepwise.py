"""Stepwise DPO, sDPO (Kim et al. 2024, "sDPO: Don't Use Your Data All at Once", arXiv:2403.19270).

The preference data is split into K chunks. M_0 = the starting (SFT) model; run t = 1..K starts
from M_{t-1}, uses M_{t-1} frozen as the reference and trains plain DPO on chunk t, giving M_t::

    loss_t = -log sigmoid(beta * ((logp(y_w) - ref_t(y_w)) - (logp(y_l) - ref_t(y_l)))),
    ref_t = M_{t-1}

so every run's first loss is ln 2, and K = 1 is exactly DPO. The loss is DPO's (the method table's
``stepwise_dpo`` entry uses ``dpo_loss``); only the reference moves. (The paper calls the chunks
"steps"; here a step is always an optimizer step.)

How the rows are split (:func:`plan_chunks`):

- a ``chunk`` column (integers; ``step``, the column's earlier name, is read too): one chunk per
  distinct value, in increasing order (the values need not be contiguous); ``chunks`` is then
  ignored.
- otherwise ``chunks=K`` contiguous chunks of (almost) equal size (the first ``N mod K`` chunks get
  one row more), in data order (``order=data``), or
- ``order=easy_to_hard``: rows sorted by the starting model's implicit reward margin
  ``margin = ref(y_w) - ref(y_l)`` (summed completion log-probs under M_0, i.e. the DPO reward
  margin at beta = 1 before any training), LARGEST margin first: a pair the starting model already
  ranks correctly by a wide margin is "easy". The sort is stable; rows inside a chunk keep their
  data order (the Trainer shuffles them anyway unless ``shuffle=false``). The paper orders by
  dataset (easier dataset first) and measures easiness with the reference model's reward; this
  per-row version is our reading of it.

Each chunk is an ordinary Trainer run in ``OUTPUT/chunk-t`` on ``OUTPUT/chunk-t/data.jsonl`` (that
chunk's rows, as read from the source); ``OUTPUT/chunks.json`` records the split (rows, margins) so
a resumed run trains the same chunks. Both carry a checksum (``*.sha256.json``,
:mod:`dpokit.cache`); a damaged plan is reported, removed and made again. Training settings
(``num_epochs``, ``max_steps``, warmup and the schedule) apply to each run. Layout and resume:
:mod:`dpokit.recipes.stages`.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np
import torch
from accelerate import PartialState
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from dpokit import jsonl
from dpokit.cache import read_verified, write_verified
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataConfig, DataError, PairCollator, prepare_pairs
from dpokit.data.loading import load_source
from dpokit.logprobs import CompletionScorer
from dpokit.losses import get_method
from dpokit.modeling import load_model, load_tokenizer, loading_kwargs, resolve_dtype
from dpokit.recipes.stages import check_stage_config, run_stages
from dpokit.reference import FrozenReference, compute_reference_logps

logger = logging.getLogger("dpokit")

CHUNK_COLUMN = "chunk"
# Columns that give each row's chunk, first found wins: ``step`` is the paper's (and this
# library's earlier) name, still read so existing data works.
CHUNK_COLUMNS = (CHUNK_COLUMN, "step")
PLAN_FILE = "chunks.json"
PLAN_CACHE = "stepwise chunk plan"


@dataclasses.dataclass
class ChunkPlan:
    """Which source rows each chunk holds.

    ``rows[t]``: 0-based row numbers of the source (data order) for chunk t + 1. ``labels``: the
    chunk column's value of each chunk, or 1..K. ``margins``: per source row ref(y_w) - ref(y_l)
    under the starting model when ``order == "easy_to_hard"``, else None.
    """

    rows: list[list[int]]
    labels: list[int]
    split: str  # "column" or "chunks"
    order: str  # "data" or "easy_to_hard"
    source_fingerprint: str
    margins: list[float] | None = None

    def to_dict(self) -> dict:
        """The plan as JSON-ready values (what ``chunks.json`` holds)."""
        return dataclasses.asdict(self)


def run_stepwise(config: TrainConfig):
    """Train ``config.model`` on ``config.data`` with stepwise DPO; returns a TrainResult whose
    ``final_dir`` is ``OUTPUT/final`` (the last chunk's model).

    Raises :class:`~dpokit.config.ConfigError` for a fixed ``reference``, or on resume when the
    saved plan was made for other data or settings; :class:`~dpokit.data.DataError` for bad rows.
    """
    check_stage_config(config)
    state = PartialState()
    output = Path(config.output_dir)
    plan_file = output / PLAN_FILE
    source = load_source(config.data, _data_settings(config), config.data_split)
    plan = _saved_plan(plan_file, config, source) if config.resume != "false" else None
    if plan is None:
        if state.is_main_process:
            write_verified(plan_file, json.dumps(plan_chunks(config, source).to_dict()).encode())
        state.wait_for_everyone()
        plan = ChunkPlan(**json.loads(plan_file.read_bytes()))
    names = [f"chunk-{t}" for t in range(1, len(plan.rows) + 1)]
    logger.info(
        "stepwise DPO: %d chunks (%s, order=%s) of %s rows",
        len(names),
        plan.split,
        plan.order,
        [len(rows) for rows in plan.rows],
    )

    def make_data(index: int, directory: Path, model: str) -> str:
        path = directory / "data.jsonl"
        if state.is_main_process:
            write_verified(path, rows_jsonl(source.dataset, plan.rows[index]).encode())
        state.wait_for_everyone()
        return str(path)

    return run_stages(config, names, make_data)


def plan_chunks(config: TrainConfig, source=None) -> ChunkPlan:
    """Validate the whole data set (errors name the source file and line) and split it in chunks.

    Raises :class:`~dpokit.data.DataError` for bad rows or a non-integer chunk value, and
    :class:`~dpokit.config.ConfigError` for ``order=easy_to_hard`` with a chunk column or more
    chunks than rows.
    """
    hyperparameters = config.method_args
    settings = _data_settings(config)
    source = source or load_source(config.data, settings, config.data_split)
    tokenizer = load_tokenizer(config.model, config.chat_template, config.trust_remote_code)
    # Identical pairs are kept here so that prepared row i is source row i; each chunk's own
    # preparation applies identical_pairs as configured.
    keep_all = dataclasses.replace(settings, identical_pairs="keep")
    prepared = prepare_pairs(config.data, tokenizer, keep_all, config.data_split)
    if len(prepared) != len(source.dataset):
        raise RuntimeError(
            f"{source.name}: {len(source.dataset)} rows read but {len(prepared)} prepared"
        )
    order = hyperparameters["order"]
    column = chunk_column(source.dataset.column_names)
    if column is not None:
        if order != "data":
            raise ConfigError(
                f"{source.name} has a {column!r} column, which fixes the chunks; "
                f"order={order} only applies to splitting data without one"
            )
        labels, rows = split_by_column(source, column)
        if len(labels) != hyperparameters["chunks"]:
            logger.warning(
                "the %r column defines %d chunks; chunks=%d is ignored",
                column,
                len(labels),
                hyperparameters["chunks"],
            )
        return ChunkPlan(rows, labels, "column", order, source.fingerprint)
    chunks = hyperparameters["chunks"]
    if chunks > len(prepared):
        raise ConfigError(f"chunks={chunks} but {source.name} has only {len(prepared)} rows")
    margins = None
    ranking = np.arange(len(prepared))
    if order == "easy_to_hard":
        margins = reference_margins(config, prepared, tokenizer)
        ranking = np.argsort(-margins, kind="stable")  # largest margin (easiest) first
    rows = [sorted(chunk.tolist()) for chunk in np.array_split(ranking, chunks)]
    labels = list(range(1, chunks + 1))
    margin_list = None if margins is None else margins.tolist()
    return ChunkPlan(rows, labels, "chunks", order, source.fingerprint, margin_list)


def chunk_column(columns: list[str]) -> str | None:
    """The column of ``columns`` that gives each row's chunk (``chunk``, else ``step``), or
    None."""
    return next((name for name in CHUNK_COLUMNS if name in columns), None)


def split_by_column(source, column: str = CHUNK_COLUMN) -> tuple[list[int], list[list[int]]]:
    """(sorted distinct chunk values, source rows of each) from ``column``.

    Raises :class:`~dpokit.data.DataError` naming the row when a value is not an integer.
    """
    values = source.dataset[column]
    for index, value in enumerate(values):
        integral = isinstance(value, int) or (isinstance(value, float) and value.is_integer())
        if isinstance(value, bool) or not integral:
            row, kind = source.locator.locate(index)
            raise DataError(
                f"field {column!r} must be an integer chunk number, got {value!r}",
                source.name,
                row,
                kind,
            )
    chunks = np.asarray(values, dtype=np.int64)
    labels = sorted(set(chunks.tolist()))
    return labels, [np.flatnonzero(chunks == label).tolist() for label in labels]


@torch.no_grad()
def reference_margins(config: TrainConfig, prepared, tokenizer) -> np.ndarray:
    """(N,) ref(y_w) - ref(y_l) of every prepared row under the starting model, in fp32."""
    device = PartialState().device
    model = load_model(config.model, resolve_dtype(config.dtype), loading=loading_kwargs(config))
    scorer = CompletionScorer(
        model, chunk_size=config.logps_chunk_size, pass_tokens=config.decoder_pass_tokens
    )
    reference = FrozenReference(scorer)
    reference.scorer.to(device)
    loader = DataLoader(
        prepared.dataset,
        batch_size=config.batch_size,
        shuffle=False,
        collate_fn=PairCollator(tokenizer.pad_token_id),
    )
    show = config.progress and PartialState().is_main_process
    ranking = tqdm(loader, desc="stepwise ranking (reference margins)", disable=not show)
    batches = ({k: v.to(device) for k, v in batch.items()} for batch in ranking)
    table = compute_reference_logps(reference, batches, len(prepared))
    return (table.logps[:, 0] - table.logps[:, 1]).double().numpy()  # (N,)


def rows_jsonl(dataset, rows: list[int]) -> str:
    """The given source rows as JSON lines (:mod:`dpokit.jsonl`; values JSON cannot hold, e.g.
    dates, are written as their strings)."""
    subset = dataset.select(rows)
    return jsonl.dumps(subset, default=str)


def _saved_plan(path: Path, config: TrainConfig, source) -> ChunkPlan | None:
    """The plan an interrupted run made, if it fits this run's data and settings; None when there
    is none, or it does not match its checksum (reported, removed: it is made again)."""
    data = read_verified(path, PLAN_CACHE)
    if data is None:
        return None
    plan = ChunkPlan(**json.loads(data))
    same_split = plan.order == config.method_args["order"] and (
        plan.split == "column" or len(plan.rows) == config.method_args["chunks"]
    )
    if plan.source_fingerprint != source.fingerprint or not same_split:
        raise ConfigError(
            f"resume: {path} was made for other data or other chunks/order settings; "
            "start a fresh run (resume=false) or restore them"
        )
    return plan


def _data_settings(config: TrainConfig) -> DataConfig:
    return DataConfig.from_train_config(config, require_scores=get_method(config.method).scores)
