"""``fedspeech profile``: run the measurements and shape them into the JSON report and tables.

JSON schema (``fedspeech.profile/1``), all FLOPs in GFLOPs (2 FLOPs per multiply-add):

- ``convention``: ``name`` and ``description`` of the counting convention ``modules`` and the
  sweep's ``inference_gflops`` follow (``complete`` or ``gao2022``, fedspeech.models.accounting);
  the per-layer and train-step figures are always complete counts.
- ``modules``: ``cnn_encoder``, ``transformer``, ``quantization``, ``other``, ``total`` ->
  ``params``, ``gflops`` (inference: one utterance of S seconds, batch 1). ``other`` holds what
  docs/methods.md §1 puts in no group (``masked_spec_embed``). ``complete``: the groups add up to
  ``total``. ``gao2022``: ``quantization`` is the quantizer alone, ``projections`` holds
  ``project_hid`` + ``project_q``, and ``total`` is the three groups only (as published).
- ``layers``: every conv layer, feature projection, positional conv, encoder layer norm, each
  Transformer layer, quantizer and the two projections -> ``name``, ``module``, ``group``,
  ``params``, ``forward_gflops``, ``train_gflops``, ``activation_bytes`` at the requested batch.
- ``unattributed``: the same figures for what runs outside those layers (the loss, masking).
- ``train_step``: measured ``seconds``, ``activation_bytes``, ``peak_bytes`` (+ breakdown).
- optional ``savers``, ``sweep``, ``precision_comparison``.
"""

from __future__ import annotations

import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedspeech.models.accounting import COMPLETE, CONVENTIONS, GAO2022, GROUPS, OTHER, PROJECTIONS, check_convention
from fedspeech.profiling.measure import GIGA, LayerFigures, StepMeasurement, inference_flops, measure_step
from fedspeech.profiling.savers import PRECISIONS, Savers

SCHEMA = "fedspeech.profile/1"
MEMORY_METHOD = (
    "activation_bytes: storages autograd saves for backward (saved_tensors_hooks, deduplicated, "
    "weights excluded; inputs kept by activation checkpointing included). peak_bytes: CPU - high-water "
    "mark of live tensor bytes over one steady-state step (fedspeech.profiling.memory); CUDA - "
    "torch.cuda.max_memory_allocated. Allocator and framework overhead are not included."
)
Log = Callable[[str], None]
PROJECTIONS_KEY = "projections"


def _gflops(flops: float) -> float:
    return flops / GIGA


def modules_table(
    layers: list[LayerFigures], other: LayerFigures, convention: str = COMPLETE
) -> dict[str, dict[str, float | str]]:
    """Per-group params and inference GFLOPs (FLOPs as counted by ``inference_flops`` under the
    same convention). ``complete``: the groups plus ``other`` add up to ``total``. ``gao2022``:
    the contrastive projections form their own ``projections`` entry and ``total`` is the three
    METHODS.md §1 groups only, as in the reference study's table."""
    check_convention(convention)
    split = convention == GAO2022

    def group_of(layer: LayerFigures) -> str:
        return PROJECTIONS_KEY if split and layer.name in PROJECTIONS else layer.group

    table: dict[str, dict[str, float | str]] = {}
    for group in GROUPS + ((PROJECTIONS_KEY,) if split else ()):
        members = [layer for layer in layers if group_of(layer) == group]
        flops = sum(m.forward_flops for m in members)
        table[group] = {"params": sum(m.params for m in members), "gflops": _gflops(flops), "flops": flops}
    table[OTHER] = {
        "params": other.params,
        "gflops": _gflops(other.forward_flops),
        "flops": other.forward_flops,
        "includes": other.module,
    }
    if split:
        flops = sum(int(table[group]["flops"]) for group in GROUPS)
        params = sum(int(table[group]["params"]) for group in GROUPS)
    else:
        flops = sum(layer.forward_flops for layer in layers) + other.forward_flops
        params = sum(layer.params for layer in layers) + other.params
    table["total"] = {"params": params, "gflops": _gflops(flops), "flops": flops}
    return table


def layer_rows(measurement: StepMeasurement) -> list[dict[str, Any]]:
    return [
        {
            "name": layer.name,
            "module": layer.module,
            "group": layer.group,
            "params": layer.params,
            "forward_gflops": _gflops(layer.forward_flops),
            "train_gflops": _gflops(layer.train_flops),
            "activation_bytes": layer.activation_bytes,
        }
        for layer in measurement.layers
    ]


def step_summary(m: StepMeasurement) -> dict[str, Any]:
    return {
        "seconds": m.seconds_per_step,
        "seconds_all": m.step_seconds,
        "cpu_seconds": m.cpu_seconds_per_step,
        "cpu_seconds_all": m.step_cpu_seconds,
        "audio_seconds": m.seconds,
        "batch": m.batch,
        "precision": m.precision,
        "savers": m.savers,
        "frames": m.frames,
        "forward_gflops": _gflops(m.forward_flops),
        "train_gflops": _gflops(m.train_flops),
        "activation_bytes": m.activation_bytes,
        "peak_bytes": m.peak_bytes,
        "peak_breakdown": m.peak_breakdown,
        "peak_by_phase": m.peak_by_phase,
        "static_bytes": m.static_bytes,
    }


