"""The text of ``dpokit methods``: each method of the table with its formula, needs, defaults."""

from __future__ import annotations

from dpokit.losses.registry import METHODS, MethodSpec

__all__ = ["describe_needs", "format_methods"]

_REFERENCE_NEEDS = {
    "none": "no reference model",
    "logps": "reference sequence log-probs (online or pre-computed)",
    "online": "online reference with full-vocabulary logits",
}


def describe_needs(spec: MethodSpec) -> str:
    """What the engine must provide for ``spec``, e.g. ``"no reference model; data: pairs"``.

    Names the reference it needs, per-token averages, token-level KL, scores, a running reward
    baseline, the data kind, the per-batch step when it is not the plain pairwise one and the
    multi-run recipe if any.
    """
    parts = [_REFERENCE_NEEDS[spec.reference]]
    if spec.averaged_logps:
        parts.append("per-token averaged log-probs")
    if spec.token_kl:
        parts.append("token-level KL(ref || policy)")
    if spec.scores:
        parts.append("a score per response")
    if spec.baseline_rewards is not None:
        parts.append("a running mean of the rewards (engine state, checkpointed)")
    parts.append(f"data: {spec.data}")
    if spec.recipe is not None:
        parts.append(f"recipe: {spec.recipe} ({spec.stage_count} runs)")
    elif spec.step != "pairwise":
        parts.append(f"step: {spec.step}")
    return "; ".join(parts)


def format_methods(verbose: bool = False) -> str:
    """Human-readable listing of every method: formula, needs and defaults (``dpokit methods``).

    ``verbose`` adds the paper and every hyperparameter's type, range and meaning.
    """
    lines = [
        "Methods (nls(z) = -log sigmoid(z); rho = logp(y) - ref(y), summed over completion "
        "tokens; h = rho_w - rho_l):",
        "",
    ]
    width = max(map(len, METHODS)) + 2
    pad = " " * width
    for spec in METHODS.values():
        defaults = ", ".join(f"{k}={v}" for k, v in spec.defaults().items())
        lines.append(f"{spec.name:<{width}}{spec.title}")
        lines.append(f"{pad}loss:     {spec.formula}")
        lines.append(f"{pad}needs:    {describe_needs(spec)}")
        lines.append(f"{pad}defaults: {defaults or '-'}")
        if verbose:
            lines.append(f"{pad}paper:    {spec.paper}")
            for hp_name, hp in spec.hyperparameters.items():
                default = "unset" if hp.default is None else hp.default
                lines.append(f"{pad}  {hp_name} ({hp.describe()}, default {default}): {hp.help}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n"
