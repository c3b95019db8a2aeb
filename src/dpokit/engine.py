"""The training loop: a model, a tokenizer and a dataset in; trained weights, metrics out.

``train(config)`` reads top to bottom: accelerator -> data -> policy -> reference -> optimizer ->
(resume) -> loop { micro-batches -> loss -> backward -> clip -> step -> log / eval / checkpoint }
-> save. The method enters only through its table entry (:data:`dpokit.losses.METHODS`) and the
procedure for its kind of data (:data:`dpokit.procedures.PROCEDURES`).
"""

from __future__ import annotations

import contextlib
import copy
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
from transformers import AutoConfig, get_scheduler

from dpokit import checkpoint as ckpt
from dpokit.config import ConfigError, TrainConfig
from dpokit.data import DataConfig, train_eval_split
from dpokit.data.packing import (
    LengthGroupedSampler,
    attention_cost,
    padding_fraction,
    row_lengths,
)
from dpokit.distributed import (
    cpu_only_multiprocess,
    init_processes,
    log_sharded_plan,
    no_split_modules,
    parameter_sharding,
    refuse_other_reference,
    refuse_separate_reference,
)
from dpokit.errors import EXIT_OUT_OF_MEMORY, NonFiniteError, UserError
from dpokit.logprobs import CompletionScorer
from dpokit.losses import get_method
from dpokit.metrics import MetricAverager, MetricsWriter
from dpokit.modeling import (
    apply_lora,
    check_positions,
    is_peft_model,
    load_model,
    load_tokenizer,
    longest_sequence,
    resolve_dtype,
)
from dpokit.paths import check_run_paths
from dpokit.procedures import DRIVERS, StepContext, procedure_for
from dpokit.reference import (
    AdapterOffReference,
    CacheKey,
    FrozenReference,
    StartingPolicyReference,
    compute_reference_logps,
    default_cache_dir,
    load_cached,
    model_identity,
    save_cached,
)

logger = logging.getLogger("dpokit")


class NonFiniteLossError(NonFiniteError):
    """The loss or gradient turned NaN/inf; the message names the step and the batch rows."""


class OutOfMemoryError(UserError, RuntimeError):
    """The device ran out of memory in a training step; the message says what to change."""

    exit_code = EXIT_OUT_OF_MEMORY


# torch.OutOfMemoryError is torch >= 2.5; torch.cuda.OutOfMemoryError is its alias there.
OUT_OF_MEMORY_ERRORS = tuple(
    {getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError), torch.cuda.OutOfMemoryError}
)


def oom_message(config: TrainConfig, step: int, batch: dict, reference_mode: str) -> str:
    """What ran out of memory (batch shape) and the settings that need less, cheapest first."""
    rows, length = batch["input_ids"].shape  # (rows in the forward, padded length)
    lines = [
        f"out of memory at step {step}: a micro-batch of {rows} rows x {length} tokens "
        f"(batch_size={config.batch_size} per process, max_length={config.max_length}). "
        "What needs less memory:",
    ]
    if config.batch_size > 1:
        half = config.batch_size // 2
        accumulation = config.gradient_accumulation_steps * config.batch_size // half
        lines.append(
            f"  - batch_size={half} gradient_accumulation_steps={accumulation} "
            "(about the same batch per optimizer step)"
        )
    if not config.gradient_checkpointing:
        lines.append("  - gradient_checkpointing=true (recompute activations in backward)")
    if reference_mode == "model":
        lines.append(
            "  - reference_mode=precomputed (no reference model in memory; sequence-level "
            "methods) or lora=true (the reference is the policy with its adapter off)"
        )
    if not config.lora:
        lines.append("  - lora=true (train adapters only: no full optimizer state)")
    lines.append(
        f"  - a smaller max_length (now {config.max_length}) or logps_chunk_size "
        f"(now {config.logps_chunk_size}), or mixed_precision=bf16"
    )
    return "\n".join(lines)


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
        cpu=cpu_only_multiprocess(),  # torchrun on a CPU-only machine: gloo, not 1-process runs
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


