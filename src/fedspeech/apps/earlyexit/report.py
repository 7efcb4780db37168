"""Summaries, the side-by-side table and the plots of early-exit runs (method vs baselines),
from their round logs.

The score per exit is the task's: keyword accuracy (kws, higher is better) or word error
rate (asr, lower is better; character error rate alongside). Every table row and plot axis
names its score and, for error rates, says that lower is better.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Mapping
from pathlib import Path

REFERENCE_MODE = "full"
# task -> (headline score of the plots, every score of the table); round logs without a
# task are keyword spotting (written before asr existed).
SCORES = {"kws": ("accuracy", ("accuracy",)), "asr": ("wer", ("wer", "cer"))}
SCORE_LABELS = {"accuracy": "accuracy", "wer": "WER", "cer": "CER"}


def run_task(records: list[dict]) -> str:
    return records[-1].get("task", "kws") if records else "kws"


def _lower_is_better(score: str) -> bool:
    return score != "accuracy"


def score_axis_label(score: str, plot: str) -> str:
    """The y label of the ``exit`` or ``compute`` plot; error rates say that lower is better."""
    if score == "accuracy":
        return "keyword accuracy %, held-out speakers" if plot == "exit" else "accuracy % at deepest trained exit"
    where = "held-out speakers" if plot == "exit" else "at deepest trained exit"
    return f"{SCORE_LABELS[score]} %, {where} (lower is better)"


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
    """Totals over the rounds and the last round's scores (accuracy, or WER and CER) of one run."""
    if not records:
        raise ValueError("no rounds to summarize")
    last = records[-1]
    timed = [r["simulated_round_seconds"] for r in records if r.get("simulated_round_seconds") is not None]
    trained = deepest_trained_exit(records)
    task = run_task(records)
    summary = {
        "mode": last["mode"],
        "rounds": len(records),
        "clients_taking_part": len({c for r in records for c in r["sampled"]}),
        "deadline": last.get("deadline"),
        "client_flops": sum(r["client_flops"] for r in records),
        "client_flops_by_device": _merge(records, "client_flops_by_device"),
        "upload_bytes": sum(r["upload_bytes"] for r in records),
        "upload_bytes_by_device": _merge(records, "upload_bytes_by_device"),
        "mean_simulated_round_seconds": sum(timed) / len(timed) if timed else None,
    }
    for score in SCORES[task][1]:
        summary[score] = dict(last[score])
        summary[f"{score}_deepest"] = last[f"{score}_deepest"]
    summary["deepest_trained_exit"] = trained
    for score in SCORES[task][1]:
        summary[f"{score}_deepest_trained"] = last[score].get(str(trained))
    summary["confidence_exit"] = dict(last["confidence_exit"])
    if task != "kws":
        summary["task"] = task
    return summary


def summary_task(summaries: Mapping[str, dict]) -> str:
    """The one task of the summaries (a table compares runs of one task only)."""
    tasks = {s.get("task", "kws") for s in summaries.values()}
    if len(tasks) != 1:
        raise ValueError(f"cannot compare runs of different tasks in one table: {sorted(tasks)}")
    return tasks.pop()


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
        return [
            fmt.format(s[field] / scale if s[field] is not None else float("nan"))
            + _ratio(s[field], ref[field] if ref else None)
            for s in summaries.values()
        ]

    task = summary_task(summaries)
    headline, scores = SCORES[task]
    exits = sorted({int(k) for s in summaries.values() for k in s[headline]})
    rows = [
        ["clients taking part"] + [str(s["clients_taking_part"]) for s in summaries.values()],
        ["client training GFLOPs (total)"] + totals("client_flops", 1e9, "{:,.0f}"),
        ["upload MB (total)"] + totals("upload_bytes", 1e6, "{:,.1f}"),
        ["simulated round s (mean)"] + totals("mean_simulated_round_seconds", 1.0, "{:.3f}"),
    ]
    rows += [
        [f"{SCORE_LABELS[score]} % at exit {e}"] + [_pct(s[score].get(str(e))) for s in summaries.values()]
        for score in scores
        for e in exits
    ]
    rows.append(["deepest trained exit"] + [str(s["deepest_trained_exit"]) for s in summaries.values()])
    rows += [
        [f"{SCORE_LABELS[score]} % at deepest trained exit"]
        + [_pct(s[f"{score}_deepest_trained"]) for s in summaries.values()]
        for score in scores
    ]
    rows.append(
        [f"confidence exit: {SCORE_LABELS[headline]} % / mean exit"]
        + [
            f"{_pct(s['confidence_exit'][headline])} / {s['confidence_exit']['mean_exit_layer']:.1f}"
            for s in summaries.values()
        ]
    )
    corner = f" {' / '.join(SCORE_LABELS[s] for s in scores)}: lower is better " if _lower_is_better(headline) else " "
    lines = [f"|{corner}| " + " | ".join(modes) + " |", "|---|" + "---:|" * len(modes)]
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


def _runs_score(runs: Mapping[str, list[dict]]) -> str:
    tasks = {run_task(records) for records in runs.values()}
    if len(tasks) != 1:
        raise ValueError(f"cannot plot runs of different tasks together: {sorted(tasks)}")
    return SCORES[tasks.pop()][0]


def plot_file_stem(task: str) -> str:
    """``accuracy`` (kws) or ``wer`` (asr): plots are named ``<stem>_vs_exit.png`` and ``<stem>_vs_compute.png``."""
    return SCORES[task][0]


def plot_accuracy_vs_exit(runs: Mapping[str, list[dict]], out: str | Path) -> Path:
    """Last-round score at every exit, one line per mode: accuracy (kws) or WER (asr, lower
    is better)."""
    plt = _pyplot()
    score = _runs_score(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, records in runs.items():
        scores = records[-1][score]
        exits = sorted(int(k) for k in scores)
        trained = [e for e in exits if e <= deepest_trained_exit(records)]
        (line,) = ax.plot(trained, [100 * scores[str(e)] for e in trained], marker="o", label=mode)
        untrained = [e for e in exits if e >= trained[-1]] if trained else exits
        if len(untrained) > 1:  # heads no client trained: still at their initial weights
            ax.plot(
                untrained,
                [100 * scores[str(e)] for e in untrained],
                ls=":",
                marker=".",
                alpha=0.5,
                color=line.get_color(),
                label=f"{mode}, untrained exits",
            )
    ax.set_xlabel("exit (Transformer layer)")
    ax.set_ylabel(score_axis_label(score, "exit"))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)


def plot_accuracy_vs_compute(runs: Mapping[str, list[dict]], out: str | Path) -> Path:
    """Score (accuracy, or WER for asr) at each run's deepest trained exit vs cumulative
    client training FLOPs."""
    plt = _pyplot()
    score = _runs_score(runs)
    fig, ax = plt.subplots(figsize=(6, 4))
    for mode, records in runs.items():
        exit_ = str(deepest_trained_exit(records))
        ax.plot(
            [r["cumulative_client_flops"] / 1e12 for r in records],
            [100 * r[score][exit_] for r in records],
            marker="o",
            label=f"{mode} (exit {exit_})",
        )
    ax.set_xlabel("total client training TFLOPs so far")
    ax.set_ylabel(score_axis_label(score, "compute"))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, out)
