"""``dpokit plot RUN_DIR``: PNG curves of a run's metrics, one figure per quantity.

Every figure has a title saying what it shows, labelled axes with units, and the train and eval
curves of the same metric on the same axes (solid: train; dashed with markers: eval).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from dpokit.metrics import read_metrics


@dataclass(frozen=True)
class Panel:
    """One figure: its title, y-axis label (with units) and the metrics it draws."""

    title: str
    ylabel: str
    metrics: tuple[str, ...]


# file name -> figure. Log-probs are summed over completion tokens, in nats.
PANELS = {
    "loss": Panel("Training objective", "loss (per example, mean over batch)", ("loss",)),
    "rewards": Panel(
        "Implicit rewards beta * (logp - ref)",
        "reward (nats x beta)",
        (
            "rewards/chosen",
            "rewards/rejected",
            "rewards/margins",
            "rewards/desirable",
            "rewards/undesirable",
        ),
    ),
    "accuracies": Panel(
        "Reward accuracy (chosen reward > rejected reward)",
        "share of pairs (0-1)",
        ("rewards/accuracies",),
    ),
    "kl": Panel(
        "KL divergence to the reference",
        "KL (nats per sequence)",
        ("kl/chosen", "kl/rejected", "kl/data", "kl_baseline", "kl/mismatched"),
    ),
    "logratios": Panel(
        "Log-ratio logp - ref of each answer",
        "log-ratio (nats per sequence)",
        ("logratio/chosen", "logratio/rejected"),
    ),
    "logps": Panel(
        "Policy log-probabilities of the answers",
        "log-prob (nats per sequence)",
        ("logps/chosen", "logps/rejected", "logps/desirable", "logps/undesirable"),
    ),
    "nll": Panel("NLL of the chosen answer", "NLL (nats per token)", ("nll_loss",)),
    "grad_norm": Panel("Gradient norm before clipping", "L2 norm", ("grad_norm",)),
    "lr": Panel("Learning rate", "learning rate", ("lr",)),
}
XLABEL = "optimizer step"


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per :data:`PANELS` entry that has data (``OUT/<name>.png``; default OUT:
    ``RUN_DIR/plots``); returns the files written. Raises ``OSError`` when ``metrics.jsonl``
    cannot be read."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = Path(out_dir or Path(run_dir) / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for name, panel in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        if _draw(ax, records, panel.metrics):
            ax.set_xlabel(XLABEL)
            ax.set_ylabel(panel.ylabel)
            ax.set_title(panel.title)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{name}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written


def _draw(ax, records: list[dict], metrics: tuple[str, ...]) -> bool:
    """Plot each metric's train and eval curves on ``ax``; True if anything was drawn."""
    drawn = False
    for metric in metrics:
        for split, style in (("train", "-"), ("eval", "o--")):
            points = [
                (r["step"], r[metric])
                for r in records
                if r.get("split", "train") == split and metric in r
            ]
            if points:
                steps, values = zip(*points, strict=True)
                ax.plot(steps, values, style, label=f"{metric} ({split})")
                drawn = True
    return drawn
