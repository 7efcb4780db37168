"""Build a planner :class:`Workload` from measurements, and calibrate the local CPU.

A workload is measured with three cheap runs, none timed: (batch 1, S), (batch 1, S/2) and
(batch 2, S/2) (2S instead of S/2 for very short S). FLOPs come from the run at S (they are
exactly proportional to the batch). The forward+backward peaks give the memory model of
planner.py: the two batch-1 runs the slope in S, the batch-2 run the split between the
per-utterance part and the batch-independent part (weights, AdamW state and whatever
gradients are alive at the peak, which depends on where in backward the peak falls).
``benchmarks/prediction_error.py`` checks the extrapolation to other batches and lengths.
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
    at_length: StepMeasurement, at_other_length: StepMeasurement, doubled: StepMeasurement, batch: int, savers: Savers
) -> Workload:
    """Fit the memory model of planner.py: the lines through the forward+backward and the
    end-of-forward peaks of (1, S), (1, S') and (2, S'), the backward's extra, and the
    optimizer step's peak."""
    if (at_length.batch, at_other_length.batch, doubled.batch) != (1, 1, 2):
        raise ValueError("workload measurements must be at batch 1, 1 and 2")
    if at_length.seconds == at_other_length.seconds or doubled.seconds != at_other_length.seconds:
        raise ValueError("workload measurements need lengths S, S' and S' (S != S')")
    fixed, intercept, slope = _fit_line("forward_backward", at_length, at_other_length, doubled)
    forward_fixed, forward_intercept, forward_slope = _fit_line("forward", at_length, at_other_length, doubled)
    runs = (at_other_length, doubled, at_length)
    backward_extra = max(0.0, min(m.peak_by_phase["forward_backward"] - m.peak_by_phase["forward"] for m in runs))
    points = tuple(
        {
            "seconds": m.seconds,
            "batch": m.batch,
            "peak_bytes": m.peak_bytes,
            "peak_by_phase": m.peak_by_phase,
            "train_flops": m.train_flops,
            "static_bytes": m.static_bytes,
        }
        for m in runs
    )
    return Workload(
        model=at_length.model,
        seconds=at_length.seconds,
        batch=batch,
        precision=at_length.precision,
        savers=tuple(savers.tokens()),
        train_flops_per_utterance=float(at_length.train_flops),
        fixed_bytes=fixed,
        utterance_bytes_intercept=intercept,
        utterance_bytes_per_second=slope,
        optimizer_peak_bytes=float(max(m.peak_by_phase["optimizer"] for m in runs)),
        forward_fixed_bytes=forward_fixed,
        forward_bytes_intercept=forward_intercept,
        forward_bytes_per_second=forward_slope,
        backward_extra_bytes=float(backward_extra),
        model_bytes=float(at_length.static_bytes["params"]),
        measured=points,
    )


def _fit_line(
    phase: str, at_length: StepMeasurement, at_other_length: StepMeasurement, doubled: StepMeasurement
) -> tuple[float, float, float]:
    """(fixed, per-utterance intercept, per-utterance bytes per second) of one phase's peak."""
    peak = lambda m: float(m.peak_by_phase[phase])  # noqa: E731
    slope = (peak(at_length) - peak(at_other_length)) / (at_length.seconds - at_other_length.seconds)
    per_utterance_short = peak(doubled) - peak(at_other_length)
    return peak(at_other_length) - per_utterance_short, per_utterance_short - slope * at_other_length.seconds, slope


def measure_workload(
    model: str,
    seconds: float,
    batch: int,
    precision: str = "fp32",
    savers: Savers = Savers(),
    template: nn.Module | None = None,
    device_type: str = "cpu",
) -> Workload:
    """Measure FLOPs and the memory model of a workload (three short runs, no timing)."""
    template = template if template is not None else build_model(model)
    effective = savers.effective_seconds(seconds)
    other = second_length(effective)

    def run(length: float, batch_size: int) -> StepMeasurement:
        return measure_step(
            template, model, length, batch_size, precision, savers, device_type, repeats=0, with_layers=False
        )

    return workload_from_measurements(run(effective, 1), run(other, 1), run(other, 2), batch, savers)


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
