"""Measure one workload: time, FLOPs, saved activations and peak memory of a training step.

Every figure comes from running the real step (no hand formulas), in separate passes so
instrumentation never inflates what it does not measure:

1. one step under :class:`UnitFlopCounter` + saved-tensor hooks: per-layer FLOPs (forward,
   and forward + backward) and the bytes autograd keeps for backward. It doubles as the
   warm-up (creates the AdamW state, primes kernels), so later steps are steady-state;
2. ``repeats`` timed steps without any instrumentation (wall-clock and process CPU time);
3. one step for peak memory: on CPU the high-water mark of live tensor bytes
   (:class:`~fedspeech.profiling.memory.PeakTensorMemory`), on CUDA
   ``torch.cuda.max_memory_allocated``. Tensor bytes only: allocator and framework overhead
   are left to the device headroom (``benchmarks/prediction_error.py`` compares with RSS).
"""

from __future__ import annotations

import statistics
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch
from torch import nn

from fedspeech.models.accounting import (
    COMPLETE,
    GAO2022,
    OTHER,
    ConvLinearGate,
    UnitAttribution,
    UnitFlopCounter,
    check_convention,
    count_params,
    discover_units,
    unattributed_params,
)
from fedspeech.profiling.memory import PeakTensorMemory, tensors_of
from fedspeech.profiling.savers import Savers
from fedspeech.profiling.trainstep import TrainStep, synthetic_batch

GIGA = 1e9


@dataclass
class LayerFigures:
    """Per-layer figures of one workload (FLOPs as counts; converted to GFLOPs in reports)."""

    name: str
    module: str
    group: str
    params: int
    forward_flops: int = 0
    train_flops: int = 0
    activation_bytes: int = 0


@dataclass
class StepMeasurement:
    """Everything measured about one (model, seconds, batch, precision, savers) workload."""

    model: str
    seconds: float
    batch: int
    precision: str
    savers: list[str]
    device_type: str
    step_seconds: list[float]
    step_cpu_seconds: list[float]
    forward_flops: int
    train_flops: int
    activation_bytes: int
    peak_bytes: int
    peak_breakdown: dict[str, int]
    peak_by_phase: dict[str, int]
    static_bytes: dict[str, int]
    layers: list[LayerFigures]
    other: LayerFigures
    frames: int = 0

    @property
    def seconds_per_step(self) -> float | None:
        return statistics.median(self.step_seconds) if self.step_seconds else None

    @property
    def cpu_seconds_per_step(self) -> float | None:
        return statistics.median(self.step_cpu_seconds) if self.step_cpu_seconds else None

    def to_dict(self) -> dict:
        return asdict(self)


def _layer_table(model: nn.Module) -> tuple[list[LayerFigures], LayerFigures, UnitAttribution]:
    units = discover_units(model)
    layers = [LayerFigures(u.name, u.path, u.group, count_params(u.module)) for u in units]
    other = LayerFigures(OTHER, ", ".join(unattributed_params(model, units)) or "-", OTHER, 0)
    other.params = sum(unattributed_params(model, units).values())
    return layers, other, UnitAttribution(model, units)


def inference_flops(
    template: nn.Module, seconds: float, seed: int = 0, convention: str = COMPLETE
) -> tuple[list[LayerFigures], LayerFigures]:
    """Forward FLOPs of one utterance (batch 1, eval mode, no masking) per layer, counted under
    ``convention`` (``gao2022``: conv and linear layers only)."""
    check_convention(convention)
    layers, other, attribution = _layer_table(template)
    audio = synthetic_batch(template, 1, seconds, seed).input_values
    gate = ConvLinearGate(template) if convention == GAO2022 else None
    was_training = template.training
    template.eval()
    try:
        with torch.no_grad(), attribution, gate or nullcontext(), UnitFlopCounter(attribution, gate) as counter:
            template(audio)
    finally:
        template.train(was_training)
    _fill(layers, other, "forward_flops", counter.snapshot())
    return layers, other


def _fill(layers: list[LayerFigures], other: LayerFigures, attr: str, by_unit: dict[str, int]) -> None:
    for layer in layers:
        setattr(layer, attr, int(by_unit.get(layer.name, 0)))
    setattr(other, attr, int(by_unit.get(OTHER, 0)))