def resolve_packing(config: TrainConfig, spec, procedure) -> str:
    """The batch layout: ``config.packing`` where the procedure's data can be packed (``auto``:
    per batch the cheaper exact layout, see dpokit.data.packing), else ``none``."""
    if procedure.packed_collator is None:
        if config.packing not in ("auto", "none"):
            raise ConfigError(
                f"packing={config.packing} needs preference pairs; method {spec.name} trains on "
                f"{spec.data!r} data, collated one way only: use packing=none (or auto)"
            )
        return "none"
    return config.packing


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
        if self.procedure.check is not None:
            self.procedure.check(config, self.spec)  # before anything loads
        self.packing = resolve_packing(config, self.spec, self.procedure)
        self.output_dir = Path(config.output_dir)
        self.accelerator = build_accelerator(config)
        self.sharding = parameter_sharding(self.accelerator)  # "fsdp", "zero3" or None
        set_seed(config.seed)
        self.is_main = self.accelerator.is_main_process
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            config.save(self.output_dir / "config.yaml")

        self.tokenizer = load_tokenizer(config.model, config.chat_template)
        self._prepare_data()
        splits = [d for d in (self.train_data, self.eval_data) if d is not None]
        longest = max(longest_sequence(d.dataset) for d in splits)
        for name in {config.model, config.reference or config.model}:
            check_positions(name, config.max_length, longest)  # model config only, no weights
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
        # Sharded parameters are whole only inside their module's forward: score through the
        # full model (the exact path) rather than reading the LM head weight (dpokit.distributed).
        fast = False if self.sharding else None
        self.policy = CompletionScorer(
            model,
            chunk_size=config.logps_chunk_size,
            fast=fast,
            saved_softmax_mb=config.logps_saved_softmax_mb,
        )
        if self.sharding == "fsdp":  # accelerate's auto-wrap reads the layer classes off it
            self.policy._no_split_modules = no_split_modules(model)
        if self.procedure.setup is not None:
            self.procedure.setup(self)  # data and starting policy exist; loaders do not yet
        self._build_optimizer()
        # After `prepare`: pre-computed reference log-probs are scored by the prepared policy.
        self.references = self._build_references()

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
        pad_token_id = self.tokenizer.pad_token_id
        if self.packing == "none":
            self.collate = self.procedure.collator(pad_token_id)
        else:
            model_config = AutoConfig.from_pretrained(self.config.model)
            self.collate = self.procedure.packed_collator(
                pad_token_id,
                self.packing,
                self.config.packing_length,
                attention_cost=attention_cost(model_config),
            )

    def _loader(self, prepared, shuffle: bool) -> DataLoader:
        sampler = None
        if shuffle and self.config.group_by_length:
            lengths = row_lengths(prepared.dataset)
            sampler = LengthGroupedSampler(lengths, self.config.batch_size, self.config.seed)
        return DataLoader(
            prepared.dataset,
            batch_size=self.config.batch_size,
            shuffle=shuffle and sampler is None,
            sampler=sampler,
            collate_fn=self.collate,
            drop_last=False,
        )

    # ---- reference ------------------------------------------------------------------------------
    def _build_references(self) -> dict[str, object | None]:
        """One reference per split (pre-computed tables are indexed by the split's rows)."""
        mode = choose_reference_mode(self.config, self.spec)
        self.reference_mode = mode
        logger.info("method %s: reference mode %s", self.spec.name, mode)
        log_sharded_plan(self.sharding, mode)
        if mode == "none":
            return {"train": None, "eval": None}
        if mode == "adapter":
            reference = AdapterOffReference(*self._policy_runner())
            return {"train": reference, "eval": reference}
        if mode == "model":
            refuse_separate_reference(self.sharding)
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
        scorer = CompletionScorer(model, chunk_size=self.config.logps_chunk_size)
        return FrozenReference(scorer.to(self.accelerator.device))

    def _policy_runner(self) -> tuple[CompletionScorer, torch.nn.Module]:
        """(the plain policy scorer, the module to call for reference forwards): the sharded
        wrapper under FSDP / ZeRO-3 (it gathers the weights), else the plain scorer (no DDP
        collective in a forward that has no backward)."""
        scorer = self.accelerator.unwrap_model(self.policy)
        return scorer, self.policy if self.sharding else scorer

    def _reference_for_precompute(self):
        """Without ``--reference`` the policy before its first step is the reference: score
        with it (LoRA: adapter off) instead of loading a second copy of the weights."""
        if self.config.reference is None:
            scorer, runner = self._policy_runner()
            if self.config.lora:
                return AdapterOffReference(scorer, runner)
            return StartingPolicyReference(runner)
        refuse_other_reference(self.sharding, self.config.reference)
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
        loader = self.accelerator.prepare_data_loader(self._loader(prepared, shuffle=False))
        with self.accelerator.autocast():
            table = compute_reference_logps(
                reference, loader, num_rows, gather=self.accelerator.gather_for_metrics
            )
        logger.info(
            "reference log-probs: process %d scored %d of %d rows",
            self.accelerator.process_index,
            table.local_rows,
            num_rows,
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
                # One kernel over all parameters (CPU and GPU); the default is a Python loop
                # over parameters on CPU.
                fused=config.fused_optimizer or None,
            )
        else:
            self.optimizer = torch.optim.RMSprop(
                params, lr=config.learning_rate, weight_decay=config.weight_decay
            )
        self.train_loader = self._loader(self.train_data, shuffle=config.shuffle)
        # Per process after sharding: accelerate gives every process ceil(batches / processes).
        micro_batches = math.ceil(len(self.train_loader) / self.accelerator.num_processes)
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
        # Reseed: setup draws from the RNG only sometimes (a reference-table cache miss iterates
        # a data loader, which draws a seed), and dropout must not depend on the cache's state.
        # A resumed run then restores the checkpoint's RNG state.
        set_seed(config.seed)
        step, epoch, batches_done = self._resume(writer)
        if config.report_to != "none":
            acc.init_trackers("dpokit", config={k: str(v) for k, v in config.to_dict().items()})
        context = self._context("train")
        averager = MetricAverager()
        history: list[dict] = []
        self.skipped_batches = 0  # non-finite batches skipped (nonfinite=skip); logged each step
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
                with acc.accumulate(self.policy), self._explain_oom(step, batch):
                    out = self.procedure.step(context, batch)
                    if not self._finite(out.loss):
                        self.skipped_batches += self._nonfinite(
                            step, epoch, batches_done, batch, "loss"
                        )
                        self.optimizer.zero_grad()
                        averager.mean(acc)  # drop this step's partial metrics
                        continue
                    acc.backward(out.loss)
                    averager.add(out.metrics)
                    averager.add({"padding_fraction": padding_fraction(batch)})
                    tokens += int(batch["attention_mask"].sum())
                    if not acc.sync_gradients:
                        continue
                    grad_norm = self._clip()
                    if not self._finite(grad_norm):
                        self.skipped_batches += self._nonfinite(
                            step, epoch, batches_done, batch, "gradient"
                        )
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
        return TrainResult(self.output_dir, final_dir, step, history, self.skipped_batches)

    @contextlib.contextmanager
    def _explain_oom(self, step: int, batch: dict):
        """Turn a device out-of-memory error into one that names the batch shape and the
        settings that shrink memory."""
        try:
            yield
        except OUT_OF_MEMORY_ERRORS as err:
            message = oom_message(self.config, step + 1, batch, self.reference_mode)
            raise OutOfMemoryError(message) from err

    def _finite(self, value: torch.Tensor | None) -> bool:
        """True on every process only if the value is finite on all of them (None: unknown,
        e.g. DeepSpeed clips inside its own step)."""
        if value is None:
            return True
        flag = torch.tensor(
            [float(torch.isfinite(torch.as_tensor(value)).all())], device=self.accelerator.device
        )
        if self.accelerator.num_processes > 1:
            # accelerate's reduce knows only sum and mean: finite everywhere <=> sum == processes
            flag = self.accelerator.reduce(flag, reduction="sum")
        return bool(flag.item() == self.accelerator.num_processes)

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
        record["grad_norm"] = float("nan") if grad_norm is None else float(grad_norm)
        record["skipped_batches"] = self.skipped_batches
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
                # merge a copy: merging in place would strip the adapter from the live policy
                copy.deepcopy(model).merge_and_unload().save_pretrained(merged_dir)
                self.tokenizer.save_pretrained(merged_dir)
        acc.wait_for_everyone()
        return final_dir


def train(config: TrainConfig) -> TrainResult:
    """Train ``config.model`` on ``config.data`` with ``config.method`` (see TrainConfig).

    Methods whose table entry names a driver (SPIN's rounds, stepwise DPO's stages) run through
    it; every other method is one :class:`Trainer` run.
    """
    check_run_paths(config)  # one-line errors before anything loads (dpokit.paths)
    init_processes()  # before a driver's first PartialState(): it would settle the backend
    driver = DRIVERS.get(get_method(config.method).procedure or "")
    return driver(config) if driver is not None else Trainer(config).train()
