"""TR-DPO: a reference that follows the policy (Gorbatovski et al. 2024, arXiv:2404.09656).

Every ``ref_model_sync_steps`` optimizer steps the reference's weights move toward the policy's::

    ref <- alpha * policy + (1 - alpha) * ref      (soft update; alpha = 1: hard copy)

with TRL's names ``sync_ref_model``, ``ref_model_mixup_alpha``, ``ref_model_sync_steps``. The
reference must then be scored online: a pre-computed table would be stale after the first sync,
so an explicit ``reference_mode=precomputed`` is refused and ``auto`` picks an online one.

Full fine-tuning: the reference is a frozen copy (``reference_mode=model``) whose parameters are
mixed in place, name by name. LoRA (TRL refuses PEFT here): the reference is a SECOND adapter of
the policy's model, ``"reference"``, a copy of the policy's adapter at the start (so the
reference is the starting policy), mixed factor by factor with the same rule: ``A_ref <- alpha *
A + (1 - alpha) * A_ref`` and the same for ``B``. A hard copy (alpha = 1) is exactly the policy;
a soft one mixes the low-rank factors, not the weight deltas (``B_ref A_ref`` is not the mix of
the two products), which keeps the reference a rank-r adapter -- the documented difference from
the full-model rule. The reference's weights and the number of syncs are checkpointed (through
``accelerator.register_for_checkpointing``), so a resumed run equals the uninterrupted one.
"""

from __future__ import annotations

import copy
import logging

import torch

from dpokit.config import ConfigError
from dpokit.reference import FrozenReference, eval_mode, score_batch

logger = logging.getLogger("dpokit")

REFERENCE_ADAPTER = "reference"


def check_sync_config(config, spec) -> None:
    """Refuse a TR-DPO config that cannot work, before anything loads.

    ``config``: a :class:`~dpokit.config.TrainConfig`; ``spec``: the method's ``MethodSpec``.
    Raises :class:`~dpokit.config.ConfigError` naming why.
    """
    if not config.sync_ref_model:
        return
    if spec.reference == "none":
        raise ConfigError(f"sync_ref_model=true: method {spec.name} has no reference to sync")
    if config.reference_mode == "precomputed":
        raise ConfigError(
            "sync_ref_model=true moves the reference every ref_model_sync_steps steps, so "
            "pre-computed reference log-probs would be stale after the first sync: use "
            "reference_mode=auto (an online reference) or model"
        )
    if config.lora and config.reference_mode == "model":
        raise ConfigError(
            "sync_ref_model=true with lora=true syncs a second adapter as the reference: use "
            "reference_mode=auto or adapter, not model"
        )
    if config.lora and config.reference is not None:
        raise ConfigError(
            "sync_ref_model=true with lora=true: the reference is a copy of the policy's adapter "
            "on the same base model, so `reference` cannot name another model"
        )


def sync_reference_mode(config, mode: str) -> str:
    """The reference mode of a run given the one :func:`dpokit.reference.choose_reference_mode`
    chose: with ``sync_ref_model`` a pre-computed table (``auto``'s usual pick) becomes an
    online reference (``adapter`` with LoRA: the second adapter; else ``model``), logged."""
    if not config.sync_ref_model or mode != "precomputed":
        return mode
    online = "adapter" if config.lora else "model"
    logger.info(
        "sync_ref_model: reference_mode auto -> %s (the reference moves every %d steps, so it "
        "is scored online, not pre-computed)",
        online,
        config.ref_model_sync_steps,
    )
    return online


class SyncedAdapterReference:
    """The policy's model with its second adapter ``"reference"`` active: TR-DPO's reference
    under LoRA. Scores in eval mode under ``no_grad``; the policy's adapter is active again
    afterwards (``set_adapter`` also restores which adapter is trainable)."""

    def __init__(self, policy_scorer, runner=None):
        self.policy_scorer = policy_scorer
        self.runner = runner if runner is not None else policy_scorer

    @torch.no_grad()
    def score(self, batch: dict[str, torch.Tensor], return_hidden: bool = False):
        """Sequence log-probs ``(R,)`` of the batch's rows under the reference adapter."""
        model = self.policy_scorer.model
        active = model.active_adapter
        model.set_adapter(REFERENCE_ADAPTER)
        try:
            with eval_mode(self.runner):
                return score_batch(self.runner, batch, return_hidden)
        finally:
            model.set_adapter(active)

    @property
    def lm_head(self) -> torch.nn.Module:
        """The policy's LM head (LoRA does not adapt it)."""
        return self.policy_scorer.model.get_output_embeddings()


