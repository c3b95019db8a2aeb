"""One micro-batch of KTO: the reference point z0 from mismatched pairs, then the loss.

Batches come from :class:`~dpokit.data.unpaired.UnpairedCollator`: rows 0..B-1 are the examples
(prompt_i, completion_i), rows B..2B-1 the mismatched pairs (prompt_i, kl_completion_i). Per step::

    rho_i = logp(y_i|x_i) - ref(y_i|x_i)                               policy with gradient
    z0    = max(0, mean over every process's mismatched pairs of
                   logp(y'_i|x_i) - ref(y'_i|x_i))                     no gradient, detached
    loss  = mean_i [ lam_D * (1 - sigmoid(beta * (rho_i - z0)))   if desirable
                     lam_U * (1 - sigmoid(beta * (z0 - rho_i)))   otherwise ]

``kl_baseline=zero`` skips the mismatched pairs (z0 = 0), for KTO that follows SFT on the same data.

An example counts as ``correct`` (``rewards/accuracies``) when its log-ratio lies on its label's
side of the reference point: rho > z0 for a desirable example, rho < z0 for an undesirable one --
exactly when its loss is below lam/2. With the policy equal to the reference every rho is 0 = z0
up to rounding, so the first accuracy is noise, as DPO's is.
"""

from __future__ import annotations

import logging

import torch

from dpokit.config import ConfigError
from dpokit.data.unpaired import UnpairedCollator, prepare_unpaired
from dpokit.losses import LossInputs, kto_weight_balance
from dpokit.metrics import Difference, Pooled
from dpokit.steps.base import Procedure, StepContext, StepOutput

logger = logging.getLogger("dpokit")

_SCORED = ("input_ids", "attention_mask", "completion_mask", "position_ids")


def check_kto_config(config, spec) -> None:
    """Before anything loads: z0's mismatched pairs need more than one example per process."""
    if config.method_args.get("kl_baseline") == "batch" and config.batch_size < 2:
        raise ConfigError(
            f"method {spec.name}: batch_size=1 per process leaves no batch to estimate KTO's "
            "reference point z0 on (the mean log-ratio of the micro-batch's mismatched pairs; "
            "the KTO authors require a per-process micro-batch > 1). Set batch_size >= 2 (and "
            "fewer gradient_accumulation_steps to keep the effective batch), or kl_baseline=zero "
            "when KTO follows SFT on the same data"
        )


def warn_kto_balance(trainer) -> None:
    """After the data are prepared: the paper's lam_D*n_D / (lam_U*n_U) in [1, 4/3] check."""
    labels = trainer.train_data.dataset["label"]
    n_desirable = int(sum(labels))
    n_undesirable = len(labels) - n_desirable
    hp = trainer.hyperparameters
    ratio = kto_weight_balance(
        n_desirable,
        n_undesirable,
        desirable_weight=hp["desirable_weight"],
        undesirable_weight=hp["undesirable_weight"],
    )
    logger.info(
        "KTO data: %d desirable, %d undesirable examples; balance "
        "desirable_weight*n_D / (undesirable_weight*n_U) = %.3f",
        n_desirable,
        n_undesirable,
        ratio,
    )


def rows(batch: dict[str, torch.Tensor], part: slice) -> dict[str, torch.Tensor]:
    """The scored tensors of rows ``part`` (trailing all-padding columns cut) and the index."""
    out = {key: batch[key][part] for key in _SCORED if batch.get(key) is not None}
    width = int(out["attention_mask"].sum(dim=0).nonzero().max()) + 1  # right-padded
    out = {key: value[:, :width] for key, value in out.items()}
    out["index"] = batch["index"]
    return out


def _score(scorer, part: dict[str, torch.Tensor]):
    return scorer(
        part["input_ids"],
        part["attention_mask"],
        part["completion_mask"],
        position_ids=part.get("position_ids"),
    )


