"""PNG plots of a profile report (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

GROUP_COLOURS = {
    "cnn_encoder": "tab:orange",
    "transformer": "tab:blue",
    "quantization": "tab:green",
    "other": "tab:gray",
}
MIB = 2**20


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(report: dict[str, Any], folder: Path, label: str) -> list[Path]:
    """Write every plot the report has data for; return the files written."""
    folder.mkdir(parents=True, exist_ok=True)
    plt = _pyplot()
    written = [_layers(plt, report, folder / f"{label}_layers.png")]
    if report.get("sweep"):
        written.append(_sweep(plt, report, folder / f"{label}_sweep.png"))
    if report.get("precision_comparison"):
        written.append(
            _bars(plt, report["precision_comparison"], "precision", folder / f"{label}_precision.png", report)
        )
    if report.get("savers"):
        written.append(_bars(plt, report["savers"], "label", folder / f"{label}_savers.png", report))
    return written


def _title(report: dict[str, Any]) -> str:
    c, step = report["config"], report["train_step"]
    savers = ", ".join(s for s in step["savers"] if not s.startswith(("crop", "amp")))
    return f"{c['model']}, batch {c['batch']}, {step['precision']}" + (f", {savers}" if savers else "")


def _layers(plt, report: dict[str, Any], path: Path) -> Path:
    other = report["unattributed"]
    rows = report["layers"] + [{"name": "(loss, glue)", "group": "other", **other}]
    names = [r["name"] for r in rows]
    colours = [GROUP_COLOURS.get(r["group"], "tab:gray") for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(8, 0.35 * len(rows)), 7), sharex=True)
    top.bar(names, [r["activation_bytes"] / MIB for r in rows], color=colours)
    top.set_ylabel("activations kept for backward (MiB)")
    bottom.bar(names, [r["train_gflops"] for r in rows], color=colours)
    bottom.set_ylabel("train GFLOPs (fwd + bwd)")
    bottom.tick_params(axis="x", rotation=90)
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in GROUP_COLOURS.values()]
    top.legend(handles, list(GROUP_COLOURS), fontsize=8)
    top.set_title(f"Per-layer memory and compute: {_title(report)}, {report['train_step']['audio_seconds']:g} s")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _sweep(plt, report: dict[str, Any], path: Path) -> Path:
    rows = report["sweep"]
    seconds = [r["audio_seconds"] for r in rows]
    fig, (memory, flops) = plt.subplots(1, 2, figsize=(11, 4))
    memory.plot(seconds, [r["peak_bytes"] / MIB for r in rows], "o-", label="peak (step)")
    memory.plot(seconds, [r["activation_bytes"] / MIB for r in rows], "s-", label="activations")
    memory.set_xlabel("input length (s)")
    memory.set_ylabel("MiB")
    memory.set_title("Memory vs. input length")
    memory.legend()
    flops.plot(
        seconds, [r["train_gflops"] for r in rows], "o-", label=f"train step (batch {report['config']['batch']})"
    )
    flops.plot(seconds, [r["inference_gflops"] for r in rows], "s-", label="inference (batch 1)")
    flops.set_xlabel("input length (s)")
    flops.set_ylabel("GFLOPs")
    flops.set_title("FLOPs vs. input length")
    flops.legend()
    fig.suptitle(_title(report))
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _bars(plt, rows: list[dict[str, Any]], key: str, path: Path, report: dict[str, Any]) -> Path:
    labels = [r[key] for r in rows][::-1]  # first row on top
    metrics = [
        ("peak MiB", [r["peak_bytes"] / MIB for r in rows][::-1], "{:,.0f}"),
        ("activations MiB", [r["activation_bytes"] / MIB for r in rows][::-1], "{:,.0f}"),
        ("train GFLOPs", [r["train_gflops"] for r in rows][::-1], "{:,.1f}"),
        ("s/step (this machine)", [r["seconds"] or 0.0 for r in rows][::-1], "{:,.2f}"),
    ]
    fig, axes = plt.subplots(1, len(metrics), figsize=(14, 1.2 + 0.45 * len(rows)), sharey=True)
    for axis, (title, values, fmt) in zip(axes, metrics):
        bars = axis.barh(labels, values, color="tab:blue")
        axis.bar_label(bars, [fmt.format(v) for v in values], fontsize=7, padding=2)
        axis.set_title(title, fontsize=9)
        axis.margins(x=0.3)
        axis.tick_params(axis="x", labelsize=7)
    fig.suptitle(
        f"{'Precision' if key == 'precision' else 'Memory savers'}: {report['config']['model']}, "
        f"batch {report['config']['batch']}, {report['config']['seconds']:g} s"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
