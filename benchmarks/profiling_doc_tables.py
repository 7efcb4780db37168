"""Markdown tables for docs/profiling.md from the JSON files of benchmarks/profiling_docs.sh.

    .venv/bin/python benchmarks/profiling_doc_tables.py [runs/profiling_docs]

Prints one table per section (modules, conventions, sweep, precision, savers, catalogue); nothing is
typed in by hand.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

MIB = 2**20


def table(headers: list[str], rows: list[list[str]]) -> str:
    right = ["---"] + ["---:"] * (len(headers) - 1)
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(right) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def sec(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def modules(folder: Path) -> str:
    reports = {name: json.loads((folder / f"{name}.json").read_text()) for name in ("tiny", "base", "large")}
    headers = ["module"] + [f"{n} params" for n in reports] + [f"{n} GFLOPs" for n in reports]
    rows = []
    for module in reports["base"]["modules"]:
        rows.append(
            [f"`{module}`"]
            + [f"{r['modules'][module]['params']:,}" for r in reports.values()]
            + [f"{r['modules'][module]['gflops']:.3f}" for r in reports.values()]
        )
    steps = (
        ["train step (batch 1, 5 s): train GFLOPs / activations MiB / peak MiB"]
        + [""] * 3
        + [
            f"{r['train_step']['train_gflops']:.1f} / {r['train_step']['activation_bytes'] / MIB:,.0f} / "
            f"{r['train_step']['peak_bytes'] / MIB:,.0f}"
            for r in reports.values()
        ]
    )
    return table(headers, rows + [steps])


def conventions(folder: Path) -> str:
    """base and large at 5.5 s under both counting conventions, side by side."""
    runs = [(model, convention) for model in ("base", "large") for convention in ("complete", "gao2022")]
    reports = {run: json.loads((folder / f"conv_{run[0]}_{run[1]}.json").read_text()) for run in runs}
    headers = ["module"] + [f"{m} {c} params" for m, c in runs] + [f"{m} {c} GFLOPs" for m, c in runs]

    def cell(run: tuple[str, str], module: str, key: str) -> str:
        entry = reports[run]["modules"].get(module)
        if entry is None:
            return "(in quantization)"
        return f"{entry['params']:,}" if key == "params" else f"{entry['gflops']:.3f}"

    modules = ("cnn_encoder", "transformer", "quantization", "projections", "other", "total")
    rows = [
        [f"`{module}`"] + [cell(run, module, "params") for run in runs] + [cell(run, module, "gflops") for run in runs]
        for module in modules
    ]
    return table(headers, rows)


def sweep(folder: Path) -> str:
    report = json.loads((folder / "base.json").read_text())
    return table(
        ["input s", "inference GFLOPs", "train GFLOPs", "activations MiB", "peak MiB", "CPU s/step", "wall s/step"],
        [
            [
                f"{r['audio_seconds']:g}",
                f"{r['inference_gflops']:.1f}",
                f"{r['train_gflops']:.1f}",
                f"{r['activation_bytes'] / MIB:,.1f}",
                f"{r['peak_bytes'] / MIB:,.1f}",
                sec(r.get("cpu_seconds")),
                sec(r["seconds"]),
            ]
            for r in report["sweep"]
        ],
    )


def precision(folder: Path) -> str:
    report = json.loads((folder / "base_prec.json").read_text())
    return table(
        ["precision", "activations MiB", "peak MiB", "train GFLOPs", "CPU s/step", "wall s/step"],
        [
            [
                r["precision"],
                f"{r['activation_bytes'] / MIB:,.1f}",
                f"{r['peak_bytes'] / MIB:,.1f}",
                f"{r['train_gflops']:.1f}",
                sec(r.get("cpu_seconds")),
                sec(r["seconds"]),
            ]
            for r in report["precision_comparison"]
        ],
    )


def savers(folder: Path) -> str:
    report = json.loads((folder / "base_savers.json").read_text())
    rows = []
    for r in report["savers"]:
        cost = r.get("cpu_time_cost_percent")
        rows.append(
            [
                r["label"],
                f"{r['activation_bytes'] / MIB:,.1f}",
                f"{r['peak_bytes'] / MIB:,.1f}",
                f"{r['peak_saved_bytes'] / MIB:,.1f}",
                f"{r['train_gflops']:.1f}",
                "-" if cost is None else f"{cost:+.0f} %",
            ]
        )
    return table(["savers", "activations MiB", "peak MiB", "peak saved MiB", "train GFLOPs", "CPU time cost"], rows)


def catalogue() -> str:
    from fedspeech.profiling.catalogue import load_catalogue

    rows = []
    for d in load_catalogue(include_user=False).values():
        cal = d.calibration or {}
        rows.append(
            [
                d.name,
                d.device_class,
                "this machine"
                if d.id == "local-cpu"
                else "-"
                if d.memory_bytes is None
                else f"{d.memory_bytes / 2**30:g}",
                f"{d.headroom:g}",
                sec(cal.get("seconds_per_batch")) if cal else "-",
                "-" if d.throughput_flops is None else f"{d.throughput_flops / 1e9:,.0f}",
                ", ".join(d.mixed_precision) or "-",
            ]
        )
    return table(
        ["device", "class", "memory GiB", "headroom", "published s/batch", "throughput GFLOP/s", "mixed precision"],
        rows,
    )


def main() -> None:
    folder = Path(sys.argv[1] if len(sys.argv) > 1 else "runs/profiling_docs")
    for name, make in (
        ("MODULES", lambda: modules(folder)),
        ("CONVENTIONS", lambda: conventions(folder)),
        ("SWEEP", lambda: sweep(folder)),
        ("PRECISION", lambda: precision(folder)),
        ("SAVERS", lambda: savers(folder)),
        ("CATALOGUE", catalogue),
    ):
        try:
            print(f"<!-- {name} -->\n{make()}\n")
        except FileNotFoundError as missing:
            print(f"<!-- {name}: missing {missing.filename} -->\n")


if __name__ == "__main__":
    main()
