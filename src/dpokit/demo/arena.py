"""``dpokit arena``: every trainable method from the same SFT model and data, side by side.

For each seed: one SFT model and one on-policy data set (:func:`dpokit.demo.demo.prepare`), then
each method trained from the SFT model with the demo's settings (plus the per-method ones in
:data:`~dpokit.demo.settings.METHOD_SETTINGS`), and evaluated on held-out prompts against the SFT
model's samples. Extra "claim" runs train DPO and rDPO on the label-flipped copy of the pairs.

Writes ``arena.md`` (table, claims, settings), ``arena.csv`` (one line per run and seed) and
``arena.png`` (judge reward against KL to the SFT model).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import statistics
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from dpokit.demo.arena_claims import NAMED_RUNS, catalogue_claims
from dpokit.demo.demo import baseline_eval, evaluate_run, prepare, torch_threads, train_method
from dpokit.demo.settings import (
    DEFAULT_LEARNING_RATE,
    METHOD_SETTINGS,
    TUNING_NOTES,
    DemoConfig,
    trainable_methods,
)
from dpokit.losses import get_method

logger = logging.getLogger("dpokit")

METRICS = (
    ("judge_reward", "judge reward"),
    ("win_rate", "win rate vs SFT"),
    ("kl", "KL to SFT"),
    ("reward_accuracy", "reward acc."),
    ("chosen_logp_change", "chosen logp change"),
    ("seconds", "wall time (s)"),
)


@dataclass
class Run:
    """One row of one seed: a method (or a claim variant) and what came out."""

    name: str
    method: str
    seed: int
    metrics: dict[str, float] = field(default_factory=dict)
    error: str | None = None


@dataclass
class ArenaConfig:
    """Settings of ``dpokit arena``: the demo settings, methods, seeds, and the extra runs."""

    demo: DemoConfig = field(default_factory=DemoConfig)
    methods: list[str] | None = None  # None: every method `dpokit train` runs
    seeds: list[int] = field(default_factory=lambda: [0])
    out_dir: str | None = None  # default: demo.work_dir
    claims: bool = True  # also DPO and rDPO on the label-flipped pairs
    untuned: bool = True  # also the methods of METHOD_SETTINGS without their tuned settings
    readme: str | None = None  # a Markdown file whose arena block to replace (README.md)


def claim_runs(config: ArenaConfig, methods: list[str]) -> list[tuple[str, str, dict]]:
    """(row name, method, demo overrides) of the extra runs behind the papers' claims."""
    if not config.claims:
        return []
    noisy = {"train_data": "noisy_pairs.jsonl"}
    eps = config.demo.flip_fraction
    runs = []
    if "dpo" in methods:
        runs.append(("dpo (flipped labels)", "dpo", noisy))
    if "rdpo" in methods:
        runs.append((f"rdpo eps={eps:g} (flipped labels)", "rdpo", {**noisy, "eps": eps}))
    return runs


def run_arena(config: ArenaConfig) -> dict:
    """Every method on every seed from the same SFT model; writes the table, CSV and plot."""
    with torch_threads(config.demo.threads):
        return _run_arena(config)