class ReferenceSync:
    """Mixes the reference's parameters toward the policy's every ``steps`` optimizer steps.

    Attributes:
        pairs: (name, reference parameter, policy parameter), matched by name.
        alpha: the mix-up weight in [0, 1]; steps: optimizer steps between syncs.
        syncs: syncs done so far (checkpointed with the weights).
    """

    def __init__(self, pairs, alpha: float, steps: int):
        self.pairs = pairs
        self.alpha = alpha
        self.steps = steps
        self.syncs = 0

    @torch.no_grad()
    def after_step(self, step: int) -> bool:
        """Call after optimizer step ``step`` (1-based); syncs when ``step % steps == 0``.
        Returns whether it synced."""
        if step % self.steps:
            return False
        for _, ref, pol in self.pairs:
            ref.mul_(1.0 - self.alpha).add_(pol.detach().to(ref.dtype), alpha=self.alpha)
        self.syncs += 1
        logger.info("sync_ref_model: reference synced at step %d (alpha %g)", step, self.alpha)
        return True

    def state_dict(self) -> dict:
        """The reference's weights (by name) and the number of syncs."""
        weights = {name: ref.detach().cpu().clone() for name, ref, _ in self.pairs}
        return {"weights": weights, "syncs": self.syncs}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` saved (a resumed run's reference)."""
        for name, ref, _ in self.pairs:
            ref.copy_(state["weights"][name].to(ref.device, ref.dtype))
        self.syncs = int(state["syncs"])


def _model_pairs(reference: FrozenReference, policy_model) -> list:
    ref_params = dict(reference.scorer.model.named_parameters())
    pol_params = dict(policy_model.named_parameters())
    if set(ref_params) != set(pol_params):
        missing = sorted(set(ref_params) ^ set(pol_params))[:3]
        raise ConfigError(
            f"sync_ref_model: the reference and the policy have different parameters ({missing}"
            "...): TR-DPO needs the same architecture"
        )
    return [(name, ref_params[name], pol_params[name]) for name in sorted(ref_params)]


def _adapter_pairs(policy_model) -> list:
    """Add the ``reference`` adapter (a frozen copy of the active one) to a peft model."""
    active = policy_model.active_adapter
    config = copy.deepcopy(policy_model.peft_config[active])
    config.inference_mode = True
    policy_model.add_adapter(REFERENCE_ADAPTER, config)
    policy_model.set_adapter(active)  # the policy's adapter stays the active, trainable one
    params = dict(policy_model.named_parameters())
    pairs = []
    for name, param in params.items():
        if f".{active}." in name and param.requires_grad:
            ref_name = name.replace(f".{active}.", f".{REFERENCE_ADAPTER}.")
            params[ref_name].requires_grad_(False)
            pairs.append((ref_name, params[ref_name], param))
    with torch.no_grad():
        for _, ref, pol in pairs:
            ref.copy_(pol)  # the reference starts as the starting policy
    return pairs


def build_reference_sync(trainer) -> ReferenceSync | None:
    """TR-DPO's :class:`ReferenceSync` for a built :class:`~dpokit.engine.Trainer` (None when
    ``sync_ref_model`` is off). With LoRA it adds the reference adapter and replaces the
    trainer's references by :class:`SyncedAdapterReference`. Registered for checkpointing."""
    config = trainer.config
    if not config.sync_ref_model:
        return None
    acc = trainer.accelerator
    scorer = acc.unwrap_model(trainer.policy)
    if trainer.reference_mode == "adapter":
        pairs = _adapter_pairs(scorer.model)
        runner = trainer.policy if trainer.sharding else scorer
        reference = SyncedAdapterReference(scorer, runner)
        trainer.references = dict.fromkeys(trainer.references, reference)
    else:
        pairs = _model_pairs(trainer.references["train"], scorer.model)
    sync = ReferenceSync(pairs, config.ref_model_mixup_alpha, config.ref_model_sync_steps)
    acc.register_for_checkpointing(sync)
    return sync
