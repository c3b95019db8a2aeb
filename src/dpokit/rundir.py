"""The run directory belongs to one run: who may write in it, and what a resume may continue.

Three rules, checked before anything is written: nothing is written into ``output_dir`` before
:meth:`RunDirectory.prepare` (data checked, model loaded: ``overwrite`` clears the old run here)
and the run's record (``config.yaml``, ``run.json``) only by :meth:`RunDirectory.start`, once
the reference is built too. (A method's setup between the two may write its own cache there:
SLiC's ``reference_samples/``.)

- A fresh run (``resume=false``) needs an empty or missing ``output_dir``. ``overwrite=true``
  clears a directory an earlier dpokit run made (it holds one of :data:`RUN_ENTRIES`); a
  directory of other files only is never cleared (`PathError`).
- A resume (``resume=true``) continues only the run it finds: the newest complete checkpoint (or,
  killed before its first save, ``run.json``) carries the *fingerprint* of everything that decides
  the trajectory (:func:`trajectory_fingerprint`), and a run whose fingerprint differs is refused
  with one `ConfigError` line naming each key, ``old -> new``. ``resume=force`` continues anyway
  and appends the differences to ``output_dir/resume-overrides.jsonl``.
- Checkpoints carry the run's ``run_id``; pruning removes only this run's checkpoints.

Keys that cannot change the past (:data:`FREE_KEYS`: ``max_steps``/``num_epochs``, the logging,
eval and save cadence, ``save_total_limit``, ``progress``, ``num_proc``, ``report_to``, output
paths, ``merge_lora``, and the memory knobs: ``gradient_checkpointing``, ``logps_chunk_size``,
``logps_saved_softmax_mb``, ``decoder_pass_tokens``, ``mlp_chunk_tokens``) may change on
resume. Paths are compared by what they hold, not by name: the weights' identity
(:func:`weights_identity`) and the data's fingerprint, so a copied run directory still resumes.
The learning-rate schedule is compared as resolved: the warm-up steps and, for a decaying
schedule (``linear``, ``cosine``), its horizon, since a linear schedule's learning rate at every
step depends on the total. Extending ``max_steps`` is therefore allowed with
``lr_scheduler=constant`` (and a warm-up that resolves to the same steps), and refused for a
decaying schedule: keeping the old horizon would train the extra steps at lr 0, and a new horizon
gives weights that no uninterrupted run produces.

A resume is never silent: a finished run (``run.json``'s ``finished_step``, written once
``final/`` is saved) with nothing left to train is refused, saying to raise ``max_steps``
(:func:`check_unfinished`); a directory with no checkpoint starts at step 0 with a warning
that says so (a run killed before its first save has nothing else to continue).
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import time
import uuid
import zipfile
from pathlib import Path
from typing import Any

from dpokit.cache import atomic_write
from dpokit.checkpoint import latest_checkpoint, load_trainer_state
from dpokit.config import ConfigError, TrainConfig
from dpokit.errors import PathError
from dpokit.hashing import sha256_hex
from dpokit.optim import count_steps, resolve_warmup
from dpokit.sharding import check_layout

logger = logging.getLogger("dpokit")

RUN_FILE = "run.json"
OVERRIDES_FILE = "resume-overrides.jsonl"
CONFIG_FILE = "config.yaml"
# What marks a directory as made by dpokit (overwrite=true clears only such a directory).
RUN_RECORDS = (RUN_FILE, CONFIG_FILE)
# What a run writes besides its inputs: a resume into a directory holding any of these but no
# run.json cannot tell whose run it is. (reference_samples: SLiC's y_ref cache, written in setup.)
RUN_ENTRIES = (
    *RUN_RECORDS,
    "metrics.jsonl",
    "checkpoints",
    "final",
    "final-merged",
    "reference_samples",
)

# Config keys that cannot change the weights already trained (free to change on resume).
FREE_KEYS = frozenset(
    {
        "max_steps",
        "num_epochs",
        "logging_steps",
        "eval_steps",
        "save_steps",
        "save_total_limit",
        "progress",
        "num_proc",
        "report_to",
        "output_dir",
        "reference_cache_dir",
        "merge_lora",
        "resume",
        "overwrite",
        # Memory knobs: the same math to float rounding, and what a user turns after an OOM.
        "gradient_checkpointing",
        "logps_chunk_size",
        "logps_saved_softmax_mb",
        "decoder_pass_tokens",
        "mlp_chunk_tokens",
    }
)
# Compared by content (weights identity, data fingerprint), not by name; or resolved (warm-up).
CONTENT_KEYS = frozenset(
    {"model", "reference", "data", "eval_data", "chat_template", "warmup_ratio", "warmup_steps"}
)
_SAMPLE = 1 << 20  # bytes hashed at the start, middle and end of a weight file of no known layout
_TENSOR_SAMPLE = 4096  # bytes hashed at the start and end of every tensor of a safetensors file
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".json", ".pt", ".model")
IDENTITY_SCHEME = "weights-v2"  # changes when what the identity reads changes


def weights_identity(name_or_path: str | None) -> str | None:
    """A short digest of what a model directory holds, cheap enough for every run start (and
    every resume) of a model of hundreds of GB, yet blind to no tensor.

    Per file (weights, configs), its name and size and:

    - ``*.safetensors``: the whole header (every tensor's name, dtype, shape and offsets) and
      the first and last 4 KiB of EVERY tensor's bytes. A fine-tune changes almost every value of
      each tensor it trains, so a model that differs in any tensor -- a LoRA merged into the
      attention projections only, a retrained head -- differs here (three blocks per file could
      all land on tensors it did not train).
    - a ``torch.save`` zip (``*.bin``, ``*.pt``): its central directory, which holds the CRC-32
      of every stored tensor's WHOLE bytes (computed by ``torch.save``): a full-content check
      read in one seek; and the blocks below.
    - anything else (configs, a legacy pickle): 1 MiB at its start, middle and end (a file of
      at most 3 MiB is read whole).

    Not read: the bytes between the samples of a safetensors tensor. Two checkpoints that differ
    only there (a single weight edited by hand) get the same identity; hashing whole files would
    cost minutes per resume for a 140 GB model (about 10 min at 250 MB/s). A hub id that is not a
    local directory is ``hub:<id>``. Raises ``OSError`` when a file cannot be read.
    """
    if not name_or_path:
        return None
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return f"hub:{name_or_path}"
    parts: list[str | bytes] = [IDENTITY_SCHEME]
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        if file.suffix not in _WEIGHT_SUFFIXES:
            continue
        size = file.stat().st_size
        parts += [file.name, str(size)]
        with file.open("rb") as handle:
            parts += _file_samples(handle, file.suffix, size)
    return sha256_hex(*parts, length=16)


def _file_samples(handle, suffix: str, size: int) -> list[bytes]:
    """What :func:`weights_identity` hashes of one open file (see there)."""
    if suffix == ".safetensors":
        samples = _safetensors_samples(handle, size)
        if samples is not None:
            return samples
    samples = []
    if suffix in (".bin", ".pt") and zipfile.is_zipfile(handle):
        with zipfile.ZipFile(handle) as archive:  # reads the central directory only
            samples += [f"{i.filename}:{i.file_size}:{i.CRC}".encode() for i in archive.infolist()]
    for offset in sorted({0, max(0, size // 2 - _SAMPLE // 2), max(0, size - _SAMPLE)}):
        handle.seek(offset)
        samples.append(handle.read(_SAMPLE))
    return samples


def _safetensors_samples(handle, size: int) -> list[bytes] | None:
    """The header and each tensor's first and last :data:`_TENSOR_SAMPLE` bytes, or None when
    the file is not a well-formed safetensors file (then it is sampled as any other file)."""
    head = handle.read(8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length <= size - 8:
        return None
    header = handle.read(length)
    try:
        tensors = json.loads(header)
        spans = sorted(tuple(v["data_offsets"]) for k, v in tensors.items() if k != "__metadata__")
    except (ValueError, TypeError, KeyError, AttributeError):
        return None
    samples, base = [head, header], 8 + length  # tensor offsets count from the header's end
    for begin, end in spans:
        first, last = base + int(begin), base + int(end)
        for offset in sorted({first, max(first, last - _TENSOR_SAMPLE)}):
            handle.seek(offset)
            samples.append(handle.read(min(_TENSOR_SAMPLE, last - offset)))
    return samples


def config_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """The config keys that decide the trajectory, by name: all but :data:`FREE_KEYS` and
    :data:`CONTENT_KEYS`; method hyperparameters as ``method_args.<name>``."""
    values = config.to_dict()
    method_args = values.pop("method_args")
    fingerprint = {
        key: value
        for key, value in values.items()
        if key not in FREE_KEYS and key not in CONTENT_KEYS
    }
    fingerprint.update({f"method_args.{k}": v for k, v in sorted(method_args.items())})
    return fingerprint


def trajectory_fingerprint(config: TrainConfig, train_data, eval_data, num_processes: int) -> dict:
    """Everything that decides a run's weights, as ``{key: JSON value}``.

    ``train_data``/``eval_data``: prepared splits (``fingerprint``, ``len``); ``eval_data`` may
    be None. Adds to :func:`config_fingerprint` the weights of the model and reference, the data,
    the process count and the resolved schedule (``warmup_steps``, and ``schedule_horizon`` for a
    decaying schedule; see the module docstring).
    """
    max_steps = planned_steps(config, len(train_data), num_processes)
    warmup = resolve_warmup(config, max_steps)  # as optim.build_scheduler resolves it
    fingerprint = config_fingerprint(config)
    fingerprint.update(
        model=weights_identity(config.model),
        reference=weights_identity(config.reference),
        train_data=train_data.fingerprint,
        eval_data=None if eval_data is None else eval_data.fingerprint,
        processes=num_processes,
        warmup_steps=min(warmup, max_steps),
        schedule_horizon=None if config.lr_scheduler == "constant" else max_steps,
    )
    return json.loads(json.dumps(fingerprint, default=str))  # as a checkpoint reads it back


def planned_steps(config: TrainConfig, rows: int, num_processes: int) -> int:
    """The run's optimizer steps (``max_steps``, else ``num_epochs`` over ``rows`` training
    rows), as the engine's :func:`dpokit.optim.count_steps` counts them from its loader."""
    return count_steps(config, math.ceil(rows / config.batch_size), num_processes)[1]


