"""Build a planner :class:`Workload` from measurements, and calibrate the local CPU.

The workload is measured at batch 1 (the cheapest run that still exercises every layer) at
the requested length S and at a second length (S/2, or 2S for very short S): FLOPs come
from the run at S, the memory line ``M_static + m0 + m1 * S`` from the two peaks. Batch
enters the device model as a factor (planner.py); ``benchmarks/prediction_error.py`` checks
that on this machine against direct measurements at batch 2 and 4.
"""

from __future__ import annotations

import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from fedspeech.profiling.catalogue import GIB, write_user_entry
from fedspeech.profiling.measure import StepMeasurement, measure_step
from fedspeech.profiling.planner import Workload
from fedspeech.profiling.savers import Savers
from fedspeech.profiling.trainstep import build_model

LOCAL_DEVICE_ID = "local-cpu"


def second_length(seconds: float) -> float:
    return seconds / 2 if seconds >= 1.0 else seconds * 2


def workload_from_measurements(
    at_length: StepMeasurement, at_other_length: StepMeasurement, batch: int, savers: Savers
) -> Workload:
    """Fit the per-utterance memory line through the forward+backward peaks of two batch-1
    measurements; the optimizer step's peak is kept as a floor (see planner.py)."""
    if at_length.batch != 1 or at_other_length.batch != 1:
        raise ValueError("workload measurements must be taken at batch 1")
    if at_length.seconds == at_other_length.seconds:
        raise ValueError("workload measurements need two different lengths")
    # weights and AdamW state live through forward + backward; gradients appear during backward
    # and are part of the fitted per-utterance line's intercept
    static = float(at_length.static_bytes["params"] + at_length.static_bytes["optimizer_state"])
    fb_long = at_length.peak_by_phase["forward_backward"]
    fb_short = at_other_length.peak_by_phase["forward_backward"]
    slope = (fb_long - fb_short) / (at_length.seconds - at_other_length.seconds)
    intercept = fb_long - static - slope * at_length.seconds
    points = tuple(
        {"seconds": m.seconds, "batch": m.batch, "peak_bytes": m.peak_bytes, "peak_by_phase": m.peak_by_phase,
         "train_flops": m.train_flops}
        for m in (at_other_length, at_length)
    )
    return Workload(
        model=at_length.model,
        seconds=at_length.seconds,
        batch=batch,
        precision=at_length.precision,
        savers=tuple(savers.tokens()),
        train_flops_per_utterance=float(at_length.train_flops),
        static_bytes=static,
        utterance_bytes_intercept=intercept,
        utterance_bytes_per_second=slope,
        optimizer_peak_bytes=float(max(m.peak_by_phase["optimizer"] for m in (at_length, at_other_length))),
        model_bytes=float(at_length.static_bytes["params"]),
        measured=points,
    )


def measure_workload(
    model: str,
    seconds: float,
    batch: int,
    precision: str = "fp32",
    savers: Savers = Savers(),
    template: nn.Module | None = None,
    device_type: str = "cpu",
) -> Workload:
    """Measure FLOPs and the memory line of a workload (two short batch-1 runs, no timing)."""
    template = template if template is not None else build_model(model)
    effective = savers.effective_seconds(seconds)
    runs = [
        measure_step(template, model, length, 1, precision, savers, device_type, repeats=0, with_layers=False)
        for length in (effective, second_length(effective))
    ]
    # crop is already applied to the lengths above; keep it out of the re-measured savers
    return workload_from_measurements(runs[0], runs[1], batch, savers)


def cpu_has_native_bf16() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def calibrate_local(
    catalogue_path: Path,
    model: str = "tiny",
    seconds: float = 2.0,
    batch: int = 1,
    repeats: int = 3,
    clock: str = "wall",
    headroom: float = 0.2,
) -> dict[str, Any]:
    """Measure this machine at one setting and write it as ``local-cpu`` to a user catalogue.

    Throughput = measured train FLOPs / measured step time (min over ``repeats``, the
    estimate least disturbed by other processes). The bf16 factor is measured at the same
    setting. ``clock='cpu'`` times process CPU seconds instead of wall-clock, which is robust
    on a shared machine (then use 1 thread: CPU seconds of several threads add up).
    """
    template = build_model(model)
    timings: dict[str, float] = {}
    flops = 0
    for precision in ("fp32", "bf16"):
        run = measure_step(template, model, seconds, batch, precision, repeats=repeats, with_layers=False)
        times = run.step_cpu_seconds if clock == "cpu" else run.step_seconds
        timings[precision] = min(times)
        flops = run.train_flops
    entry = {
        "id": LOCAL_DEVICE_ID,
        "name": f"this machine ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)",
        "class": "local CPU",
        "memory_gib": round(_memory_bytes() / GIB, 2),
        "headroom": headroom,
        "mixed_precision": ["bf16"],
        "mixed_precision_speedup": round(timings["fp32"] / timings["bf16"], 4),
        "calibration": {
            "model": model,
            "seconds": seconds,
            "batch": batch,
            "precision": "fp32",
            "seconds_per_batch": timings["fp32"],
            "train_gflops": flops / 1e9,
            "clock": clock,
            "threads": torch.get_num_threads(),
            "bf16_seconds_per_batch": timings["bf16"],
            "native_bf16": cpu_has_native_bf16(),
            "date": time.strftime("%Y-%m-%d"),
        },
        "source": "fedspeech feasibility --calibrate-local (measured)",
    }
    write_user_entry(catalogue_path, entry)
    return entry


def _memory_bytes() -> int:
    import os

    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
