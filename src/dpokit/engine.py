"""The training loop: a model, a tokenizer and a dataset in; trained weights, metrics out.

``train(config)`` reads top to bottom: accelerator -> data -> policy -> reference -> optimizer ->
(resume) -> loop { micro-batches -> loss -> backward -> clip -> step -> log / eval / checkpoint }
-> save. The method enters only through its table entry (:data:`dpokit.losses.METHODS`) and the
procedure for its kind of data (:data:`dpokit.procedures.PROCEDURES`).
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DataLoaderConfiguration, set_seed
from torch.utils.data import DataLoader
from tqdm.auto import tqdm
from transformers import get_scheduler

from dpokit import checkpoint as ckpt
from dpokit.config import TrainConfig
from dpokit.data import DataConfig, train_eval_split
from dpokit.logprobs import CompletionScorer
from dpokit.losses import get_method
from dpokit.metrics import MetricAverager, MetricsWriter
from dpokit.modeling import apply_lora, is_peft_model, load_model, load_tokenizer, resolve_dtype
from dpokit.procedures import DRIVERS, StepContext, procedure_for
from dpokit.reference import (
    AdapterOffReference,
    CacheKey,
    FrozenReference,
    compute_reference_logps,
    default_cache_dir,
    load_cached,
    model_identity,
    save_cached,
)

logger = logging.getLogger("dpokit")


class NonFiniteLossError(RuntimeError):
    """The loss or gradient turned NaN/inf; the message names the step and the batch rows."""


@dataclass
class TrainResult:
    output_dir: Path
    final_dir: Path
    global_step: int
    history: list[dict] = field(default_factory=list)
    skipped_batches: int = 0


def build_accelerator(config: TrainConfig) -> Accelerator:
    mixed_precision = config.mixed_precision
    if mixed_precision == "auto":
        bf16_ok = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        mixed_precision = "bf16" if bf16_ok else "no"  # CPU bf16 is far slower than fp32
    trackers = None if config.report_to == "none" else config.report_to
    return Accelerator(
        mixed_precision=mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=trackers,
        project_dir=config.output_dir,
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=config.seed),
    )


def data_config(config: TrainConfig, require_scores: bool) -> DataConfig:
    chat_template = Path(config.chat_template).read_text() if config.chat_template else None
    return DataConfig(
        max_length=config.max_length,
        max_prompt_length=config.max_prompt_length,
        truncation=config.truncation,
        identical_pairs=config.identical_pairs,
        bad_scores=config.bad_scores,
        require_scores=require_scores,
        num_proc=config.num_proc,
        chat_template=chat_template,
    )


def choose_reference_mode(config: TrainConfig, spec) -> str:
    """``auto``: none if the method needs none; online (adapter-off with LoRA, else a frozen
    copy) for token-level methods; otherwise pre-computed and cached."""
    if spec.reference == "none":
        return "none"
    if config.reference_mode != "auto":
        return config.reference_mode
    if spec.reference == "online":
        return "adapter" if config.lora and config.reference is None else "model"
    return "precomputed"


class Trainer:
    """Holds the pieces of one run; :meth:`train` is the loop."""

    def __init__(self, config: TrainConfig, spec=None, procedure=None):
        """``spec``/``procedure`` override the method table's entry: drivers and ``dpokit sft``
        run the same loop with another loss or another kind of data."""
        if not config.model or not config.data:
            raise ValueError("a run needs both `model` and `data`")
        self.config = config
        self.spec = spec or get_method(config.method)
        self.hyperparameters = dict(config.method_args)
        self.procedure = procedure or procedure_for(self.spec)
        self.output_dir = Path(config.output_dir)
        self.accelerator = build_accelerator(config)
        set_seed(config.seed)
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / "config.yaml")

        self.tokenizer = load_tokenizer(config.model, config.chat_template)
        self._prepare_data()
        self.dtype = resolve_dtype(config.dtype)
        model = load_model(config.model, self.dtype, config.gradient_checkpointing)
        if config.lora:
            model = apply_lora(
                model,
                config.lora_r,
                config.lora_alpha,
                config.lora_dropout,
                config.lora_target_modules,
            )
        self.policy = CompletionScorer(model, chunk_size=config.logps_chunk_size)
        self.references = self._build_references()
        self._build_optimizer()

    # ---- data -----------------------------------------------------------------------------------
    def _prepare_data(self) -> None:
        config = self.config
        settings = data_config(config, require_scores=self.spec.scores)
        with self.accelerator.main_process_first():
            train = self.procedure.prepare(config.data, self.tokenizer, settings, config.data_split)
            evaluation = None
            if config.eval_data:
                evaluation = self.procedure.prepare(config.eval_data, self.tokenizer, settings)
            elif config.eval_fraction > 0:
                train, evaluation = train_eval_split(train, config.eval_fraction, config.seed)
        if self.is_main:
            logger.info("training data: %s", train.summary.format())
        self.train_data, self.eval_data = train, evaluation
        self.collate = self.procedure.collator(self.tokenizer.pad_token_id)

    def _loader(self, prepared, shuffle: bool) -> DataLoader:
        return DataLoader(
            prepared.dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle,
            collate_fn=self.collate,
            drop_last=False,
        )

    # ---- reference ------------------------------------------------------------------------------
    def _build_references(self) -> dict[str, object | None]:
        """One reference per split (pre-computed tables are indexed by the split's rows)."""
        mode = choose_reference_mode(self.config, self.spec)
        self.reference_mode = mode
        logger.info("method %s: reference mode %s", self.spec.name, mode)
        if mode == "none":
            return {"train": None, "eval": None}
        if mode == "adapter":
            reference = AdapterOffReference(self.policy)
            return {"train": reference, "eval": reference}
        if mode == "model":
            reference = self._frozen_reference()
            return {"train": reference, "eval": reference}
        splits = {"train": self.train_data, "eval": self.eval_data}
        return {
            name: self._precomputed(data) if data is not None else None
            for name, data in splits.items()
        }

    def _frozen_reference(self) -> FrozenReference:
        name = self.config.reference or self.config.model
        model = load_model(name, self.dtype)
        return FrozenReference(CompletionScorer(model, chunk_size=self.config.logps_chunk_size))

    def _reference_for_precompute(self):
        if self.config.lora and self.config.reference is None:
            return AdapterOffReference(self.policy)
        return self._frozen_reference()

    def _precomputed(self, prepared):
        config = self.config
        cache_dir = (
            Path(config.reference_cache_dir)
            if config.reference_cache_dir
            else (default_cache_dir())
        )
        key = CacheKey(
            reference_identity=model_identity(config.reference or config.model),
            data_fingerprint=prepared.fingerprint,
            settings=json.dumps(
                {"dtype": config.dtype, "mixed_precision": self.accelerator.mixed_precision}
            ),
        )
        num_rows = len(prepared.dataset)
        cached = load_cached(cache_dir, key, num_rows)
        if cached is not None:
            logger.info("reference log-probs: cache hit %s", key.digest)
            return cached
        logger.info("reference log-probs: computing for %d rows (cache %s)", num_rows, key.digest)
        reference = self._reference_for_precompute()
        if isinstance(reference, FrozenReference):
            reference.scorer.to(self.accelerator.device)
        loader = self.accelerator.prepare_data_loader(self._loader(prepared, shuffle=False))
        with self.accelerator.autocast():
            table = compute_reference_logps(
                reference, loader, num_rows, gather=self.accelerator.gather_for_metrics
            )
        if self.is_main:
            save_cached(cache_dir, key, table)
        self.accelerator.wait_for_everyone()
        return table

    # ---- optimizer ------------------------------------------------------------------------------
    def _build_optimizer(self) -> None:
        config = self.config
        params = [p for p in self.policy.parameters() if p.requires_grad]
        if config.optimizer == "adamw":
            self.optimizer = torch.optim.AdamW(
                params,
                lr=config.learning_rate,
                weight_decay=config.weight_decay,
                betas=(config.adam_beta1, config.adam_beta2),
            )
        else:
            self.optimizer = torch.optim.RMSprop(
                params, lr=config.learning_rate, weight_decay=config.weight_decay
            )
        self.train_loader = self._loader(self.train_data, shuffle=config.shuffle)
        micro_batches = len(self.train_loader) // self.accelerator.num_processes or 1
        self.steps_per_epoch = max(1, math.ceil(micro_batches / config.gradient_accumulation_steps))
        self.max_steps = config.max_steps or math.ceil(config.num_epochs * self.steps_per_epoch)
        warmup = config.warmup_steps
        if warmup is None:
            warmup = int(config.warmup_ratio * self.max_steps)
        schedule = (
            "constant_with_warmup" if config.lr_scheduler == "constant" else (config.lr_scheduler)
        )
        # Stepped by hand once per optimizer step (not prepared: accelerate would step it once
        # per process).
        self.scheduler = get_scheduler(
            schedule, self.optimizer, num_warmup_steps=warmup, num_training_steps=self.max_steps
        )
        acc = self.accelerator
        self.policy, self.optimizer, self.train_loader = acc.prepare(
            self.policy, self.optimizer, self.train_loader
        )
        acc.register_for_checkpointing(self.scheduler)
        for name in ("train", "eval"):
            reference = self.references[name]
            if isinstance(reference, FrozenReference):
                reference.scorer.to(acc.device)
        self.eval_loader = None
        if self.eval_data is not None:
            self.eval_loader = acc.prepare_data_loader(self._loader(self.eval_data, shuffle=False))

    def _context(self, split: str) -> StepContext:
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
        )

    # ---- the loop -------------------------------------------------------------------------------
    def train(self) -> TrainResult:
        config, acc = self.config, self.accelerator
        writer = MetricsWriter(self.output_dir, enabled=self.is_main)
        step, epoch, batches_done = self._resume(writer)
        if config.report_to != "none":
            acc.init_trackers("dpokit", config={k: str(v) for k, v in config.to_dict().items()})
        context = self._context("train")
        averager = MetricAverager()
        history: list[dict] = []
        skipped = 0
        progress = tqdm(
            total=self.max_steps,
            initial=step,
            desc=f"{self.spec.name}",
            disable=not (self.is_main and config.progress),
            dynamic_ncols=True,
        )
        self.policy.train()
        tokens, tick = 0, time.perf_counter()
        while step < self.max_steps:
            self.train_loader.set_epoch(epoch)
            loader = (
                acc.skip_first_batches(self.train_loader, batches_done)
                if batches_done
                else (self.train_loader)
            )
            for batch in loader:
                batches_done += 1
                with acc.accumulate(self.policy):
                    out = self.procedure.step(context, batch)
                    if not self._finite(out.loss):
                        skipped += self._nonfinite(step, epoch, batches_done, batch, "loss")
                        self.optimizer.zero_grad()
                        averager.mean(acc)  # drop this step's partial metrics
                        continue
                    acc.backward(out.loss)
                    averager.add(out.metrics)
                    tokens += int(batch["attention_mask"].sum())
                    if not acc.sync_gradients:
                        continue
                    grad_norm = self._clip()
                    if not self._finite(grad_norm):
                        skipped += self._nonfinite(step, epoch, batches_done, batch, "gradient")
                        self.optimizer.zero_grad()
                        averager.mean(acc)
                        continue
                    self.optimizer.step()
                    self.scheduler.step()
                    self.optimizer.zero_grad()
                step += 1
                progress.update(1)
                record = self._log(step, averager, grad_norm, tokens, tick, writer, progress)
                history.append(record)
                tokens, tick = 0, time.perf_counter()
                if config.eval_steps and step % config.eval_steps == 0:
                    history.append(self.evaluate(step, writer))
                if config.save_steps and step % config.save_steps == 0:
                    self._save(step, epoch, batches_done)
                if step >= self.max_steps:
                    break
            else:
                epoch, batches_done = epoch + 1, 0
        progress.close()
        if self.eval_loader is not None and not (
            config.eval_steps and step % config.eval_steps == 0
        ):
            history.append(self.evaluate(step, writer))
        final_dir = self.save_final()
        if config.report_to != "none":
            acc.end_training()
        return TrainResult(self.output_dir, final_dir, step, history, skipped)

    def _finite(self, value: torch.Tensor) -> bool:
        """True on every process only if the value is finite on all of them."""
        flag = torch.tensor(
            [float(torch.isfinite(torch.as_tensor(value)).all())], device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            flag = self.accelerator.reduce(flag, reduction="min")
        return bool(flag.item() == 1.0)

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
        return self.accelerator.clip_grad_norm_(self.policy.parameters(), max_norm)

    def _log(self, step, averager, grad_norm, tokens, tick, writer, progress) -> dict:
        record = {"step": step, "split": "train", **averager.mean(self.accelerator)}
        record["grad_norm"] = float(grad_norm)
        record["lr"] = self.scheduler.get_last_lr()[0]
        record["tokens_per_second"] = (
            tokens * self.accelerator.num_processes / max(time.perf_counter() - tick, 1e-9)
        )
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
        """Loss, reward accuracy and margins on the held-out split, over all processes."""
        context = self._context("eval")
        self.policy.eval()
        averager = MetricAverager()
        for batch in self.eval_loader:
            averager.add(self.procedure.step(context, batch).metrics)
        self.policy.train()
        record = {"step": step, "split": "eval", **averager.mean(self.accelerator)}
        if writer is not None:
            writer.write(record)
        if self.is_main:
            logger.info("eval at step %d: %s", step, json.dumps(record))
        return record

    # ---- checkpoints ----------------------------------------------------------------------------
    def _save(self, step: int, epoch: int, batches_done: int) -> Path:
        state = {"step": step, "epoch": epoch, "batches_done": batches_done}
        return ckpt.save_checkpoint(
            self.accelerator, self.output_dir, step, state, self.config.save_total_limit
        )

    def _resume(self, writer: MetricsWriter) -> tuple[int, int, int]:
        if not self.config.resume:
            if self.is_main and writer.path.exists():
                writer.path.unlink()  # a fresh run starts a fresh log
            return 0, 0, 0
        latest = ckpt.latest_checkpoint(self.output_dir)
        if latest is None:
            logger.warning("resume: no complete checkpoint in %s; starting fresh", self.output_dir)
            return 0, 0, 0
        self.accelerator.load_state(str(latest))
        state = ckpt.load_trainer_state(latest)
        writer.truncate_after(state["step"])
        logger.info("resumed from %s (step %d)", latest, state["step"])
        return state["step"], state["epoch"], state["batches_done"]

    def save_final(self) -> Path:
        """``save_pretrained`` output (adapters for LoRA, optionally merged) plus the tokenizer."""
        acc = self.accelerator
        final_dir = self.output_dir / "final"
        acc.wait_for_everyone()
        model = acc.unwrap_model(self.policy).model
        state_dict = acc.get_state_dict(self.policy)
        if state_dict is not None:
            state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
        if is_peft_model(model):
            state_dict = None  # peft picks the adapter weights itself
        model.save_pretrained(
            final_dir, is_main_process=self.is_main, state_dict=state_dict, save_function=acc.save
        )
        if self.is_main:
            self.tokenizer.save_pretrained(final_dir)
            if is_peft_model(model) and self.config.merge_lora:
                merged_dir = self.output_dir / "final-merged"
                model.merge_and_unload().save_pretrained(merged_dir)
                self.tokenizer.save_pretrained(merged_dir)
        acc.wait_for_everyone()
        return final_dir


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.method`` (see TrainConfig).

    Methods whose table entry names a driver (SPIN's rounds, stepwise DPO's stages) run through
    it; every other method is one :class:`Trainer` run.
    """
    driver = DRIVERS.get(get_method(config.method).procedure or "")
    return driver(config) if driver is not None else Trainer(config).train()