def saver_rows(baseline: StepMeasurement, variants: list[StepMeasurement]) -> list[dict[str, Any]]:
    """What each saver configuration saves (bytes) and costs (step time, FLOPs) vs. no savers."""
    rows = []
    for m in [baseline, *variants]:
        row = step_summary(m)
        audio = m.batch * m.seconds
        row.update(
            label="+".join(m.savers) or "none" if m is not variants[-1] or len(variants) == 1 else "all selected",
            activation_saved_bytes=baseline.activation_bytes - m.activation_bytes,
            peak_saved_bytes=baseline.peak_bytes - m.peak_bytes,
            extra_train_gflops=_gflops(m.train_flops - baseline.train_flops),
            seconds_per_audio_second=(m.seconds_per_step / audio) if m.seconds_per_step else None,
        )
        if m.seconds_per_step and baseline.seconds_per_step:
            # measure_step fills step_seconds and step_cpu_seconds from the same timings
            assert m.cpu_seconds_per_step is not None and baseline.cpu_seconds_per_step is not None
            row["time_cost_seconds"] = m.seconds_per_step - baseline.seconds_per_step
            row["time_cost_percent"] = 100 * (m.seconds_per_step / baseline.seconds_per_step - 1)
            row["cpu_time_cost_percent"] = 100 * (m.cpu_seconds_per_step / baseline.cpu_seconds_per_step - 1)
        rows.append(row)
    return rows


def profile(
    template: nn.Module,
    model_name: str,
    seconds: float,
    batch: int,
    precision: str = "fp32",
    savers: Savers = Savers(),
    device_type: str = "cpu",
    repeats: int = 1,
    sweep_seconds: list[float] | None = None,
    compare_precision: bool = False,
    log: Log = lambda message: None,
    convention: str = COMPLETE,
) -> dict[str, Any]:
    """Everything ``fedspeech profile`` reports, as the JSON-ready dict described above;
    ``convention`` applies to the module table and the sweep's inference FLOPs."""
    check_convention(convention)
    log(f"inference FLOPs: {model_name}, {seconds:g} s, batch 1, convention {convention}")
    inference_layers, inference_other = inference_flops(template, seconds, convention=convention)
    log(f"train step: batch {batch}, {savers.effective_seconds(seconds):g} s, {savers.effective_precision(precision)}")
    main = measure_step(template, model_name, seconds, batch, precision, savers, device_type, repeats)
    report: dict[str, Any] = {
        "schema": SCHEMA,
        "config": {
            "model": model_name,
            "seconds": seconds,
            "batch": batch,
            "precision": precision,
            "savers": savers.tokens(),
            "device_type": device_type,
            "repeats": repeats,
            "threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "machine": platform.processor() or platform.machine(),
        },
        "convention": {"name": convention, "description": CONVENTIONS[convention]},
        "modules": modules_table(inference_layers, inference_other, convention),
        "layers": layer_rows(main),
        "unattributed": {
            "params": main.other.params,
            "includes": main.other.module,
            "forward_gflops": _gflops(main.other.forward_flops),
            "train_gflops": _gflops(main.other.train_flops),
            "activation_bytes": main.other.activation_bytes,
        },
        "train_step": {**step_summary(main), "memory_method": MEMORY_METHOD},
    }
    if savers.any:
        log("savers: baseline and each saver alone")
        baseline = measure_step(
            template, model_name, seconds, batch, precision, Savers(), device_type, repeats, with_layers=False
        )
        singles = savers.singles()
        if len(singles) == 1:
            variants = [main]  # the selected saver alone is the main measurement
        else:
            variants = [
                measure_step(
                    template, model_name, seconds, batch, precision, single, device_type, repeats, with_layers=False
                )
                for single in singles
            ] + [main]
        report["savers"] = saver_rows(baseline, variants)
    if sweep_seconds:
        report["sweep"] = sweep(
            template, model_name, sweep_seconds, batch, precision, savers, device_type, repeats, log, convention
        )
    if compare_precision:
        rows = []
        for other_precision in PRECISIONS:
            log(f"precision: {other_precision}")
            m = measure_step(
                template,
                model_name,
                seconds,
                batch,
                other_precision,
                savers.without_amp(),
                device_type,
                repeats,
                with_layers=False,
            )
            rows.append(step_summary(m))
        report["precision_comparison"] = rows
    return report


def sweep(
    template: nn.Module,
    model_name: str,
    lengths: list[float],
    batch: int,
    precision: str,
    savers: Savers,
    device_type: str,
    repeats: int,
    log: Log = lambda message: None,
    convention: str = COMPLETE,
) -> list[dict[str, Any]]:
    """Memory and FLOPs versus input length (crop saver ignored: the sweep sets the length);
    ``inference_gflops`` under ``convention``, train-step figures complete."""
    rows = []
    for length in lengths:
        log(f"sweep: {length:g} s")
        layers, other = inference_flops(template, length, convention=convention)
        m = measure_step(
            template,
            model_name,
            length,
            batch,
            precision,
            savers.without_crop(),
            device_type,
            repeats,
            with_layers=False,
        )
        row = step_summary(m)
        row["inference_gflops"] = modules_table(layers, other, convention)["total"]["gflops"]
        rows.append(row)
    return rows


