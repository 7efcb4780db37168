"""Saving matplotlib figures the same way everywhere (headless, folders made, memory freed)."""

from __future__ import annotations

from pathlib import Path


def save_figure(fig, out: str | Path, dpi: int = 120) -> Path:
    """Lay out, write and close ``fig``; closing matters in long runs that plot every round."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=dpi)
    plt.close(fig)
    return out
