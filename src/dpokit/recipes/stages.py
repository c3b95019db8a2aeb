"""Methods that are several ordinary training runs in a row: stepwise DPO's data chunks and SPIN's
self-play iterations ("stages").

Stage s is a plain :class:`~dpokit.engine.Trainer` run in ``OUTPUT/<stage>/`` whose starting policy
AND reference are the model the previous stage ended with (stage 0: ``config.model``). Since that
reference is loaded from the previous stage's ``final/`` directory, pre-computed reference
log-probs are keyed by a hash of exactly those weights: they are recomputed per stage by
themselves, and every stage's first loss is ln 2 (policy == reference).

Layout::

    OUTPUT/config.yaml          the whole run's config
    OUTPUT/<stage>/             one Trainer run: data, config.yaml, metrics.jsonl, checkpoints/,
                                final/ (LoRA: final/ adapters + final-merged/, the next start)
    OUTPUT/<stage>/stage.json   written last; a resumed run skips stages that have it
    OUTPUT/metrics.jsonl        all stages' train/eval records in one log (``stage``, global step)
    OUTPUT/final/               the last stage's model (hard links where possible)

The run directory rules of :mod:`dpokit.rundir` apply to OUTPUT and to every stage: a fresh run
needs an empty OUTPUT (``overwrite=true`` clears an earlier run's, before the recipe reads its
data); ``OUTPUT/run.json`` holds the whole run's fingerprint (settings, starting weights, source
data), and ``resume=true`` refuses to continue a run whose fingerprint differs (``resume=force``
continues and records it in ``OUTPUT/resume-overrides.jsonl``). Finished stages are then skipped;
the interrupted one continues from its newest checkpoint through the Trainer's own resume, which
checks the stage's own fingerprint (its start model's weights, its data) the same way.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

from accelerate import PartialState

from dpokit import jsonl
from dpokit.cache import atomic_write
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataConfig
from dpokit.data.loading import load_source
from dpokit.engine import Trainer, TrainResult
from dpokit.rundir import (
    RUN_FILE,
    check_reuse,
    compare,
    config_fingerprint,
    read_record,
    record_overrides,
    weights_identity,
)

logger = logging.getLogger("dpokit")

STAGE_FILE = "stage.json"
METRICS_FILE = "metrics.jsonl"

# (stage index, stage directory, starting model) -> the data file the stage trains on.
MakeData = Callable[[int, Path, str], str]


def check_stage_config(config: TrainConfig) -> None:
    """Before a recipe reads anything: the settings fit a chain of stages, and OUTPUT is this
    run's (:func:`claim_output`).

    Raises :class:`~dpokit.config.ConfigError` when ``config.reference`` is set (each stage's
    reference is the previous stage's model) or a resume's fingerprint differs, and
    `~dpokit.errors.PathError` for a used OUTPUT without ``resume``/``overwrite``.
    """
    if config.reference is not None:
        raise ConfigError(
            f"method {config.method} sets every stage's reference itself (the model the previous "
            f"stage ended with); drop reference={config.reference!r}"
        )
    claim_output(config)


def run_fingerprint(config: TrainConfig) -> dict:
    """The whole run's fingerprint: the settings (:func:`dpokit.rundir.config_fingerprint`), the
    starting weights and the source data (each stage's Trainer checks its own as well)."""
    settings = DataConfig.from_train_config(config)
    source = load_source(config.data, settings, config.data_split)
    fingerprint = config_fingerprint(config)
    fingerprint.update(model=weights_identity(config.model), data=source.fingerprint)
    return json.loads(json.dumps(fingerprint, default=str))


def claim_output(config: TrainConfig) -> None:
    """A fresh run: OUTPUT empty, or cleared now with ``overwrite`` (the recipe writes into it
    before the first stage starts). A resume: OUTPUT's ``run.json`` fingerprint matches, or
    ``resume=force`` (the differences are recorded)."""
    state, output = PartialState(), Path(config.output_dir)
    if check_reuse(output, config.resume, config.overwrite):
        if state.is_main_process:
            logger.warning("overwrite=true: removing the earlier run in %s", output)
            shutil.rmtree(output)
        state.wait_for_everyone()
    record = read_record(output) if config.resume != "false" else None
    if record is not None:
        changed = compare(config, str(output), record["fingerprint"], run_fingerprint(config))
        if changed and state.is_main_process:
            record_overrides(output, None, changed)
        state.wait_for_everyone()


def run_stages(
    config: TrainConfig,
    names: list[str],
    make_data: MakeData,
    spec=None,
) -> TrainResult:
    """Run one Trainer per name in order, chaining models; returns the whole run's TrainResult.

    ``make_data(index, directory, start_model)`` writes stage ``index``'s data and returns its
    path; ``spec`` overrides the method table's entry for ``config.method`` in every stage.

    ``history`` holds the records of the stages trained by this call, each tagged with ``stage``;
    ``global_step`` counts the optimizer steps of all stages, skipped ones included.
    """
    state = PartialState()
    output = Path(config.output_dir)
    start_run(config, names, state)
    model, total_steps, skipped, history = config.model, 0, 0, []
    trained = False  # once a stage trains in this call, the later ones must too (new start model)
    for index, name in enumerate(names):
        directory = output / name
        resuming = config.resume != "false" and not trained
        done = finished(directory, config) if resuming else None
        if done is not None:
            logger.info("%s: finished earlier (%d steps); skipping", name, done["global_step"])
            model = str(next_model(directory, config))
            total_steps += done["global_step"]
            continue
        if trained and state.is_main_process and directory.exists():
            shutil.rmtree(directory)  # its data and checkpoints came from an older start model
        state.wait_for_everyone()
        data = make_data(index, directory, model)
        stage = stage_config(config, directory, model, data)
        logger.info("%s: training from %s (also the reference) on %s", name, model, data)
        result = Trainer(stage, spec=spec).train()
        trained = True
        history += [{**record, "stage": name} for record in result.history]
        total_steps, skipped = total_steps + result.global_step, skipped + result.skipped_batches
        model = str(next_model(directory, config))
        if state.is_main_process:
            record = {"global_step": result.global_step, "start_model": stage.model}
            write_json(directory / STAGE_FILE, {**record, "next_model": model})
            merge_metrics(output, names)
        state.wait_for_everyone()
    final_dir = publish_final(Path(model), output / "final", state)
    if state.is_main_process:
        merge_metrics(output, names)
    return TrainResult(output, final_dir, total_steps, history, skipped)


def start_run(config: TrainConfig, names: list[str], state: PartialState) -> None:
    """Save the run's config and ``run.json`` (its id and fingerprint; a resume keeps the id).

    OUTPUT was claimed by :func:`claim_output`: it is empty, cleared, or this run's.
    """
    output = Path(config.output_dir)
    if state.is_main_process:
        output.mkdir(parents=True, exist_ok=True)
        config.save(output / "config.yaml")
        record = read_record(output) if config.resume != "false" else None
        run_id = record["run_id"] if record else uuid.uuid4().hex
        payload = {"run_id": run_id, "fingerprint": run_fingerprint(config), "stages": names}
        write_json(output / RUN_FILE, payload)
    state.wait_for_everyone()


def stage_config(config: TrainConfig, directory: Path, model: str, data: str) -> TrainConfig:
    """The run's config for one stage: start (and reference) ``model``, stage data, stage dir.

    With LoRA every stage ends merged, so the next stage starts from (and is referenced by) full
    weights and trains a fresh adapter on them. The stage directory holds only what this run
    wrote (OUTPUT was claimed; a stage retrained from a new start model is removed first), so
    every stage runs with ``resume=true`` (``force`` with ``resume=force``): it continues its own
    checkpoint after checking its fingerprint, or starts fresh (dropping the log of an attempt
    killed before its first save).
    """
    return dataclasses.replace(
        config,
        model=str(model),
        data=str(data),
        data_split=None,
        reference=None,
        output_dir=str(directory),
        merge_lora=config.merge_lora or config.lora,
        resume="force" if config.resume == "force" else "true",
        overwrite=False,
    )


def next_model(directory: Path, config: TrainConfig) -> Path:
    """The model a finished stage hands on: ``final/``, or with LoRA ``final-merged/``."""
    return directory / ("final-merged" if config.lora else "final")


def finished(directory: Path, config: TrainConfig) -> dict | None:
    """The stage's record when it completed (and its model is still there), else None.

    A stage killed after its Trainer finished (``run.json`` holds ``finished_step``) but before
    ``stage.json`` was written is finished too: its Trainer would refuse to resume it."""
    marker = directory / STAGE_FILE
    if not next_model(directory, config).is_dir():
        return None
    if marker.exists():
        return json.loads(marker.read_text())
    record = read_record(directory) or {}
    if record.get("finished_step") is None:
        return None
    return {"global_step": record["finished_step"]}


def publish_final(model_dir: Path, final_dir: Path, state: PartialState) -> Path:
    """``OUTPUT/final`` = the last stage's model: hard links (no second copy on disk) or copies."""
    if state.is_main_process and model_dir.resolve() != final_dir.resolve():
        shutil.rmtree(final_dir, ignore_errors=True)
        shutil.copytree(model_dir, final_dir, copy_function=_link_or_copy)
    state.wait_for_everyone()
    return final_dir


def _link_or_copy(source: str, destination: str) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def merge_metrics(output: Path, names: list[str]) -> Path:
    """``OUTPUT/metrics.jsonl``: every stage's records, ``step`` counted across stages.

    Each record keeps its stage-local step as ``stage_step`` and names its ``stage``, so
    ``dpokit plot OUTPUT`` draws the whole run as one curve.
    """
    merged_records, offset = [], 0
    for name in names:
        path = output / name / METRICS_FILE
        if not path.exists():
            break
        last = 0
        for record in jsonl.read(path, partial_tail=True):
            last = max(last, record.get("step", 0))
            merged = {**record, "stage": name, "stage_step": record.get("step", 0)}
            merged["step"] = offset + record.get("step", 0)
            merged_records.append(merged)
        offset += last
    target = output / METRICS_FILE
    write_text(target, jsonl.dumps(merged_records))
    return target


def write_json(path: Path, payload) -> None:
    """``payload`` as indented JSON, written atomically (:func:`write_text`)."""
    write_text(path, json.dumps(payload, indent=1) + "\n")


def write_text(path: Path, text: str) -> None:
    """Atomic (UTF-8): a killed run never leaves a half-written file that a resume would trust."""
    atomic_write(path, text.encode("utf-8"))