def differences(old: dict, new: dict) -> dict[str, list]:
    """``{key: [old, new]}`` for every key whose value differs (a missing key counts as None)."""
    keys = sorted(set(old) | set(new))
    return {k: [old.get(k), new.get(k)] for k in keys if old.get(k) != new.get(k)}


def describe_differences(changed: dict[str, list]) -> str:
    """``"learning_rate 0.001 -> 0.01, seed 42 -> 1"``."""
    return ", ".join(f"{key} {old} -> {new}" for key, (old, new) in changed.items())


def holds_run(path: Path) -> bool:
    """Whether ``path`` holds anything a dpokit run writes (:data:`RUN_ENTRIES`)."""
    return any((path / name).exists() for name in RUN_ENTRIES)


def check_reuse(path: Path, resume: str, overwrite: bool) -> bool:
    """Refuse a fresh run into a used directory; returns whether it must be cleared at start.

    Raises `ConfigError` for ``overwrite`` with ``resume``, `PathError` for a non-empty
    ``path`` without ``resume``/``overwrite`` and for ``overwrite`` of a directory no dpokit run
    made (it is never cleared). Writes nothing.
    """
    if overwrite and resume != "false":
        raise ConfigError(f"overwrite=true clears the run that resume={resume} would continue")
    entries = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    if resume != "false" or not entries:
        return False
    shown = ", ".join(entries[:4]) + (", ..." if len(entries) > 4 else "")
    if not overwrite:
        raise PathError(
            f"output_dir={path} is not empty ({shown}): resume=true continues the run in it, "
            "overwrite=true replaces it, or choose another output_dir"
        )
    if not holds_run(path):
        raise PathError(
            f"output_dir={path} holds files no dpokit run wrote ({shown}); overwrite=true clears "
            "only a run directory: choose another output_dir"
        )
    return True


