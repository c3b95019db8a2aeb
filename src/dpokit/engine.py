"""The training loop: a model, a tokenizer and a dataset in; trained weights, metrics out.

:class:`Trainer` reads top to bottom: accelerator -> data -> policy -> reference -> optimizer ->
(resume) -> loop { micro-batches -> loss -> backward -> clip -> step -> log / eval / checkpoint }
-> save. The method enters only through its table entry (:data:`dpokit.losses.METHODS`) and the
per-batch step it names (:data:`dpokit.steps.STEPS`). The engine runs ONE training run; SPIN and
stepwise DPO chain several, as recipes above it (:mod:`dpokit.recipes`, entry point ``run``).
"""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path

import torch
from accelerate.utils import set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import AutoConfig

from dpokit import accumulation as accum
from dpokit import checkpoint as ckpt
from dpokit.config import ConfigError, TrainConfig
from dpokit.config_checks import no_eval_data
from dpokit.data import DataConfig, train_eval_split
from dpokit.data.packing import (
    LengthGroupedSampler,
    attention_cost,
    packed_window_problem,
    padding_fraction,
    row_lengths,
)
from dpokit.distributed import build_accelerator, own_sharding, parameter_sharding, uneven_batches
from dpokit.faults import NonFiniteLossError, all_finite, explain_oom
from dpokit.loop_state import LoopState, TrainResult
from dpokit.losses import MethodSpec, get_method
from dpokit.losses.options import option_settings
from dpokit.metrics import MetricAverager, MetricsWriter
from dpokit.modeling import (
    build_policy,
    check_positions,
    load_tokenizer,
    longest_sequence,
    resolve_dtype,
)
from dpokit.optim import build_optimizer, build_scheduler, count_steps
from dpokit.reference import ReferenceBuilder, choose_reference_mode
from dpokit.reference_sync import build_reference_sync, check_sync_config, sync_reference_mode
from dpokit.rundir import RunDirectory, trajectory_fingerprint
from dpokit.sharding import clip_grad_norm, load_sharded_state, save_sharded_state, shard_scorer
from dpokit.steps import Procedure, StepContext, batch_rows, procedure_for, resolve_packing
from dpokit.steps.baseline import RewardBaselineHook

logger = logging.getLogger("dpokit")


