"""`dpokit plot`: each figure is titled, its axes labelled with units, the figure named "kl" draws
KL only, and train and eval curves of a metric share one figure."""

from __future__ import annotations

import json

import matplotlib.figure
import pytest

from dpokit.plot import PANELS, XLABEL, plot_run

RECORDS = [
    {"step": 1, "loss": 0.69, "rewards/accuracies": 0.5, "kl/chosen": 0.1, "logratio/chosen": 0.3},
    {"step": 2, "loss": 0.60, "rewards/accuracies": 0.75, "kl/chosen": 0.2, "logratio/chosen": 0.5},
    {"step": 2, "split": "eval", "loss": 0.65, "rewards/accuracies": 0.6},
]


@pytest.fixture()
def figures(tmp_path, monkeypatch):
    """plot_run on RECORDS; returns (files written, {file name: the figure's axes})."""
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in RECORDS))
    saved = {}
    original = matplotlib.figure.Figure.savefig

    def spy(fig, path, *args, **kwargs):
        saved[path.name] = fig.axes[0]
        return original(fig, path, *args, **kwargs)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    return plot_run(tmp_path), saved


def test_every_figure_is_titled_and_labelled_with_units(figures):
    written, axes = figures
    assert sorted(p.name for p in written) == [
        "accuracies.png",
        "kl.png",
        "logratios.png",
        "loss.png",
    ]
    for name, ax in axes.items():
        panel = PANELS[name.removesuffix(".png")]
        assert (ax.get_title(), ax.get_xlabel(), ax.get_ylabel()) == (
            panel.title,
            XLABEL,
            panel.ylabel,
        )
    assert "nats" in axes["kl.png"].get_ylabel() and "(0-1)" in axes["accuracies.png"].get_ylabel()


def test_kl_figure_shows_kl_only_and_train_eval_share_a_figure(figures):
    _, axes = figures
    labels = {name: [line.get_label() for line in ax.get_lines()] for name, ax in axes.items()}
    assert labels["kl.png"] == ["kl/chosen (train)"]  # the log-ratios have their own figure
    assert labels["logratios.png"] == ["logratio/chosen (train)"]
    assert labels["loss.png"] == ["loss (train)", "loss (eval)"]
    train, evaluation = axes["loss.png"].get_lines()
    assert list(train.get_xdata()) == [1, 2] and list(train.get_ydata()) == [0.69, 0.60]
    assert list(evaluation.get_xdata()) == [2] and list(evaluation.get_ydata()) == [0.65]