def _run_arena(config: ArenaConfig) -> dict:
    methods = config.methods or trainable_methods()
    for method in methods:
        get_method(method)
    runs: list[Run] = []
    for seed in config.seeds:
        runs.extend(_run_seed(config, methods, seed))
    out_dir = Path(config.out_dir or config.demo.work_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    names = list(dict.fromkeys(run.name for run in runs))
    table = markdown_table(runs, names)
    claims = claim_sentences(runs, config)
    files = [
        write_csv(runs, out_dir / "arena.csv"),
        write_markdown(config, methods, table, claims, runs, out_dir / "arena.md"),
        plot_reward_vs_kl(runs, names, out_dir / "arena.png"),
    ]
    if config.readme:
        files.append(update_readme(Path(config.readme), out_dir, table, claims, config))
    return {"table": table, "claims": claims, "files": files, "runs": runs}


def _run_seed(config: ArenaConfig, methods: list[str], seed: int) -> list[Run]:
    demo = dataclasses.replace(config.demo, seed=seed, method_args=dict(config.demo.method_args))
    prepared = prepare(demo)
    baseline = baseline_eval(demo, prepared)
    runs = [Run("SFT", "sft", seed, {**baseline.metrics, "seconds": prepared.seconds})]
    # A method whose default means little alone runs under a name with its settings (MPO).
    plan = [(*NAMED_RUNS.get(m, (m, {})), m) for m in methods]
    plan = [(name, m, o) for name, o, m in plan] + claim_runs(config, methods)
    if config.untuned:
        plan += [(f"{m} (untuned)", m, {"tuned": False}) for m in methods if m in METHOD_SETTINGS]
    for name, method, overrides in plan:
        logger.info("arena: seed %d, %s", seed, name)
        settings = {k: v for k, v in overrides.items() if k in _demo_fields()}
        method_args = {k: v for k, v in overrides.items() if k not in _demo_fields()}
        run_config = dataclasses.replace(
            demo, method=method, **settings, method_args={**demo.method_args, **method_args}
        )
        row = Run(name, method, seed)
        start = time.perf_counter()
        try:
            run = train_method(run_config, prepared, method, name=f"arena/{_slug(name)}")
            result = evaluate_run(run_config, prepared, run["final_dir"], baseline)
            result.save(Path(run["output_dir"]) / "eval")
            row.metrics = {**result.metrics, "seconds": run["seconds"]}
        except Exception as error:  # noqa: BLE001 - a failing method is a result, not a crash
            logger.error("arena: %s failed:\n%s", name, traceback.format_exc())
            row.error = f"{type(error).__name__}: {error}"
            row.metrics = {"seconds": time.perf_counter() - start}
        runs.append(row)
    return runs


def _demo_fields() -> set[str]:
    return {f.name for f in dataclasses.fields(DemoConfig)}


def _slug(name: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in name).strip("-")


# ---- aggregation and reports --------------------------------------------------------------------


def aggregate(runs: list[Run], name: str, key: str) -> tuple[float, float, int]:
    """(mean, sample std, n) of ``key`` over the seeds of the row ``name`` (NaN when none)."""
    values = [r.metrics[key] for r in runs if r.name == name and key in r.metrics and not r.error]
    if not values:
        return math.nan, math.nan, 0
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return statistics.fmean(values), spread, len(values)


def _cell(runs: list[Run], name: str, key: str) -> str:
    mean, std, n = aggregate(runs, name, key)
    if n == 0:
        return "-"
    digits = 0 if key == "seconds" else 3
    text = f"{mean:.{digits}f}"
    return text + (f" ± {std:.{digits}f}" if n > 1 else "")


def verdict(runs: list[Run], name: str) -> str:
    """Whether the row beats the SFT model on held-out prompts, seed by seed.

    A seed counts as better when its win rate exceeds 1/2 by more than two standard errors of a
    win rate over that many samples (0.5 / sqrt(n)) and its mean judge reward beats the SFT
    model's; as worse when the win rate is that far below 1/2.
    """
    errors = [r.error for r in runs if r.name == name and r.error]
    if errors:
        return f"failed ({errors[0][:60]})"
    if name == "SFT":
        return ""
    sft_reward = {r.seed: r.metrics["judge_reward"] for r in runs if r.name == "SFT"}
    outcomes = []
    for r in (r for r in runs if r.name == name):
        margin = 2 * 0.5 / math.sqrt(max(r.metrics["samples"], 1))
        if r.metrics["win_rate"] > 0.5 + margin and r.metrics["judge_reward"] > sft_reward[r.seed]:
            outcomes.append("better")
        elif r.metrics["win_rate"] < 0.5 - margin:
            outcomes.append("worse")
        else:
            outcomes.append("same")
    if all(o == "better" for o in outcomes):
        return "better than SFT"
    if all(o == "worse" for o in outcomes):
        return "WORSE than SFT"
    if len(outcomes) == 1:
        return "NOT better than SFT"
    better, worse = outcomes.count("better"), outcomes.count("worse")
    return f"MIXED: better in {better}, worse in {worse} of {len(outcomes)} seeds"


def markdown_table(runs: list[Run], names: list[str]) -> str:
    """The arena's Markdown table: one row per run name, mean +- std over seeds, a verdict."""
    header = ["run", "reference"] + [label for _, label in METRICS] + ["verdict"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for name in names:
        method = next(r.method for r in runs if r.name == name)
        reference = "-" if method == "sft" else get_method(method).reference
        cells = [name, reference] + [_cell(runs, name, key) for key, _ in METRICS]
        lines.append("| " + " | ".join(cells + [verdict(runs, name)]) + " |")
    return "\n".join(lines)


def claim_sentences(runs: list[Run], config: ArenaConfig) -> list[str]:
    """One sentence per characteristic claim whose runs are present, with its measured numbers."""

    def mean(name: str, key: str) -> float:
        return aggregate(runs, name, key)[0]

    names = {r.name for r in runs if not r.error}
    sentences = []
    if {"dpo", "dpop"} <= names:
        dpo, dpop = mean("dpo", "chosen_logp_change"), mean("dpop", "chosen_logp_change")
        holds = dpo < 0 and dpop > dpo
        sentences.append(
            f"DPOP vs DPO, chosen answers' log-prob change on held-out pairs: {dpop:+.3f} (DPOP) "
            f"vs {dpo:+.3f} (DPO) -- the claim (DPOP keeps it from falling where DPO lets it "
            f"fall) {'holds' if holds else 'does NOT hold'} here."
        )
    eps = config.demo.flip_fraction
    rdpo_noisy = f"rdpo eps={eps:g} (flipped labels)"
    if {"dpo", "rdpo", "dpo (flipped labels)", rdpo_noisy} <= names:
        dpo_drop = mean("dpo", "judge_reward") - mean("dpo (flipped labels)", "judge_reward")
        rdpo_drop = mean("rdpo", "judge_reward") - mean(rdpo_noisy, "judge_reward")
        holds = rdpo_drop < dpo_drop
        sentences.append(
            f"rDPO vs DPO with {eps:.0%} of the training labels flipped: judge reward changes by "
            f"{-rdpo_drop:+.3f} (rDPO, eps={eps:g}) vs {-dpo_drop:+.3f} (DPO) relative to the "
            f"clean runs; flipped-label win rates {mean(rdpo_noisy, 'win_rate'):.3f} vs "
            f"{mean('dpo (flipped labels)', 'win_rate'):.3f} -- the claim (rDPO degrades less) "
            f"{'holds' if holds else 'does NOT hold'} here."
        )
    if {"dpo", "tdpo2"} <= names:
        sft = mean("SFT", "judge_reward")
        dpo_gain, tdpo_gain = mean("dpo", "judge_reward") - sft, mean("tdpo2", "judge_reward") - sft
        dpo_kl, tdpo_kl = mean("dpo", "kl"), mean("tdpo2", "kl")
        holds = tdpo_kl < dpo_kl and tdpo_gain / max(tdpo_kl, 1e-9) > dpo_gain / max(dpo_kl, 1e-9)
        sentences.append(
            f"TDPO2 vs DPO: reward gain {tdpo_gain:+.3f} at KL {tdpo_kl:.3f} (TDPO2) vs "
            f"{dpo_gain:+.3f} at KL {dpo_kl:.3f} (DPO) -- the claim (TDPO2 reaches its reward at "
            f"lower KL, i.e. more reward per unit KL) {'holds' if holds else 'does NOT hold'} here."
        )
    if "simpo" in names:
        sentences.append(
            f"SimPO trains with no reference model at all (reference mode none: nothing loaded or "
            f"pre-computed) and reaches judge reward {mean('simpo', 'judge_reward'):.3f}, win rate "
            f"{mean('simpo', 'win_rate'):.3f} vs SFT ({verdict(runs, 'simpo')})."
        )
    sentences += catalogue_claims(names, mean)
    for name in sorted(names | {r.name for r in runs if r.error}):
        if name != "SFT" and verdict(runs, name) != "better than SFT":
            sentences.append(f"{name}: {verdict(runs, name)}.")
    return sentences


def command_line(config: ArenaConfig) -> str:
    """The ``dpokit arena`` command that reproduces these numbers (paths left out)."""
    parts = ["dpokit arena", "--seeds " + ",".join(str(s) for s in config.seeds)]
    if config.methods:
        parts.append("--methods " + ",".join(config.methods))
    parts += [
        flag
        for flag, on in (("--no-claims", config.claims), ("--no-untuned", config.untuned))
        if not on
    ]
    defaults = DemoConfig()
    for f in dataclasses.fields(DemoConfig):
        value = getattr(config.demo, f.name)
        if f.name not in ("work_dir", "progress", "seed") and value != getattr(defaults, f.name):
            if f.name == "method_args":
                parts += [f"{k}={v}" for k, v in value.items()]
            else:
                parts.append(f"{f.name}={value}")
    return " ".join(parts)


def write_csv(runs: list[Run], path: Path) -> Path:
    """Every run's metrics, one row per run and seed, as CSV at ``path``."""
    keys = sorted({k for r in runs for k in r.metrics})
    with path.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["run", "method", "seed", *keys, "error"])
        for r in runs:
            values = [_csv_value(r.metrics.get(k)) for k in keys]
            writer.writerow([r.name, r.method, r.seed, *values, r.error or ""])
    return path


def _csv_value(value) -> str:
    if value is None:
        return ""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


def write_markdown(config, methods, table, claims, runs, path: Path) -> Path:
    """``docs/arena/arena.md``: settings, the table, the claims checked and the tuning notes."""
    demo = config.demo
    settings = [
        f"- every method: {demo.steps} steps, batch {demo.batch_size} pairs, learning rate "
        f"{demo.learning_rate or DEFAULT_LEARNING_RATE:g} (linear decay, 10% warm-up), from the "
        "SFT model "
        f"({demo.num_layers}-layer {demo.arch}, hidden {demo.hidden_size}, {demo.sft_steps} SFT "
        f"steps); the method's own default hyperparameters unless listed here",
    ]
    for method in methods:
        if METHOD_SETTINGS.get(method):
            given = ", ".join(f"{k}={v}" for k, v in METHOD_SETTINGS[method].items())
            settings.append(f"- {method}: {given} (the `(untuned)` row runs without these)")
    lines = [
        "# Arena: every method from the same SFT model",
        "",
        f"Generated by `{command_line(config)}` (do not edit by hand). Held-out prompts: "
        f"{demo.eval_per_prompt} samples each; win rate counts ties as half; KL = mean over the "
        "policy's samples of logp_pi - logp_SFT; reward accuracy and chosen log-prob change on "
        "held-out SFT-sampled pairs (reference = the SFT model, also for reference-free "
        "methods). Values are mean ± std over seeds when there are several.",
        "",
        table,
        "",
        "## Claims",
        "",
        *[f"- {sentence}" for sentence in claims],
        "",
        "## Settings",
        "",
        *settings,
        "",
        "## Tuning",
        "",
        *[f"- {note}" for note in TUNING_NOTES],
        "",
        "![judge reward vs KL](arena.png)",
        "",
    ]
    path.write_text("\n".join(lines))
    return path


def plot_reward_vs_kl(runs: list[Run], names: list[str], path: Path) -> Path:
    """Mean judge reward against mean KL per row (large markers; small faded ones: each seed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9.5, 5))
    colors = plt.get_cmap("tab10").colors
    markers = "osD^vP*Xh<>"
    for i, name in enumerate(names):
        kl, _, n = aggregate(runs, name, "kl")
        reward, _, _ = aggregate(runs, name, "judge_reward")
        if n == 0:
            continue
        style = dict(color=colors[i % len(colors)], marker=markers[i % len(markers)])
        seeds = [r for r in runs if r.name == name and not r.error]
        ax.scatter(
            [r.metrics["kl"] for r in seeds],
            [r.metrics["judge_reward"] for r in seeds],
            s=12,
            alpha=0.35,
            **style,
        )
        ax.scatter([kl], [reward], s=60, edgecolors="black", linewidths=0.6, label=name, **style)
    ax.set_xscale("symlog", linthresh=1.0)  # SFT sits at KL 0; a divergent run at KL 80
    ax.set_xlabel("KL(pi || pi_SFT) on the policy's samples (nats, symlog)")
    ax.set_ylabel("mean judge reward on held-out prompts")
    ax.set_title("reward vs KL, every method from the same SFT model")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


README_START = "<!-- arena:start (generated by dpokit arena --readme; do not edit) -->"
README_END = "<!-- arena:end -->"


def update_readme(readme: Path, out_dir: Path, table: str, claims: list[str], config) -> Path:
    """Replace the block between README_START and README_END with the table, claims and plot."""
    text = readme.read_text()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no arena block ({README_START} ... {README_END})")
    image = Path(out_dir).resolve().relative_to(readme.resolve().parent) / "arena.png"
    seeds = ",".join(str(s) for s in config.seeds)
    block = "\n".join(
        [
            README_START,
            "",
            f"Seeds {seeds}; every method from the same SFT model; details in "
            f"[{image.parent / 'arena.md'}]({image.parent / 'arena.md'}).",
            "",
            table,
            "",
            *[f"- {sentence}" for sentence in claims],
            "",
            f"![judge reward vs KL]({image})",
            "",
            README_END,
        ]
    )
    head, rest = text.split(README_START, 1)
    tail = rest.split(README_END, 1)[1]
    readme.write_text(head + block + tail)
    return readme