def static_bytes(step: TrainStep) -> dict[str, int]:
    """Bytes that live across steps: weights, gradients (of trainable weights), AdamW state.

    Under ``step-in-backward`` at most one parameter's gradient exists at a time."""
    params = list(step.model.parameters())
    grads = [p.nbytes for p in params if p.requires_grad]
    optimizer_state = sum(
        value.nbytes for state in step.optimizer.state.values() for value in state.values() if torch.is_tensor(value)
    )
    return {
        "params": sum(p.nbytes for p in params),
        "grads": max(grads, default=0) if step.savers.step_in_backward else sum(grads),
        "optimizer_state": optimizer_state,
    }


def _peak_memory(step: TrainStep, batch) -> tuple[int, dict[str, int], dict[str, int]]:
    """Peak bytes of one step, its split, and the peaks of its phases.

    The phases matter for planning: at the end of the forward pass every saved activation is
    alive, so the forward peak grows with batch and length; the backward peak may instead sit
    where all gradients exist and most activations are freed; the optimizer step's peak
    (weights, gradients, AdamW state, update temporaries) does not depend on batch or length.
    """
    if step.device.type == "cuda":

        def phase_peak(run) -> int:
            torch.cuda.synchronize(step.device)
            torch.cuda.reset_peak_memory_stats(step.device)
            run()
            torch.cuda.synchronize(step.device)
            return int(torch.cuda.max_memory_allocated(step.device))

        before = torch.cuda.memory_allocated(step.device)
        pending: list = []  # the forward loss, handed to the backward phase
        phases = {
            "forward": phase_peak(lambda: pending.append(step.forward_loss(batch))),
            "backward": phase_peak(lambda: step.backward(pending.pop())),
            "optimizer": phase_peak(step.update),
        }
        phases["forward_backward"] = max(phases["forward"], phases["backward"])
        peak = max(phases.values())
        return peak, {"existing_before_step": before, "allocated_during_step": peak - before}, phases
    tracker = PeakTensorMemory(
        tensors_of(
            step.model, step.optimizer, batch.input_values, batch.mask_time_indices, batch.sampled_negative_indices
        )
    )
    with tracker:
        tracker.start_phase("forward")
        loss = step.forward_loss(batch)
        tracker.start_phase("backward")
        step.backward(loss)
        del loss
        tracker.start_phase("optimizer")
        step.update()
    phases = dict(tracker.phase_peaks)
    phases["forward_backward"] = max(phases["forward"], phases["backward"])
    return tracker.peak_bytes, tracker.breakdown(), phases


def measure_step(
    template: nn.Module,
    model_name: str,
    seconds: float,
    batch: int,
    precision: str = "fp32",
    savers: Savers = Savers(),
    device_type: str = "cpu",
    repeats: int = 2,
    seed: int = 0,
    with_layers: bool = True,
) -> StepMeasurement:
    """Run and measure a training step of ``template`` (left untouched: the step trains a copy)."""
    step = TrainStep(template, precision, savers, device_type)
    effective_seconds = savers.effective_seconds(seconds)
    data = synthetic_batch(step.model, batch, effective_seconds, seed).to(step.device)
    layers, other, attribution = _layer_table(step.model)
    with attribution, UnitFlopCounter(attribution) as counter:
        with attribution.track_saved_tensors():
            loss = step.forward_loss(data)
        forward = counter.snapshot()
        forward_total = counter.get_total_flops()
        step.backward_and_update(loss)
        train = counter.snapshot()
        train_total = counter.get_total_flops()
    saved = attribution.saved_bytes()
    del attribution, loss
    if not step.optimizer.state:
        raise ValueError(
            f"{model_name}: the optimizer step was skipped (non-finite {step.precision} gradients), "
            "so its state cannot be profiled; try bf16 or fp32"
        )
    if with_layers:
        _fill(layers, other, "forward_flops", forward)
        _fill(layers, other, "train_flops", train)
        _fill(layers, other, "activation_bytes", saved)

    timings = [step.timed(data) for _ in range(repeats)]
    peak, breakdown, phases = _peak_memory(step, data)
    return StepMeasurement(
        model=model_name,
        seconds=effective_seconds,
        batch=batch,
        precision=step.precision,
        savers=savers.tokens(),
        device_type=device_type,
        step_seconds=[wall for wall, _ in timings],
        step_cpu_seconds=[cpu for _, cpu in timings],
        forward_flops=int(forward_total),
        train_flops=int(train_total),
        activation_bytes=int(sum(saved.values())),
        peak_bytes=peak,
        peak_breakdown=breakdown,
        peak_by_phase=phases,
        static_bytes=static_bytes(step),
        layers=layers if with_layers else [],
        other=other,
        frames=data.frames,
    )
