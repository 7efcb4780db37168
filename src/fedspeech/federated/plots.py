"""Plots of federated runs from their round logs (matplotlib, no display needed)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from fedspeech.federated.roundlog import read_rounds
from fedspeech.figures import save_figure


def plot_validation_curves(runs: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None) -> Path:
    """Validation loss vs round, one line per run (e.g. one per aggregation rule)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = list(labels) if labels else [Path(r).name for r in runs]
    if len(labels) != len(runs):
        raise ValueError(f"--labels: {len(labels)} labels for {len(runs)} runs")
    fig, ax = plt.subplots(figsize=(6, 4))
    for run, label in zip(runs, labels):
        rows = [r for r in read_rounds(run) if r.get("val_loss") is not None]
        ax.plot([r["round"] for r in rows], [r["val_loss"] for r in rows], marker="o", label=label)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("round")
    ax.set_ylabel("validation loss (held-out speakers)")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, out)
