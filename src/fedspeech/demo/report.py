"""``fedspeech report OUT``: one self-contained HTML page of a demo folder.

Reads what the demo's steps wrote (``demo.json``, the corpus manifest and partition, the
profile and feasibility JSON, the pretraining round logs, ``downstream/compare.json``, the
early-exit runs) and renders one file with every plot embedded as a data URI, so it can be
mailed or archived as is. Each section names the ``fedspeech`` command that reproduces it.
A section whose step has not run says so instead of failing.
"""

from __future__ import annotations

import base64
import html
import json
import platform
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

from fedspeech.demo.pipeline import STATE_FILE

REPORT_FILE = "report.html"
SECTIONS = ("corpus", "feasibility", "profile", "pretraining", "downstream", "early-exit", "round-time", "setup")
PACKAGES = ("fedspeech", "torch", "transformers", "flwr", "numpy", "soundfile", "soxr", "jiwer", "matplotlib")

_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
h1 { margin-bottom: 0.2em; } h2 { border-bottom: 1px solid #ccc; padding-bottom: 0.2em; margin-top: 2em; }
table { border-collapse: collapse; margin: 0.8em 0; font-size: 0.9em; }
th, td { border: 1px solid #ddd; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
code, pre { background: #f6f6f6; padding: 0.1em 0.3em; border-radius: 3px; font-size: 0.85em; }
pre { padding: 0.6em; overflow-x: auto; white-space: pre-wrap; }
img { max-width: 100%; border: 1px solid #eee; margin: 0.5em 0; }
.missing { color: #a33; } .note { color: #555; font-size: 0.9em; }
"""
# Marks the page once every image decoded, so a headless browser check can read it off the DOM.
_IMAGE_CHECK = """
window.addEventListener('load', function () {
  var images = Array.prototype.slice.call(document.images);
  var broken = images.filter(function (i) { return !(i.complete && i.naturalWidth > 0); });
  document.body.setAttribute('data-images', images.length + ' loaded, ' + broken.length + ' broken');
});
"""


def _esc(value: Any) -> str:
    return html.escape(str(value))


def _table(headers: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    head = "".join(f"<th>{_esc(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{_esc(c)}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"


def _image(path: Path, alt: str) -> str:
    if not path.is_file():
        return f'<p class="missing">plot not found: {_esc(path.name)}</p>'
    data = base64.b64encode(path.read_bytes()).decode("ascii")
    return f'<img alt="{_esc(alt)}" src="data:image/png;base64,{data}">'


def _fmt(value: Any, spec: str = ".3f") -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return format(value, spec)
    return str(value)


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text()) if path.is_file() else None


def _markdown_table(text: str) -> str:
    """A Markdown pipe table (as ``early-exit`` writes its summary) as an HTML table."""
    lines = [line.strip() for line in text.splitlines() if line.strip().startswith("|")]
    if len(lines) < 2:
        return f"<pre>{_esc(text)}</pre>"
    cells = [[c.strip() for c in line.strip("|").split("|")] for line in lines]
    return _table(cells[0], cells[2:])


class _Page:
    """Sections in order, each with the command that reproduces it."""

    def __init__(self, state: dict[str, Any]):
        self.state, self.parts = state, list[str]()

    def section(self, anchor: str, title: str, step_names: Sequence[str], body: str) -> None:
        commands = [self.state["steps"][s]["command"] for s in step_names if s in self.state.get("steps", {})]
        reproduce = "".join(f"<pre>{_esc(c)}</pre>" for c in commands)
        note = f'<p class="note">Reproduce this section alone:</p>{reproduce}' if commands else ""
        self.parts.append(f'<section id="{anchor}"><h2>{_esc(title)}</h2>{body}{note}</section>')


def write_report(out: Path) -> Path:
    """Render ``OUT/report.html`` from the demo folder ``out``; returns its path."""
    out = Path(out)
    state = _read_json(out / STATE_FILE)
    if state is None:
        raise FileNotFoundError(f"{out / STATE_FILE}: not found; run `fedspeech demo --out {out}` first")
    config = state["config"]
    page = _Page(state)
    page.section("corpus", "Corpus and clients", ["corpus", "partition"], _corpus_section(out, config))
    page.section("feasibility", "Device feasibility", ["feasibility"], _feasibility_section(out, config))
    page.section("profile", "Per-layer memory and compute", ["profile"], _profile_section(out))
    rule_steps = [f"pretrain-{r}" for r in config["rules"]] + ["pretrain-centralised"]
    page.section("pretraining", "Federated SSL pretraining", rule_steps, _pretraining_section(out, config))
    page.section("downstream", "Downstream: keyword spotting and ASR", ["downstream"], _downstream_section(out))
    page.section("early-exit", "Early exits on the heterogeneous fleet", ["early-exit"], _early_exit_section(out))
    page.section("round-time", "Simulated round time per device", ["early-exit"], _round_time_section(out))
    page.section("setup", "Configuration, seeds, packages and step times", [], _setup_section(state))
    generated = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    document = (
        '<!DOCTYPE html><html lang="en"><head><meta charset="utf-8">'
        f"<title>fedspeech demo report</title><style>{_STYLE}</style><script>{_IMAGE_CHECK}</script></head><body>"
        f"<h1>fedspeech demo report</h1><p class='note'>{_esc(out)} &middot; generated {generated}</p>"
        + "".join(page.parts)
        + "</body></html>\n"
    )
    path = out / REPORT_FILE
    path.write_text(document, encoding="utf-8")
    return path


# --------------------------------------------------------------------------- sections


def _corpus_section(out: Path, config: dict[str, Any]) -> str:
    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import Partition, client_summary

    manifest, partition = out / "corpus" / "manifest.tsv", out / f"partition_speaker_{config['clients']}.json"
    if not manifest.is_file() or not partition.is_file():
        return '<p class="missing">corpus or partition not built yet</p>'
    utterances = read_manifest(manifest)
    splits: dict[str, list] = {}
    for u in utterances:
        splits.setdefault(u.split, []).append(u)
    split_rows = [
        [name, len(us), len({u.speaker for u in us}), f"{sum(u.duration for u in us) / 60:.1f}"]
        for name, us in sorted(splits.items())
    ]
    clients = client_summary(Partition.load(partition), utterances)
    client_rows = [
        [
            c["client"],
            c["utterances"],
            c["speakers"],
            f"{c['seconds'] / 60:.1f}",
            ", ".join(f"{k} {v}" for k, v in list(c["labels"].items())[:3]),
        ]  # fmt: skip
        for c in clients
    ]
    return (
        f"<p>Built-in espeak-ng corpus: {len(utterances)} utterances of "
        f"{len({u.speaker for u in utterances})} speakers (keywords and sentences). Training speakers are "
        f"split into {len(clients)} speaker-disjoint clients; dev and test speakers are held out.</p>"
        + _table(["split", "utterances", "speakers", "minutes"], split_rows)
        + _table(["client", "utterances", "speakers", "minutes", "top labels"], client_rows)
    )


def _feasibility_section(out: Path, config: dict[str, Any]) -> str:
    result = _read_json(out / "feasibility" / f"{config['feasibility_model']}.json")
    if result is None:
        return '<p class="missing">feasibility not run yet</p>'
    workload = result["workload"]
    rows = []
    for d in result["devices"]:
        fl = d.get("fl") or {}
        trend = d.get("trend") or {}
        rows.append(
            [
                d["name"],
                d["device_class"],
                _fmt(d["fits"]),
                _fmt(d.get("peak_bytes", 0) / 2**30, ".2f"),
                _fmt(None if d.get("usable_bytes") is None else d["usable_bytes"] / 2**30, ".2f"),
                _fmt(d.get("seconds_per_batch"), ".2f"),
                _fmt(d.get("max_seconds_that_fit"), ".1f"),
                _fmt(fl.get("total_hours"), ".1f") if fl else "-",
                _fmt(trend.get("first_year_reaching_target"), "d") if trend else "-",
            ]
        )
    fleet, schedule = result.get("fleet"), result.get("fl_schedule") or {}
    fleet_text = ""
    if fleet:
        clock = fleet.get("wallclock") or {}
        unable = ", ".join(f"{k} x{v}" for k, v in fleet["unable_to_train"].items()) or "none"
        fleet_text = (
            f"<p>Mixed fleet of {fleet['clients']} clients, {_esc(schedule.get('rounds'))} rounds of "
            f"{_esc(schedule.get('local_epochs'))} local epoch(s) over {_esc(schedule.get('utterances_per_client'))} "
            f"utterances per client: {_fmt(clock.get('round_seconds'), '.0f')} s per round, "
            f"{_fmt(clock.get('total_hours'), '.1f')} h in all; clients unable to train: {_esc(unable)} "
            f"({_esc(fleet.get('note', ''))}).</p>"
        )
    return (
        f"<p>wav2vec 2.0 {_esc(workload.get('model'))}, batch {_esc(workload.get('batch'))}, "
        f"{_esc(workload.get('seconds'))} s utterances, {_esc(workload.get('precision'))}: predicted per device "
        "from the measured FLOPs and memory and the catalogue (docs/profiling.md).</p>"
        + _table(
            [
                "device",
                "class",
                "fits",
                "peak GiB",
                "usable GiB",
                "s / batch",
                "longest input s",
                "FL schedule h",
                "feasible year (trend)",
            ],  # fmt: skip
            rows,
        )
        + fleet_text
    )


def _profile_section(out: Path) -> str:
    report = _read_json(out / "profile" / "tiny.json")
    if report is None:
        return '<p class="missing">profile not run yet</p>'
    modules = report["modules"]
    rows = [[name, f"{m['params']:,}", _fmt(m.get("gflops"), ".3f")] for name, m in modules.items()]
    step = report["train_step"]
    plots = "".join(_image(p, p.stem) for p in sorted((out / "profile").glob("*.png")))
    return (
        _table(["module", "parameters", "GFLOPs (inference)"], rows)
        + f"<p>Measured training step: {_fmt(step.get('seconds'), '.3f')} s, activations held for backward "
        f"{_fmt(step.get('activation_bytes', 0) / 2**20, '.1f')} MiB, peak "
        f"{_fmt(step.get('peak_bytes', 0) / 2**20, '.1f')} MiB.</p>" + plots
    )


def _pretraining_section(out: Path, config: dict[str, Any]) -> str:
    from fedspeech.federated import roundlog
    from fedspeech.federated.plots import plot_validation_curves

    names = [*config["rules"], "centralised"]
    runs = {n: out / "pretrain" / n for n in names if roundlog.log_path(out / "pretrain" / n).exists()}
    if not runs:
        return '<p class="missing">pretraining not run yet</p>'
    plot = plot_validation_curves(list(runs.values()), out / "pretrain" / "val_loss.png", labels=list(runs))
    rows = []
    for name, folder in runs.items():
        records = roundlog.read_rounds(folder)
        losses = " ".join(_fmt(r.get("val_loss"), ".2f") for r in records)
        rows.append(
            [
                name,
                len(records),
                losses,
                _fmt(records[-1].get("val_loss"), ".3f"),
                f"{sum(r.get('round_seconds', 0.0) for r in records) / 60:.1f}",
            ]
        )
    return (
        f"<p>Tiny wav2vec 2.0, {config['clients']} speaker clients (all every round), {config['rounds']} rounds of "
        f"{config['local_epochs']} local epochs at client batch 1; the centralised run sees as many examples per "
        f"round on the pooled data, at batch {config.get('centralised_batch', 1)}. Validation contrastive loss "
        "on held-out speakers (chance ln 101 = 4.615; a loss near 0.1 means the codebook collapsed).</p>"
        + _table(["run", "rounds", "val loss by round", "final", "minutes"], rows)
        + _image(plot, "validation loss per round")
    )


def _downstream_section(out: Path) -> str:
    rows = _read_json(out / "downstream" / "compare.json")
    if rows is None:
        return '<p class="missing">downstream comparison not run yet</p>'
    columns = list(dict.fromkeys((r["task"], r["metric"]) for r in rows))
    scores = {(r["backbone"], r["task"]): r["score"] for r in rows}
    better = {"accuracy": "higher is better", "cer": "lower is better", "wer": "lower is better"}
    table = _table(
        ["backbone"] + [f"{task} {metric} ({better.get(metric, '')})" for task, metric in columns],
        [
            [name] + [_fmt(scores.get((name, task)), ".3f") for task, _ in columns]
            for name in dict.fromkeys(r["backbone"] for r in rows)
        ],
    )
    return (
        "<p>Each backbone fine-tuned with the same recipe on the labelled speakers; keyword accuracy "
        "(higher is better) and character error rate (lower is better) on the test speakers.</p>"
        + table
        + _image(out / "downstream" / "compare.png", "downstream comparison")
    )


def _early_exit_section(out: Path) -> str:
    summary = out / "early-exit" / "summary.md"
    if not summary.is_file():
        return '<p class="missing">early-exit fine-tuning not run yet</p>'
    plots = "".join(_image(p, p.stem) for p in sorted((out / "early-exit").glob("*_vs_*.png")))
    return (
        "<p>Each client trains only the depth its device affords within the round deadline and uploads only "
        "that; the server aggregates each layer over the clients that trained it (adaptive), against full-depth "
        "FedAvg, excluding weak clients, and everyone at the smallest depth.</p>"
        + _markdown_table(summary.read_text())
        + plots
    )


def _round_time_section(out: Path) -> str:
    plan = _read_json(out / "early-exit" / "adaptive" / "plan.json")
    if plan is None:
        return '<p class="missing">no adaptive early-exit plan yet</p>'
    rows = []
    for c in plan["clients"]:
        chosen: dict[str, Any] = next((x for x in c["candidates"] if x.get("depth") == c["training_depth"]), {})
        rows.append(
            [
                c["client"],
                c["device"],
                c["training_depth"],
                _fmt(chosen.get("seconds_per_round"), ".1f"),
                _fmt(c.get("full_depth_seconds"), ".1f"),
                _fmt(c.get("full_depth_fits_memory")),
            ]
        )
    return (
        f"<p>Round deadline {_fmt(plan.get('deadline'), '.1f')} s. Predicted seconds per round of each client's "
        "device (catalogue model) at the depth it trains and at full depth.</p>"
        + _table(
            [
                "client",
                "device",
                "depth trained",
                "round s at that depth",
                "round s at full depth",
                "full depth fits memory",
            ],
            rows,
        )  # fmt: skip
    )


def _setup_section(state: dict[str, Any]) -> str:
    config_rows = [[k, json.dumps(v) if isinstance(v, list | dict) else v] for k, v in state["config"].items()]
    step_rows = [
        [name, s.get("status", "-"), _fmt(s.get("seconds"), ".1f"), s["command"]] for name, s in state["steps"].items()
    ]
    versions = []
    for package in PACKAGES:
        try:
            versions.append([package, metadata.version(package)])
        except metadata.PackageNotFoundError:
            versions.append([package, "not installed"])
    versions += [["python", sys.version.split()[0]], ["platform", platform.platform()]]
    total = sum(s.get("seconds") or 0.0 for s in state["steps"].values())
    return (
        f"<p>Seed {_esc(state['config']['seed'])} everywhere; runner {_esc(state['config']['runner'])}. "
        f"{_esc(state.get('jobs', 1))} steps at a time; step seconds sum to {total / 60:.1f} min "
        "(skipped steps show their earlier time).</p>"
        + _table(["setting", "value"], config_rows)
        + _table(["step", "status", "seconds", "command"], step_rows)
        + _table(["package", "version"], versions)
    )