# -- text tables -----------------------------------------------------------------------------
def _mib(n: float | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def _sec(s: float | None) -> str:
    return "-" if s is None else f"{s:.3f}"


def format_table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    left = {0} | {i for i, h in enumerate(headers) if h in ("notes", "savers", "setting")}
    lines = [
        "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))).rstrip()
        for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render(report: dict[str, Any]) -> str:
    """Human-readable tables of a profile report."""
    c = report["config"]
    convention = report["convention"]
    out = [
        f"# {c['model']}: {c['seconds']:g} s, batch {c['batch']}, {c['precision']}, "
        f"savers: {', '.join(c['savers']) or 'none'}",
        "",
        f"Modules (params; inference GFLOPs of one utterance, batch 1), convention {convention['name']}: "
        f"{convention['description']}",
        format_table(
            ["module", "params", "GFLOPs"],
            [[k, f"{v['params']:,}", f"{v['gflops']:.3f}"] for k, v in report["modules"].items()],
        ),
        "",
        f"Layers (train step at batch {c['batch']})"
        + ("" if convention["name"] == COMPLETE else f"; complete count, not {convention['name']}"),
        format_table(
            ["layer", "group", "params", "fwd GFLOPs", "train GFLOPs", "activations MiB"],
            [
                [
                    r["name"],
                    r["group"],
                    f"{r['params']:,}",
                    f"{r['forward_gflops']:.3f}",
                    f"{r['train_gflops']:.3f}",
                    _mib(r["activation_bytes"]),
                ]
                for r in report["layers"]
            ]
            + [
                [
                    "(unattributed)",
                    OTHER,
                    f"{report['unattributed']['params']:,}",
                    f"{report['unattributed']['forward_gflops']:.3f}",
                    f"{report['unattributed']['train_gflops']:.3f}",
                    _mib(report["unattributed"]["activation_bytes"]),
                ]
            ],
        ),
        "",
    ]
    t = report["train_step"]
    out.append(
        f"Train step: {_sec(t['seconds'])} s/step wall, {_sec(t['cpu_seconds'])} s CPU "
        f"(median of {len(t['seconds_all'])}), "
        f"{t['train_gflops']:.2f} GFLOPs, "
        f"activations {_mib(t['activation_bytes'])} MiB, peak {_mib(t['peak_bytes'])} MiB"
    )
    if "savers" in report:
        out += [
            "",
            "Memory savers (vs. none)",
            format_table(
                [
                    "savers",
                    "activations MiB",
                    "peak MiB",
                    "saved peak MiB",
                    "s/step",
                    "time cost %",
                    "CPU-time cost %",
                    "train GFLOPs",
                ],
                [
                    [
                        r["label"],
                        _mib(r["activation_bytes"]),
                        _mib(r["peak_bytes"]),
                        _mib(r["peak_saved_bytes"]),
                        _sec(r["seconds"]),
                        "-" if "time_cost_percent" not in r else f"{r['time_cost_percent']:+.1f}",
                        "-" if "cpu_time_cost_percent" not in r else f"{r['cpu_time_cost_percent']:+.1f}",
                        f"{r['train_gflops']:.2f}",
                    ]
                    for r in report["savers"]
                ],
            ),
        ]
    if "sweep" in report:
        out += [
            "",
            "Sweep over input length",
            format_table(
                ["seconds", "inference GFLOPs", "train GFLOPs", "activations MiB", "peak MiB", "s/step", "CPU s/step"],
                [
                    [
                        f"{r['audio_seconds']:g}",
                        f"{r['inference_gflops']:.2f}",
                        f"{r['train_gflops']:.2f}",
                        _mib(r["activation_bytes"]),
                        _mib(r["peak_bytes"]),
                        _sec(r["seconds"]),
                        _sec(r.get("cpu_seconds")),
                    ]
                    for r in report["sweep"]
                ],
            ),
        ]
    if "precision_comparison" in report:
        out += [
            "",
            "Precision comparison",
            format_table(
                ["precision", "activations MiB", "peak MiB", "s/step", "CPU s/step", "train GFLOPs"],
                [
                    [
                        r["precision"],
                        _mib(r["activation_bytes"]),
                        _mib(r["peak_bytes"]),
                        _sec(r["seconds"]),
                        _sec(r.get("cpu_seconds")),
                        f"{r['train_gflops']:.2f}",
                    ]
                    for r in report["precision_comparison"]
                ],
            ),
        ]
    return "\n".join(out)


def model_label(model: str) -> str:
    """A file-name-safe label for a preset or a checkpoint folder."""
    return Path(model).name or "model"