def mismatched_kl_baseline(
    policy_logps: torch.Tensor, reference_logps: torch.Tensor, accelerator=None
) -> tuple[torch.Tensor, torch.Tensor]:
    """(z0, the mean before clamping) over the mismatched pairs of every process.

    Args:
        policy_logps, reference_logps: ``(B,)`` log-probs of this process's mismatched pairs.
        accelerator: with several processes, sums and counts are summed across them first, so
            every process gets the same z0 even when the last batches differ in size.

    With one process this is :func:`dpokit.losses.kto_kl_baseline`.
    """
    with torch.no_grad():
        logratios = (policy_logps - reference_logps).double()  # (B,)
        stats = torch.stack([logratios.sum(), logratios.new_tensor(logratios.numel())])
        if accelerator is not None and accelerator.num_processes > 1:
            stats = accelerator.reduce(stats, reduction="sum")
        mean = (stats[0] / stats[1]).float()
        return mean.clamp(min=0).detach(), mean.detach()


def kto_batch_loss(ctx: StepContext, batch: dict[str, torch.Tensor]) -> StepOutput:
    """One micro-batch of B unpaired examples (see the module docstring for the equations).

    ``batch``: an :class:`~dpokit.data.unpaired.UnpairedCollator` batch: ``input_ids`` etc.
    ``(2B, T)`` (the examples, then their mismatched pairs), ``index`` ``(B,)``, ``label``
    ``(B,)`` (1 = desirable). ``correct`` ``(B,)``: the log-ratio lies on its label's side of z0.
    """
    n = batch["index"].shape[0]
    examples, mismatched = rows(batch, slice(0, n)), rows(batch, slice(n, 2 * n))
    estimate = ctx.hyperparameters["kl_baseline"] == "batch"
    policy_out = _score(ctx.policy, examples)  # (B,) with gradient
    # A pre-computed table answers (matched, mismatched) for the batch's index whatever rows it
    # gets; an online reference scores the rows it is given. [:n] / [n:] fit both.
    reference_logps = ctx.reference.score(batch if estimate else examples).logps.detach().float()
    inputs = LossInputs(
        policy_logps=policy_out.logps,
        reference_logps=reference_logps[:n],
        desirable=batch["label"],
    )
    metrics: dict[str, object] = {}
    if estimate:
        with torch.no_grad():
            policy_mismatched = _score(ctx.policy, mismatched).logps.float()  # (B,)
        # A filler joins the all-reduce with no pairs (:mod:`dpokit.accumulation`).
        kept = slice(0, 0) if ctx.filler else slice(0, n)
        z0, unclamped = mismatched_kl_baseline(
            policy_mismatched[kept], reference_logps[n : 2 * n][kept], ctx.accelerator
        )
        inputs.kl_baseline = z0
        metrics["kl/mismatched"] = unclamped
    out = ctx.spec.compute(inputs, ctx.hyperparameters)
    z0 = inputs.kl_baseline if estimate else torch.zeros(())
    logratios = (policy_out.logps.detach() - inputs.reference_logps).float()  # (B,) rho
    desirable = batch["label"].bool()
    correct = torch.where(desirable, logratios > z0, logratios < z0)  # (B,)
    rewards = out.rewards.float()  # (B,) beta * rho, detached
    logps = policy_out.logps.detach().float()  # (B,)
    # Means over one label's rows are pooled as sums and counts over the whole step.
    metrics.update(
        {
            "loss": out.losses.detach().mean(),
            "kl_baseline": z0,
            "rewards/desirable": Pooled.where(rewards, desirable),
            "rewards/undesirable": Pooled.where(rewards, ~desirable),
            "rewards/margins": Difference("rewards/desirable", "rewards/undesirable"),
            "rewards/accuracies": correct.float().mean(),
            "logps/desirable": Pooled.where(logps, desirable),
            "logps/undesirable": Pooled.where(logps, ~desirable),
            "fraction_desirable": desirable.float().mean(),
        }
    )
    return StepOutput(
        loss=out.losses.mean(), metrics=metrics, losses=out.losses.detach(), correct=correct
    )


# Unpaired examples with their mismatched pairs (z0), checked before loading, balance logged.
KTO_STEP = Procedure(
    prepare=prepare_unpaired,
    collator=UnpairedCollator,
    batch_loss=kto_batch_loss,
    check=check_kto_config,
    setup=warn_kto_balance,
)
