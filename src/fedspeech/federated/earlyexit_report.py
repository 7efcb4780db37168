"""Summaries, the side-by-side table and the plots of early-exit runs (method vs baselines),
from their round logs."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

REFERENCE_MODE = "full"


def _merge(records: list[dict], field: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for record in records:
        for key, value in record[field].items():
            totals[key] += value
    return dict(sorted(totals.items()))


def deepest_trained_exit(records: list[dict]) -> int:
    """The deepest exit any client of the run trained (below it, heads kept their init)."""
    return max((c["depth"] for r in records for c in r["clients"]), default=0)


def summarize(records: list[dict]) -> dict:
    """Totals over the rounds and the last round's accuracies of one run."""
    if not records:
        raise ValueError("no rounds to summarize")
    last = records[-1]
    timed = [r["simulated_round_seconds"] for r in records if r.get("simulated_round_seconds") is not None]
    trained = deepest_trained_exit(records)
    return {
        "mode": last["mode"],
        "rounds": len(records),
        "clients_taking_part": len({c for r in records for c in r["sampled"]}),
        "deadline": last.get("deadline"),
        "client_flops": sum(r["client_flops"] for r in records),
        "client_flops_by_device": _merge(records, "client_flops_by_device"),
        "upload_bytes": sum(r["upload_bytes"] for r in records),
        "upload_bytes_by_device": _merge(records, "upload_bytes_by_device"),
        "mean_simulated_round_seconds": sum(timed) / len(timed) if timed else None,
        "accuracy": dict(last["accuracy"]),
        "accuracy_deepest": last["accuracy_deepest"],
        "deepest_trained_exit": trained,
        "accuracy_deepest_trained": last["accuracy"].get(str(trained)),
        "confidence_exit": dict(last["confidence_exit"]),
    }


def _ratio(value: float | None, reference: float | None) -> str:
    if value is None or not reference:
        return ""
    return f" ({value / reference:.2f}×)"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}"


def comparison_table(summaries: Mapping[str, dict], reference: str = REFERENCE_MODE) -> str:
    """A Markdown table, one column per mode; totals also as a ratio to ``reference``."""
    modes = list(summaries)
    ref = summaries.get(reference)

    def totals(field: str, scale: float, fmt: str) -> list[str]:
        return [fmt.format(s[field] / scale if s[field] is not None else float("nan"))
                + _ratio(s[field], ref[field] if ref else None) for s in summaries.values()]

    exits = sorted({int(k) for s in summaries.values() for k in s["accuracy"]})
    rows = [
        ["clients taking part"] + [str(s["clients_taking_part"]) for s in summaries.values()],
        ["client training GFLOPs (total)"] + totals("client_flops", 1e9, "{:,.0f}"),
        ["upload MB (total)"] + totals("upload_bytes", 1e6, "{:,.1f}"),
        ["simulated round s (mean)"] + totals("mean_simulated_round_seconds", 1.0, "{:.3f}"),
    ]
    rows += [[f"accuracy % at exit {e}"] + [_pct(s["accuracy"].get(str(e))) for s in summaries.values()]
             for e in exits]
    rows += [
        ["deepest trained exit"] + [str(s["deepest_trained_exit"]) for s in summaries.values()],
        ["accuracy % at deepest trained exit"] + [_pct(s["accuracy_deepest_trained"]) for s in summaries.values()],
        ["confidence exit: accuracy % / mean exit"]
        + [f"{_pct(s['confidence_exit']['accuracy'])} / {s['confidence_exit']['mean_exit_layer']:.1f}"
           for s in summaries.values()],
    ]
    lines = ["| | " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: str | Path) -> Path:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    _pyplot().close(fig)
    return out


def plot_accuracy_vs_exit(runs: Mapping[str, list[dict]], out: str | Path) -> Path:
    """Last-round accuracy at every exit, one line per mode."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, records in runs.items():
        accuracy = records[-1]["accuracy"]
        exits = sorted(int(k) for k in accuracy)
        trained = [e for e in exits if e <= deepest_trained_exit(records)]
        (line,) = ax.plot(trained, [100 * accuracy[str(e)] for e in trained], marker="o", label=mode)
        untrained = [e for e in exits if e >= trained[-1]] if trained else exits
        if len(untrained) > 1:  # heads no client trained: still at their initial weights
            ax.plot(untrained, [100 * accuracy[str(e)] for e in untrained], ls=":", marker=".", alpha=0.5,
                    color=line.get_color(), label=f"{mode}, untrained exits")
    ax.set_xlabel("exit (Transformer layer)")
    ax.set_ylabel("keyword accuracy %, held-out speakers")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_accuracy_vs_compute(runs: Mapping[str, list[dict]], out: str | Path) -> Path:
    """Accuracy at each run's deepest trained exit vs cumulative client training FLOPs."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, records in runs.items():
        exit_ = str(deepest_trained_exit(records))
        ax.plot([r["cumulative_client_flops"] / 1e12 for r in records],
                [100 * r["accuracy"][exit_] for r in records], marker="o", label=f"{mode} (exit {exit_})")
    ax.set_xlabel("total client training TFLOPs so far")
    ax.set_ylabel("accuracy % at deepest trained exit")
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)