class Trainer:
    """Holds the pieces of one run; :meth:`train` is the loop."""

    def __init__(
        self,
        config: TrainConfig,
        spec: MethodSpec | None = None,
        procedure: Procedure | None = None,
    ):
        """Load everything a run needs: data, policy, optimizer, reference.

        ``spec`` overrides the method table's entry for ``config.method`` (``dpokit sft`` runs
        the same loop with the SFT spec), ``procedure`` the per-batch step the spec names.
        Raises ``ValueError`` without ``model`` or ``data``, :class:`~dpokit.config.ConfigError`
        for settings the method cannot run, :class:`~dpokit.data.DataError` for bad rows.
        """
        if not config.model or not config.data:
            raise ValueError("a run needs both `model` and `data`")
        self.config = config
        self.spec = spec or get_method(config.method).bind(config.method_args)
        self.hyperparameters = dict(config.method_args)
        self.procedure = procedure or procedure_for(self.spec)
        if self.procedure.check is not None:
            self.procedure.check(config, self.spec)  # before anything loads
        check_sync_config(config, self.spec)  # TR-DPO
        self.packing = resolve_packing(config, self.spec, self.procedure)
        self.output_dir = Path(config.output_dir)
        self.accelerator = build_accelerator(config)
        self.sharded = own_sharding(config, self.accelerator)  # dpokit's FSDP2 (dpokit.sharding)
        self.sharding = "fsdp2" if self.sharded else parameter_sharding(self.accelerator)
        self.reward_baseline = RewardBaselineHook(self.spec, self.hyperparameters, self.accelerator)
        set_seed(config.seed)
        self.is_main = self.accelerator.is_main_process
        # A used output_dir is refused here; nothing is written in it before run_dir.start().
        self.run_dir = RunDirectory(config, self.accelerator)

        self.tokenizer = load_tokenizer(
            config.model, config.chat_template, config.trust_remote_code
        )
        self._prepare_data()
        splits = [d for d in (self.train_data, self.eval_data) if d is not None]
        longest = max(longest_sequence(d.dataset) for d in splits)
        for name in {config.model, config.reference or config.model}:
            check_positions(name, config.max_length, longest)  # model config only, no weights
        processes = self.accelerator.num_processes
        fingerprint = trajectory_fingerprint(config, self.train_data, self.eval_data, processes)
        self.run_dir.verify(fingerprint, len(self.train_data), self.sharded)  # whose? finished?
        self.dtype = resolve_dtype(config.dtype)
        # dpokit's FSDP2 keeps the chunked head; processes other than 0 build on meta
        sharding, empty = (None, not self.is_main) if self.sharded else (self.sharding, False)
        self.policy = build_policy(config, self.dtype, sharding, empty)
        if self.sharded:  # before the optimizer: it must hold the sharded parameters
            shard_scorer(self.policy, self.policy.model, self.accelerator.device.type)
        self.run_dir.prepare()  # overwrite=true: the earlier run is removed here
        if self.procedure.setup is not None:
            self.procedure.setup(self)  # data and starting policy exist; loaders do not yet
        self._build_optimizer()
        # After `prepare`: pre-computed reference log-probs are scored by the prepared policy.
        self.references = self._build_references()
        self.reference_sync = build_reference_sync(self)  # TR-DPO; None when off
        self.run_dir.start()  # config.yaml, run.json: the run is known to start

    # ---- data -----------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        config = self.config
        settings = DataConfig.from_train_config(config, require_scores=self.spec.scores)
        with self.accelerator.main_process_first():
            train = self.procedure.prepare(config.data, self.tokenizer, settings, config.data_split)
            evaluation = None
            if config.eval_data:
                evaluation = self.procedure.prepare(
                    config.eval_data, self.tokenizer, settings, config.eval_data_split
                )
            elif config.eval_fraction > 0:
                train, evaluation = train_eval_split(train, config.eval_fraction, config.seed)
        # The data layer logged each split's summary as it prepared it: not again here.
        self.train_data, self.eval_data = train, evaluation
        pad_token_id = self.tokenizer.pad_token_id
        if self.packing == "none":
            self.collate = self.procedure.collator(pad_token_id)
        else:
            model_config = AutoConfig.from_pretrained(
                self.config.model, trust_remote_code=self.config.trust_remote_code
            )
            longest = max(longest_sequence(d.dataset) for d in (train, evaluation) if d is not None)
            problem = packed_window_problem(self.packing, model_config, longest)  # issue 12
            if problem is not None and self.config.packing != "auto":
                raise ConfigError(problem)
            if problem is not None:  # auto: the two-row layout is exact for any window
                self.packing, self.collate = "none", self.procedure.collator(pad_token_id)
                return
            self.collate = self.procedure.packed_collator(
                pad_token_id,
                self.packing,
                self.config.packing_length,
                attention_cost=attention_cost(model_config),
            )

    def _loader(self, prepared, shuffle: bool, batch_size: int | None = None) -> DataLoader:
        sampler = None
        if shuffle and self.config.group_by_length:
            lengths = row_lengths(prepared.dataset)
            sampler = LengthGroupedSampler(lengths, self.config.batch_size, self.config.seed)
        return DataLoader(
            prepared.dataset,
            batch_size=batch_size or self.config.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=self.collate,
            drop_last=False,
        )

    # ---- reference ------------------------------------------------------------------------------
    def _build_references(self) -> dict[str, object | None]:
        """One reference per split (pre-computed tables are indexed by the split's rows)."""
        mode = choose_reference_mode(self.config, self.spec)
        self.reference_mode = sync_reference_mode(self.config, mode)  # TR-DPO: online
        logger.info("method %s: reference mode %s", self.spec.name, self.reference_mode)
        builder = ReferenceBuilder(
            config=self.config,
            accelerator=self.accelerator,
            policy=self.policy,
            sharding=self.sharding,
            dtype=self.dtype,
            loader=lambda prepared: self._loader(prepared, shuffle=False),
            reduction=option_settings(self.spec, self.hyperparameters).reduction,  # LD-DPO
        )
        splits = {"train": self.train_data, "eval": self.eval_data}
        return builder.build(self.reference_mode, splits)

    # ---- optimizer ------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        config, acc = self.config, self.accelerator
        params = [p for p in self.policy.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(config, params)
        self.train_loader = self._loader(self.train_data, shuffle=config.shuffle)
        self.steps_per_epoch, self.max_steps = count_steps(
            config, len(self.train_loader), acc.num_processes
        )
        batches, dataset = len(self.train_loader), self.train_data.dataset  # before sharding
        # Stepped by hand once per optimizer step (not prepared: accelerate would step it once
        # per process).
        self.scheduler = build_scheduler(config, self.optimizer, self.max_steps)
        with uneven_batches(acc):  # every row once per epoch: no row repeated to even batches
            if self.sharded:  # dpokit's FSDP2 holds model and optimizer; accelerate shards data
                self.train_loader = acc.prepare(self.train_loader)
            else:
                self.policy, self.optimizer, self.train_loader = acc.prepare(
                    self.policy, self.optimizer, self.train_loader
                )
            # split -> (slots done -> this process's micro-batches, fillers last)
            self.epochs = {
                "train": accum.epoch_feed(self.train_loader, batches, dataset, self.collate, acc)
            }
            self.eval_loader = None
            if self.eval_data is not None:
                loader = self._loader(self.eval_data, False, config.eval_batch_size)
                self.eval_loader = acc.prepare_data_loader(loader)
                self.epochs["eval"] = accum.epoch_feed(
                    self.eval_loader, len(loader), self.eval_data.dataset, self.collate, acc
                )
        acc.register_for_checkpointing(self.scheduler)

    def _context(self, split: str, filler: bool = False) -> StepContext:
        """What a per-batch step needs for ``split`` (``filler``: a filler micro-batch's)."""
        policy_model = self.accelerator.unwrap_model(self.policy).model
        reference = self.references[split]
        reference_head = getattr(reference, "lm_head", None)
        return StepContext(
            spec=self.spec,
            hyperparameters=self.hyperparameters,
            policy=self.policy,
            reference=reference,
            policy_head=policy_model.get_output_embeddings(),
            reference_head=reference_head,
            chunk_size=self.config.logps_chunk_size,
            accelerator=self.accelerator,
            reward_baseline=self.reward_baseline.for_split(split, filler),
            filler=filler,
        )

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        """Run the loop to ``max_steps`` optimizer steps (resuming first when configured), evaluate
        at the end, save the final model; returns the run's :class:`TrainResult`.

        Raises :class:`NonFiniteLossError` on a NaN/inf loss or gradient (unless
        ``nonfinite=skip``) and :class:`OutOfMemoryError` when a micro-batch does not fit.
        """
        config, acc = self.config, self.accelerator
        writer = MetricsWriter(self.output_dir, enabled=self.is_main)
        # Reseed: setup draws from the RNG only sometimes (a reference-table cache miss iterates
        # a data loader, which draws a seed), and dropout must not depend on the cache's state.
        # A resumed run then restores the checkpoint's RNG state.
        set_seed(config.seed)
        step, epoch, batches_done = self._resume(writer)
        if config.report_to != "none":
            acc.init_trackers("dpokit", config={k: str(v) for k, v in config.to_dict().items()})
        context = (self._context("train"), self._context("train", filler=True))
        self.skipped_batches = 0  # non-finite batches skipped (nonfinite=skip); logged each step
        progress = tqdm(
            total=self.max_steps,
            initial=step,
            desc=f"{self.spec.name}",
            disable=not (self.is_main and config.progress),
            dynamic_ncols=True,
        )
        self.policy.train()
        loop = LoopState(step, epoch, batches_done)
        while loop.step < self.max_steps:
            self._run_epoch(loop, context, writer, progress)
        progress.close()
        if self.eval_loader is not None and not (
            config.eval_steps and loop.step % config.eval_steps == 0
        ):
            loop.history.append(self.evaluate(loop.step, writer))
        final, skipped = self.save_final(), self.skipped_batches
        self.run_dir.finish(loop.step)  # run.json: a resume of this run is refused
        if config.report_to != "none":
            acc.end_training()
        return TrainResult(self.output_dir, final, loop.step, loop.history, skipped)

    def _run_epoch(self, loop: LoopState, context: tuple, writer, progress) -> None:
        """The rest of epoch ``loop.epoch`` (after ``loop.batches_done`` slots), or until
        ``max_steps``; every completed optimizer step is logged, evaluated and saved as set.
        ``context``: the step contexts of real and of filler micro-batches."""
        config = self.config
        self.train_loader.set_epoch(loop.epoch)
        loader = self.epochs["train"](loop.batches_done)
        for window in accum.accumulation_windows(loader, config.gradient_accumulation_steps):
            stepped, grad_norm = self._accumulate(loop, context, window)
            if not stepped:
                continue
            loop.step += 1
            if self.reference_sync is not None:
                self.reference_sync.after_step(loop.step)  # TR-DPO
            progress.update(1)
            loop.history.append(self._log(loop, grad_norm, writer, progress))
            loop.tokens, loop.tick = 0, time.perf_counter()
            if config.eval_steps and loop.step % config.eval_steps == 0:
                loop.history.append(self.evaluate(loop.step, writer))
            if ckpt.save_due(loop.step, config.save_steps, self.max_steps):  # and the last
                self._save(loop.step, loop.epoch, loop.batches_done)
            if loop.step >= self.max_steps:
                return
        loop.epoch, loop.batches_done = loop.epoch + 1, 0

    def _accumulate(
        self, loop: LoopState, contexts: tuple[StepContext, StepContext], window: list
    ) -> tuple[bool, torch.Tensor | None]:
        """Forward and backward the micro-batches of one optimizer step, each weighted by its
        share of the step's rows or tokens, a filler by 0 (:mod:`dpokit.accumulation`); then
        clip and step. Returns (whether an optimizer step was taken, its grad norm)."""
        acc, units = self.accelerator, [self.procedure.units(m.batch) * m.real for m in window]
        scale, loop.rows = accum.step_totals(
            units, [batch_rows(m.batch) * m.real for m in window], acc
        )
        for i, micro in enumerate(window):
            loop.batches_done += 1
            batch, last = micro.batch, i == len(window) - 1
            with (
                explain_oom(self.config, loop.step + 1, batch, self.reference_mode),
                accum.micro_batch_sync(acc, self.policy, last),
            ):
                out = self.procedure.batch_loss(contexts[not micro.real], batch)
                finite = all_finite(out.loss, acc)
                if finite:
                    acc.backward(out.loss * (units[i] * scale))
            if not finite:  # the step's remaining micro-batches are passed over with it
                self._skip_batch(loop, batch, "loss")
                loop.batches_done += len(window) - 1 - i
                return False, None
            rows = batch_rows(batch) * micro.real  # a filler: 0, its metrics' names only
            loop.averager.add(out.metrics, count=rows)
            loop.averager.add({"padding_fraction": padding_fraction(batch)}, rows)
            loop.tokens += int(batch["attention_mask"].sum()) * micro.real
        grad_norm = self._clip()
        if not all_finite(grad_norm, acc):
            self._skip_batch(loop, window[-1].batch, "gradient")
            return False, None
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        return True, grad_norm

    def _skip_batch(self, loop: LoopState, batch: dict, what: str) -> None:
        """A non-finite ``what``: stop the run (:meth:`_nonfinite` raises) or drop the batch's
        gradients and the window's partial metrics (``nonfinite=skip``)."""
        self.skipped_batches += self._nonfinite(
            loop.step, loop.epoch, loop.batches_done, batch, what
        )
        self.optimizer.zero_grad()
        loop.averager.mean(self.accelerator)  # drop this step's partial metrics

    def _nonfinite(self, step, epoch, batches_done, batch, what) -> int:
        rows = batch["index"].tolist()
        where = (
            f"{what} is NaN/inf at step {step + 1} "
            f"(epoch {epoch}, batch {batches_done}, rows {rows})"
        )
        if self.config.nonfinite == "skip":
            logger.warning("%s; skipping this batch (nonfinite=skip)", where)
            return 1
        saved = self._save(step, epoch, batches_done - 1)
        raise NonFiniteLossError(
            f"{where}. The weights before it are saved in {saved}; "
            "set nonfinite=skip to skip such batches"
        )

    def _clip(self) -> torch.Tensor:
        max_norm = self.config.max_grad_norm or float("inf")
        if self.sharded:
            return clip_grad_norm(self.policy.parameters(), max_norm)
        return self.accelerator.clip_grad_norm_(self.policy.parameters(), max_norm)

    def _log(self, loop: LoopState, grad_norm, writer, progress) -> dict:
        step, lr = loop.step, self.scheduler.get_last_lr()[0]
        record = loop.train_record(self.accelerator, grad_norm, lr, self.skipped_batches)
        if step % self.config.logging_steps == 0 or step == self.max_steps:
            writer.write(record)
            if self.config.report_to != "none":
                self.accelerator.log({f"train/{k}": v for k, v in record.items()}, step=step)
        progress.set_postfix(
            loss=f"{record['loss']:.4f}",
            acc=f"{record.get('rewards/accuracies', float('nan')):.2f}",
            margin=f"{record.get('rewards/margins', float('nan')):.3f}",
        )
        return record

    @torch.no_grad()
    def evaluate(self, step: int, writer: MetricsWriter | None = None) -> dict:
        """Loss, reward accuracy and margins on the held-out split, over all processes (each
        row once). Raises :class:`ConfigError` when the run has no held-out data."""
        if self.eval_loader is None:
            raise ConfigError(no_eval_data("evaluate()"))
        contexts = (self._context("eval"), self._context("eval", filler=True))
        self.policy.eval()
        averager, rows = MetricAverager(), 0
        for micro in self.epochs["eval"](0):  # fillers: collectives only, counted nowhere
            out = self.procedure.batch_loss(contexts[not micro.real], micro.batch)
            averager.add(out.metrics, batch_rows(micro.batch) * micro.real)
            rows += batch_rows(micro.batch) * micro.real
        self.policy.train()
        record = {"step": step, "split": "eval", **averager.mean(self.accelerator)}
        record["rows"] = int(accum.process_sum([rows], self.accelerator)[0])  # each eval row once
        if writer is not None:
            writer.write(record)
        if self.is_main:
            logger.info("eval at step %d: %s", step, json.dumps(record))
        return record

    # ---- checkpoints ----------------------------------------------------------------------------
    def _save(self, step: int, epoch: int, batches_done: int) -> Path:
        state = {"step": step, "epoch": epoch, "batches_done": batches_done}
        state.update(self.run_dir.identity())
        state.update(self.reward_baseline.checkpoint_state())
        shards = (
            (lambda d: save_sharded_state(self.policy, self.optimizer, d)) if self.sharded else None
        )
        return ckpt.save_checkpoint(
            self.accelerator, self.output_dir, step, state, self.config.save_total_limit, shards
        )

    def _resume(self, writer: MetricsWriter) -> tuple[int, int, int]:
        latest = self.run_dir.resume_from  # checked against this run's fingerprint
        if latest is None:
            if self.is_main and writer.path.exists():
                writer.path.unlink()  # a fresh run starts a fresh log
            return 0, 0, 0
        self.accelerator.load_state(str(latest))
        if self.sharded:
            load_sharded_state(self.policy, self.optimizer, latest)
        state = ckpt.load_trainer_state(latest)
        self.reward_baseline.restore(state)
        writer.truncate_after(state["step"])
        logger.info("resumed from %s (step %d)", latest, state["step"])
        return state["step"], state["epoch"], state["batches_done"]

    def save_final(self) -> Path:
        """``OUTPUT/final``: ``save_pretrained`` output (adapters for LoRA, optionally merged into
        ``OUTPUT/final-merged``) plus the tokenizer (:func:`dpokit.checkpoint.save_final_model`)."""
        if self.sharded:
            return ckpt.save_final_gathered(
                self.accelerator,
                self.policy,
                self.tokenizer,
                self.output_dir,
                self.config.merge_lora,
            )
        return ckpt.save_final_model(
            self.accelerator, self.policy, self.tokenizer, self.output_dir, self.config.merge_lora
        )