def read_record(path: Path) -> dict | None:
    """``path/run.json`` (run id and fingerprint), or None."""
    file = path / RUN_FILE
    return json.loads(file.read_text()) if file.exists() else None


def compare(config: TrainConfig, what: str, old: dict, new: dict) -> dict[str, list]:
    """The differences between the fingerprint ``old`` of ``what`` and ``new``; raises
    `ConfigError` listing them unless ``resume=force`` (then they are returned, to record)."""
    changed = differences(old, new)
    if changed and config.resume != "force":
        raise ConfigError(
            f"resume: {what} was trained with other settings: {describe_differences(changed)}; "
            "resume with the old values, start a new run (another output_dir, or overwrite=true),"
            " or resume=force to continue anyway (recorded in resume-overrides.jsonl)"
        )
    if changed:
        logger.warning("resume=force: continuing %s with %s", what, describe_differences(changed))
    return changed


def check_unfinished(path: Path, record: dict | None, latest: Path | None, max_steps: int) -> None:
    """Refuse, in one `ConfigError` line, a resume of a run that finished (``run.json`` holds
    ``finished_step``, written once ``final/`` is saved, and ``final/`` is still there) when it
    has nothing left to train (``finished_step >= max_steps``) or no checkpoint to continue from.
    A run extended past its end (a larger ``max_steps``) continues from its newest checkpoint."""
    finished = (record or {}).get("finished_step")
    if finished is None or not (path / "final").is_dir():
        return  # not finished, or its final model was removed: a resume saves it again
    saved = None if latest is None else load_trainer_state(latest)["step"]
    if finished >= max_steps:
        more = (
            f"to train further, resume with max_steps above {finished} (it continues from "
            f"{latest.name}; a linear or cosine schedule also needs resume=force)"
            if saved is not None
            else f"it kept no checkpoint, so to train further start a new run from "
            f"{path / 'final'} in another output_dir"
        )
        raise ConfigError(
            f"resume: the run in {path} finished at step {finished} (this command's max_steps: "
            f"{max_steps}; its model is in {path / 'final'}): nothing to resume; {more}"
        )
    if saved is None:
        raise ConfigError(
            f"resume: the run in {path} finished at step {finished} and kept no checkpoint to "
            f"continue from (checkpoints are saved every save_steps and at the last step): start "
            f"a new run from {path / 'final'} in another output_dir"
        )


