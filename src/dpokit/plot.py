"""``dpokit plot RUN_DIR``: PNG curves of a run's metrics (loss, margins, accuracies, KL)."""

from __future__ import annotations

from pathlib import Path

from dpokit.metrics import read_metrics

PANELS = {
    "loss": ["loss"],
    "rewards": ["rewards/chosen", "rewards/rejected", "rewards/margins"],
    "accuracies": ["rewards/accuracies"],
    "kl": ["kl/chosen", "kl/rejected", "logratio/chosen", "logratio/rejected"],
    "logps": ["logps/chosen", "logps/rejected"],
}


def plot_run(run_dir: str | Path, out_dir: str | Path | None = None) -> list[Path]:
    """Write one PNG per panel that has data; returns the files written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(run_dir)
    out_dir = Path(out_dir or Path(run_dir) / "plots")
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for panel, names in PANELS.items():
        fig, ax = plt.subplots(figsize=(6, 3.5))
        drawn = False
        for split, style in (("train", "-"), ("eval", "o--")):
            rows = [r for r in records if r.get("split", "train") == split]
            for name in names:
                points = [(r["step"], r[name]) for r in rows if name in r]
                if points:
                    steps, values = zip(*points, strict=True)
                    ax.plot(steps, values, style, label=f"{split} {name}")
                    drawn = True
        if drawn:
            ax.set_xlabel("step")
            ax.set_title(panel)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
            fig.tight_layout()
            path = out_dir / f"{panel}.png"
            fig.savefig(path, dpi=100)
            written.append(path)
        plt.close(fig)
    return written
