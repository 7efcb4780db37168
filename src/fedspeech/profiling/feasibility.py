"""``fedspeech feasibility``: per-device predictions, FL wall-clock and trend, as JSON + text.

JSON schema ``fedspeech.feasibility/1``: ``workload`` (what was measured), ``device_model``
(the formulas), ``devices`` (one object per device with at least ``device``, ``fits``,
``seconds_per_batch``, ``max_seconds_that_fit``, ``peak_bytes``; plus ``fl`` and ``trend``
when asked), and optional ``fl_schedule``, ``fleet`` and ``trend`` summaries.

With ``--savers auto`` the planner also measures the exact memory savers as a ladder,
cheapest first (:data:`AUTO_SAVER_LADDER`), and gives each device the plain workload if it
fits, else the first rung that fits: ``savers_applied`` per device, and ``savers_auto``
lists the devices that are feasible only thanks to savers. Only exact savers are tried
(same gradients as plain training); freezing the CNN or cropping changes what is learnt,
so they stay the user's explicit choice.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict
from typing import Any, cast

from fedspeech.profiling.catalogue import Device, select_devices
from fedspeech.profiling.planner import (
    BASELINE_YEAR,
    FLSchedule,
    Prediction,
    Workload,
    first_year_reaching,
    fl_wallclock,
    predict,
    trend_assumption,
)
from fedspeech.profiling.report import format_table

SCHEMA = "fedspeech.feasibility/1"
DEVICE_MODEL = (
    "seconds_per_batch = batch * train_FLOPs(1 utterance) / (throughput * mixed_precision_speedup); "
    "throughput = calibration.train_gflops / calibration.seconds_per_batch; "
    "peak = weights + grads + AdamW state + batch * (m0 + m1 * seconds) (m0, m1 fitted from two measured lengths); "
    "fits = peak <= memory * (1 - headroom); max_seconds_that_fit solves that inequality for seconds."
)


def parse_fleet(text: str, catalogue: dict[str, Device]) -> list[Device]:
    """``a40:2,raspberry-pi-4:8`` -> one Device per client."""
    clients: list[Device] = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, _, count = part.rpartition(":")
        if not name or not count.isdigit() or int(count) < 1:
            raise ValueError(f"--fleet entry {part!r}: expected DEVICE:COUNT with COUNT >= 1")
        clients += select_devices(catalogue, [name]) * int(count)
    if not clients:
        raise ValueError("--fleet is empty")
    return clients


#: Exact savers, in order of extra compute: the fused quantizer and freeing gradients cost
#: nothing, checkpointing the Transformer and the contrastive logits recomputes their forward,
#: recomputing the CNN adds its forward.
AUTO_SAVER_LADDER: tuple[tuple[str, ...], ...] = (
    ("fused-quantizer", "step-in-backward"),
    ("ckpt-transformer", "ckpt-contrastive", "fused-quantizer", "step-in-backward"),
    ("recompute-cnn", "ckpt-transformer", "ckpt-contrastive", "fused-quantizer", "step-in-backward"),
)

Ladder = list[dict[str, Workload]]  # per rung: workloads by precision, as ``workloads``


def predict_with_savers(
    device: Device, workloads: dict[str, Workload], precision: str, ladder: Ladder | None = None
) -> tuple[Prediction, list[str]]:
    """The plain prediction if it fits, else that of the first ladder rung that fits; with the
    savers that were applied. When nothing fits, the plain prediction, with the longest input
    the strongest rung would fit."""
    plain = predict(device, workloads[precision], workloads.get("fp32"))
    if plain.fits or not ladder:
        return plain, []
    for rung in ladder:
        option = predict(device, rung[precision], rung.get("fp32"))
        if option.fits:
            tokens = list(rung[precision].savers)
            option.reasons.insert(
                0, f"fits only with savers {' '.join(tokens)} (plain needs {plain.peak_bytes / 2**30:.2f} GiB)"
            )
            return option, tokens
    strongest = predict(device, ladder[-1][precision], ladder[-1].get("fp32"))
    plain.max_seconds_that_fit = max(plain.max_seconds_that_fit or 0.0, strongest.max_seconds_that_fit or 0.0)
    plain.reasons.append(
        f"does not fit even with savers {' '.join(ladder[-1][precision].savers)} "
        f"({strongest.peak_bytes / 2**30:.2f} GiB); max s is theirs"
    )
    return plain, []


def plan(
    devices: list[Device],
    workloads: dict[str, Workload],
    precision: str,
    catalogue: dict[str, Device],
    schedule: FLSchedule | None = None,
    fleet: str | None = None,
    trend_months: float | None = None,
    trend_target: str = "a40",
    saver_ladder: Ladder | None = None,
) -> dict[str, Any]:
    """All predictions for the selected devices (see module docstring for the schema)."""
    workload = workloads[precision]
    result: dict[str, Any] = {
        "schema": SCHEMA,
        "workload": workload.to_dict(),
        "workloads": {p: w.to_dict() for p, w in workloads.items()},
        "device_model": DEVICE_MODEL,
        "devices": [],
    }
    only_with_savers: dict[str, list[str]] = {}
    for device in devices:
        prediction, applied = predict_with_savers(device, workloads, precision, saver_ladder)
        entry = prediction.to_dict()
        entry["savers_applied"] = applied
        if applied:
            only_with_savers[device.id] = applied
        entry["throughput_gflops"] = None if device.memory_only else cast(float, device.throughput_flops) / 1e9
        entry["headroom"] = device.headroom
        result["devices"].append(entry)
    if saver_ladder:
        result["savers_auto"] = {
            "ladder": [list(rung[precision].savers) for rung in saver_ladder],
            "ladder_workloads": [{p: w.to_dict() for p, w in rung.items()} for rung in saver_ladder],
            "feasible_only_with_savers": only_with_savers,
        }

    if schedule is not None:
        result["fl_schedule"] = asdict(schedule)
        for entry in result["devices"]:
            spb = entry["seconds_per_batch"]
            entry["fl"] = (
                None
                if spb is None
                else fl_wallclock([spb] * schedule.clients, workload.batch, schedule, workload.model_bytes)
            )
        if fleet:
            result["fleet"] = fleet_wallclock(
                parse_fleet(fleet, catalogue), workloads, precision, schedule, saver_ladder
            )

    if trend_months is not None:
        target_device = select_devices(catalogue, [trend_target])[0]
        target = predict_with_savers(target_device, workloads, precision, saver_ladder)[0].compute_seconds_per_batch
        if target is None:
            raise ValueError(f"trend target {trend_target!r} has no throughput")
        classes: dict[str, int] = {}
        for entry in result["devices"]:
            compute = entry["compute_seconds_per_batch"]
            if compute is None:
                entry["trend"] = None
                continue
            year = first_year_reaching(compute, target, trend_months)
            entry["trend"] = {"first_year_reaching_target": year, "speedup_needed": compute / target}
            classes[entry["device_class"]] = min(year, classes.get(entry["device_class"], year))
        result["trend"] = {
            "doubling_months": trend_months,
            "baseline_year": BASELINE_YEAR,
            "target_device": target_device.id,
            "target_seconds_per_batch": target,
            "first_year_by_class": classes,
            "assumption": trend_assumption(trend_months, target_device.name),
        }
    return result


def fleet_wallclock(
    clients: list[Device],
    workloads: dict[str, Workload],
    precision: str,
    schedule: FLSchedule,
    saver_ladder: Ladder | None = None,
) -> dict[str, Any]:
    """Mixed fleet: each round samples clients from the whole fleet; a sampled client whose
    device cannot train (out of memory, no throughput) drops out of that round."""
    workload = workloads[precision]
    times: list[float | None] = []
    unable: Counter[str] = Counter()
    for device in clients:
        p, _ = predict_with_savers(device, workloads, precision, saver_ladder)
        if p.seconds_per_batch is None:
            unable[device.id] += 1
        times.append(p.seconds_per_batch)
    summary: dict[str, Any] = {"clients": len(clients), "unable_to_train": dict(unable)}
    able = [t for t in times if t is not None]
    if not able:
        summary["wallclock"] = None
        summary["note"] = "no client of the fleet can train this workload"
        return summary
    sampled = min(schedule.clients_per_round or len(times), len(times))
    fleet_schedule = FLSchedule(
        len(times),
        schedule.utterances_per_client,
        schedule.rounds,
        schedule.local_epochs,
        sampled,
        schedule.bandwidth_mbps,
    )
    # a client that drops out takes no time: the round waits for the slowest one that trains
    summary["wallclock"] = fl_wallclock([t or 0.0 for t in times], workload.batch, fleet_schedule, workload.model_bytes)
    summary["expected_training_clients_per_round"] = sampled * len(able) / len(times)
    summary["note"] = f"expected slowest of {sampled} clients sampled uniformly from {len(times)}; unable ones drop out"
    return summary


def _gib(value: float | None) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def _hours(fl: dict[str, float] | None) -> str:
    return "-" if not fl else f"{fl['total_hours']:.1f}"


def render_plan(result: dict[str, Any]) -> str:
    w = result["workload"]
    lines = [
        f"# {w['model']}: {w['seconds']:g} s, batch {w['batch']}, {w['precision']}, "
        f"savers: {', '.join(w['savers']) or 'none'}",
        f"train GFLOPs per batch {w['train_gflops_per_batch']:.1f}; predicted peak {_gib(w['peak_bytes'])} GiB",
        "",
    ]
    has_fl = "fl_schedule" in result
    has_trend = "trend" in result
    auto = result.get("savers_auto")
    headers = ["device", "fits", "s/batch", "max s", "peak GiB", "usable GiB"]
    headers += ["savers applied"] if auto else []
    headers += ["FL hours"] if has_fl else []
    headers += ["year"] if has_trend else []
    headers += ["notes"]
    rows = []
    for d in result["devices"]:
        max_s = d["max_seconds_that_fit"]
        row = [
            d["device"],
            "yes" if d["fits"] else "NO",
            "-" if d["seconds_per_batch"] is None else f"{d['seconds_per_batch']:.3f}",
            "-" if max_s is None else f"{max_s:.1f}",
            _gib(d["peak_bytes"]),
            _gib(d["usable_bytes"]),
        ]
        if auto:
            row.append(" ".join(d["savers_applied"]) or "-")
        if has_fl:
            row.append(_hours(d.get("fl")))
        if has_trend:
            row.append("-" if not d.get("trend") else str(d["trend"]["first_year_reaching_target"]))
        row.append("; ".join(d["reasons"]))
        rows.append(row)
    lines.append(format_table(headers, rows))
    if auto:
        only = auto["feasible_only_with_savers"]
        lines += [
            "",
            "Savers tried where plain training does not fit (cheapest first): "
            + " | ".join(" ".join(rung) for rung in auto["ladder"]),
            "Feasible only thanks to savers: "
            + (", ".join(f"{device} ({' '.join(tokens)})" for device, tokens in only.items()) or "none"),
        ]
    if has_fl:
        s = result["fl_schedule"]
        lines += [
            "",
            f"FL schedule: {s['clients']} clients ({s['clients_per_round'] or s['clients']} per round), "
            f"{s['utterances_per_client']} utterances each, {s['local_epochs']} local epoch(s), {s['rounds']} rounds; "
            "a round lasts as long as its slowest sampled client.",
        ]
        if "fleet" in result:
            f = result["fleet"]
            unable = ", ".join(f"{k} x{v}" for k, v in f["unable_to_train"].items()) or "none"
            lines.append(
                f"Mixed fleet ({f['clients']} clients; unable to train: {unable}): "
                f"{_hours(f['wallclock'])} h total ({f['note']})."
            )
    if has_trend:
        t = result["trend"]
        lines += [
            "",
            t["assumption"],
            "First year each device class reaches the target: "
            + ", ".join(f"{k} {v}" for k, v in t["first_year_by_class"].items()),
        ]
    return "\n".join(lines)