def record_overrides(path: Path, checkpoint: Path | None, changed: dict[str, list]) -> None:
    """Append one line to ``path/resume-overrides.jsonl``: time, checkpoint, keys old -> new."""
    line = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "checkpoint": None if checkpoint is None else checkpoint.name,
        "changed": changed,
    }
    with (path / OVERRIDES_FILE).open("a") as handle:
        handle.write(json.dumps(line, default=str) + "\n")


class RunDirectory:
    """``config.output_dir`` as one run sees it. Made in ``Trainer.__init__`` before anything
    loads (:func:`check_reuse`); :meth:`verify` once the data is prepared; :meth:`prepare` once
    the model has loaded; :meth:`start` when the run is known to start (the reference built);
    :meth:`identity` goes into every checkpoint.

    ``accelerator``: anything with ``is_main_process`` and ``wait_for_everyone()``.
    """

    def __init__(self, config: TrainConfig, accelerator):
        self.config, self.accelerator = config, accelerator
        self.path = Path(config.output_dir)
        self.clear = check_reuse(self.path, config.resume, config.overwrite)
        self.run_id = uuid.uuid4().hex
        self.fingerprint: dict = {}
        self.resume_from: Path | None = None
        self.changed: dict[str, list] = {}

    def verify(self, fingerprint: dict, rows: int, sharded: bool = False) -> Path | None:
        """On resume, what this run continues: the newest complete checkpoint (or None to start
        at step 0, said in a warning), checked against ``fingerprint``; ``rows``: the training
        rows (the run's ``max_steps`` follows, :func:`planned_steps`).

        Raises `ConfigError` for a run that finished at ``max_steps`` or later (nothing to
        continue: the message says to raise ``max_steps``), for a finished run with no
        checkpoint to continue from, and on a fingerprint mismatch (unless ``resume=force``);
        `PathError` for a directory holding a run without ``run.json``; and `ConfigError` for a
        checkpoint of the other layout than ``sharded`` (:func:`dpokit.sharding.check_layout`)."""
        self.fingerprint = fingerprint
        if self.config.resume == "false":
            return None
        record, latest = read_record(self.path), latest_checkpoint(self.path)
        max_steps = planned_steps(self.config, rows, self.accelerator.num_processes)
        check_unfinished(self.path, record, latest, max_steps)
        if latest is not None:
            state = load_trainer_state(latest)
            self.run_id = state.get("run_id", self.run_id)
            old = state.get("fingerprint")
            if old is None:
                old = {"fingerprint": "none (a checkpoint of an older dpokit)"}
            check_layout(latest, sharded)
            self.changed = compare(self.config, str(latest), old, fingerprint)
            self.resume_from = latest
            return latest
        if record is not None:  # killed before its first checkpoint: start it again
            changed = differences(record["fingerprint"], fingerprint)
            if changed and self.config.resume != "force":
                compare(self.config, str(self.path), record["fingerprint"], fingerprint)
            self.run_id = record["run_id"]
            logger.warning(
                "resume: %s holds no checkpoint (the run stopped before its first save, "
                "save_steps=%s): starting again from step 0%s",
                self.path,
                self.config.save_steps,
                f" with {describe_differences(changed)} (resume=force)" if changed else "",
            )
            return None  # nothing is continued, so no override is recorded
        if any((self.path / name).exists() for name in RUN_ENTRIES[:-1]):  # a cache is no run
            raise PathError(
                f"output_dir={self.path} holds a run without {RUN_FILE} and no checkpoint to "
                "continue: overwrite=true replaces it, or choose another output_dir"
            )
        # A stage directory holding only its inputs starts quietly; a missing or empty one may be
        # a mistyped path, so say it plainly.
        quiet = self.path.is_dir() and any(self.path.iterdir())
        (logger.info if quiet else logger.warning)(
            "resume: no run in %s to continue: starting a new run at step 0", self.path
        )
        return None

    def finish(self, step: int) -> None:
        """The run has saved ``final/`` after ``step`` optimizer steps: record it in
        ``run.json`` (atomically), so that a resume of a finished run is refused
        (:func:`check_unfinished`) instead of training it again. Main process only."""
        if self.accelerator.is_main_process:
            record = {**self.identity(), "finished_step": step}
            atomic_write(self.path / RUN_FILE, json.dumps(record, indent=1, default=str).encode())

    def prepare(self) -> None:
        """The data is checked and the model loaded: with ``overwrite``, remove the earlier run
        now (before a setup writes its cache here). Collective: every process calls it."""
        if self.accelerator.is_main_process and self.clear:
            logger.warning("overwrite=true: removing the earlier run in %s", self.path)
            shutil.rmtree(self.path)
        self.clear = False
        self.accelerator.wait_for_everyone()

    def start(self) -> None:
        """The run starts: write ``config.yaml``, ``run.json`` and any forced override.
        Collective: every process calls it."""
        self.prepare()
        if self.accelerator.is_main_process:
            self.path.mkdir(parents=True, exist_ok=True)
            self.config.save(self.path / CONFIG_FILE)
            record = {"run_id": self.run_id, "fingerprint": self.fingerprint}
            (self.path / RUN_FILE).write_text(json.dumps(record, indent=1, default=str) + "\n")
            if self.changed:
                record_overrides(self.path, self.resume_from, self.changed)
        self.accelerator.wait_for_everyone()

    def identity(self) -> dict:
        """What each checkpoint's ``trainer_state.json`` carries: ``run_id`` and
        ``fingerprint``."""
        return {"run_id": self.run_id, "fingerprint": self.fingerprint}


__all__ = [
    "FREE_KEYS",
    "OVERRIDES_FILE",
    "RUN_FILE",
    "RunDirectory",
    "check_reuse",
    "compare",
    "config_fingerprint",
    "differences",
    "trajectory_fingerprint",
    "weights_identity",
]
