"""Atomic checkpoints: written to a temporary directory, marked complete, then renamed.

A run killed during a save leaves a ``.tmp-*`` directory without the ``COMPLETE`` marker; resume
ignores it (with a message) and takes the newest complete checkpoint.
"""

from __future__ import annotations

import copy
import json
import logging
import re
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

from peft import PeftModel
from transformers import AutoModelForCausalLM

from dpokit.modeling import is_peft_model
from dpokit.sharding import gathered_state_dict

logger = logging.getLogger(__name__)

MARKER = "COMPLETE"
STATE_FILE = "trainer_state.json"
_STEP_DIR = re.compile(r"^step-(\d+)$")


def checkpoint_root(output_dir: str | Path) -> Path:
    """``output_dir/checkpoints``."""
    return Path(output_dir) / "checkpoints"


def save_checkpoint(
    accelerator,
    output_dir: str | Path,
    step: int,
    state: dict[str, Any],
    keep: int,
    save_more: Callable[[Path], None] | None = None,
) -> Path:
    """Save model, optimizer, registered objects (scheduler) and every process's RNG state.

    ``state`` (JSON) is the loop position and the run's identity (``run_id``): pruning keeps the
    newest ``keep`` checkpoints of that run and never touches another run's.
    ``save_more(directory)``, a collective, writes what accelerate does not hold (dpokit's FSDP2
    shards: :func:`dpokit.sharding.save_sharded_state`) before the checkpoint is marked complete.
    """
    root = checkpoint_root(output_dir)
    final = root / f"step-{step}"
    tmp = root / f".tmp-step-{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if save_more is not None:
        save_more(tmp)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        (tmp / STATE_FILE).write_text(json.dumps(state, indent=1))
        (tmp / MARKER).write_text("ok\n")
        remove(final)
        tmp.rename(final)
        prune(root, keep, state.get("run_id"))
    accelerator.wait_for_everyone()
    return final


def save_due(step: int, save_steps: int | None, max_steps: int) -> bool:
    """Whether optimizer step ``step`` saves a checkpoint: every ``save_steps`` steps and, as
    transformers' ``save_strategy="steps"`` does, at the run's last step, so that a finished run
    can be extended (resume with a larger ``max_steps``). ``save_steps`` None: never."""
    return bool(save_steps) and (step % save_steps == 0 or step >= max_steps)


def prune(root: Path, keep: int, run_id: str | None = None) -> None:
    """Remove all but the newest ``keep`` complete checkpoints under ``root`` of the run
    ``run_id`` (the ``run_id`` in their state file); None: of any run."""
    own = [c for c in complete_checkpoints(root) if run_id is None or checkpoint_run(c) == run_id]
    for old in own[:-keep]:
        remove(old)


def checkpoint_run(checkpoint: Path) -> str | None:
    """The ``run_id`` a checkpoint was saved by (None: unreadable, or an older dpokit's)."""
    try:
        return load_trainer_state(checkpoint).get("run_id")
    except (OSError, ValueError):
        return None


def remove(checkpoint: Path) -> None:
    """Delete a checkpoint marker first: killed half-way, what is left is not taken as complete."""
    (checkpoint / MARKER).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def complete_checkpoints(root: Path) -> list[Path]:
    """Complete checkpoints, oldest first; incomplete ones are reported and skipped."""
    found = []
    if not root.is_dir():
        return found
    for path in root.iterdir():
        match = _STEP_DIR.match(path.name)
        if path.name.startswith(".tmp-"):
            logger.warning("ignoring %s: a save that did not finish (killed during save?)", path)
        elif match and (path / MARKER).exists():
            found.append((int(match.group(1)), path))
        elif match:
            logger.warning("ignoring %s: no %s marker, the save did not finish", path, MARKER)
    return [path for _, path in sorted(found)]


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    """The newest complete checkpoint of the run in ``output_dir``, or None."""
    complete = complete_checkpoints(checkpoint_root(output_dir))
    return complete[-1] if complete else None


def load_trainer_state(checkpoint: Path) -> dict[str, Any]:
    """The loop position (step, epoch, batches done) saved with ``checkpoint``."""
    return json.loads((checkpoint / STATE_FILE).read_text())


def save_final_model(
    accelerator, policy, tokenizer, output_dir: str | Path, merge_lora: bool
) -> Path:
    """Save the trained model to ``output_dir/final`` with ``save_pretrained`` (LoRA: the adapters;
    with ``merge_lora`` also the merged weights in ``output_dir/final-merged``) and the tokenizer.

    ``policy`` is the prepared :class:`~dpokit.logprobs.CompletionScorer` (its ``.model`` is
    saved). Collective: every process must call it. Returns the ``final`` directory.
    """
    final_dir = Path(output_dir) / "final"
    is_main = accelerator.is_main_process
    accelerator.wait_for_everyone()
    model = accelerator.unwrap_model(policy).model
    state_dict = accelerator.get_state_dict(policy)
    if state_dict is not None:
        state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    if is_peft_model(model):
        state_dict = None  # peft picks the adapter weights itself
    model.save_pretrained(
        final_dir, is_main_process=is_main, state_dict=state_dict, save_function=accelerator.save
    )
    if is_main:
        tokenizer.save_pretrained(final_dir)
        if is_peft_model(model) and merge_lora:
            merged_dir = Path(output_dir) / "final-merged"
            # merge a copy: merging in place would strip the adapter from the live policy
            copy.deepcopy(model).merge_and_unload().save_pretrained(merged_dir)
            tokenizer.save_pretrained(merged_dir)
    accelerator.wait_for_everyone()
    return final_dir


def save_final_gathered(accelerator, policy, tokenizer, output_dir: str | Path, merge_lora: bool):
    """``OUTPUT/final`` for a policy sharded by dpokit's FSDP2 (:mod:`dpokit.sharding`): the
    shards are gathered on the main process, which writes them with ``save_pretrained`` (LoRA:
    the adapters only). ``merge_lora`` merges the saved adapter into a fresh load of its base
    model (the live, sharded copy cannot be merged). Collective. Returns the ``final`` directory.
    """
    final_dir = Path(output_dir) / "final"
    state_dict = gathered_state_dict(policy)  # every process takes part; only main gets weights
    if accelerator.is_main_process:
        _write_gathered(policy.model, state_dict, tokenizer, Path(output_dir), merge_lora)
    accelerator.wait_for_everyone()  # later stages (SPIN's next iteration) read final/
    return final_dir


def _write_gathered(model, state_dict, tokenizer, output_dir: Path, merge_lora: bool) -> None:
    """The main process's half of :func:`save_final_gathered`."""
    final_dir = output_dir / "final"
    state_dict = {k.removeprefix("model."): v for k, v in state_dict.items()}
    model.save_pretrained(final_dir, state_dict=state_dict)
    tokenizer.save_pretrained(final_dir)
    if is_peft_model(model) and merge_lora:
        base = AutoModelForCausalLM.from_pretrained(
            model.peft_config["default"].base_model_name_or_path
        )
        merged = PeftModel.from_pretrained(base, final_dir).merge_and_unload()
        merged.save_pretrained(output_dir / "final-merged")
        tokenizer.save_pretrained(output_dir / "final-merged")
