"""The device model: from a measured workload and a catalogue device to fit / time predictions.

Workload (device-independent, measured once on any machine, see ``workload.py``):
    F(B, S)  = B * f(S)                       train FLOPs per batch (forward + backward);
                                              f(S) measured at batch 1 and length S
    M(B, S)  = max(M_fixed + B * (m0 + m1 * S),           peak bytes of a step: the largest of
                   F_fixed + B * (f0 + f1 * S) + D,       three lower bounds, each measured
                   M_opt)
       - M_fixed + B * (m0 + m1 * S): the forward+backward peak, fitted through three runs
         (batch 1, S), (1, S/2), (2, S/2). Its batch-independent part holds weights, AdamW
         state and whatever gradients are alive at the peak.
       - F_fixed + B * (f0 + f1 * S): the end-of-forward peak (all saved activations alive),
         fitted the same way; D = min over the runs of (forward+backward peak - forward
         peak) >= 0, the backward's extra. This term keeps growing with S even when, at the
         measured lengths, the backward peak sits on a plateau where all gradients exist
         and activations are gone (big models with savers), so the first term is flat there.
       - M_opt: the optimizer step's peak (weights, gradients, AdamW state, update
         temporaries), independent of batch and length.
Device (catalogue): memory, headroom, effective throughput X (calibrated from one published
step: X = f_cal / t_cal) and a mixed-precision speed-up factor s_p (1 unless the device lists
the precision; unsupported precisions are planned as FP32).
Prediction:
    fits            = M(B, S) <= memory * (1 - headroom)
    seconds/batch   = F(B, S) / (X * s_p)                       (null if it does not fit)
    max seconds     = the largest S for which every term fits (0 if none does)
FL wall-clock: a round lasts as long as its slowest sampled client:
    round = max_k(local_epochs * ceil(utterances_k / B) * t_k) + communication
Trend: device compute doubles every N months from the baseline year (2022, the study):
    first year Y with t_device / 2**((Y - 2022) * 12 / N) <= t_target.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from fedspeech.profiling.catalogue import Device

BASELINE_YEAR = 2022


@dataclass(frozen=True)
class Workload:
    """Measured training cost of one (model, length, batch, precision, savers) setting."""

    model: str
    seconds: float
    batch: int
    precision: str
    savers: tuple[str, ...]
    train_flops_per_utterance: float
    fixed_bytes: float
    utterance_bytes_intercept: float
    utterance_bytes_per_second: float
    optimizer_peak_bytes: float = 0.0
    forward_fixed_bytes: float = 0.0
    forward_bytes_intercept: float = 0.0
    forward_bytes_per_second: float = 0.0
    backward_extra_bytes: float = 0.0
    model_bytes: float = 0.0
    measured: tuple[dict[str, Any], ...] = ()

    def train_flops(self, batch: int | None = None) -> float:
        return (batch or self.batch) * self.train_flops_per_utterance

    def peak_bytes(self, seconds: float | None = None, batch: int | None = None) -> float:
        seconds = self.seconds if seconds is None else seconds
        batch = batch or self.batch
        return max(
            _line(self.fixed_bytes, self.utterance_bytes_intercept, self.utterance_bytes_per_second, batch, seconds),
            _line(self.forward_fixed_bytes, self.forward_bytes_intercept, self.forward_bytes_per_second, batch, seconds)
            + self.backward_extra_bytes,
            self.optimizer_peak_bytes,
        )

    def max_seconds(self, usable_bytes: float, batch: int | None = None) -> float:
        """Longest crop whose predicted peak fits ``usable_bytes`` (0 if none does)."""
        batch = batch or self.batch
        if self.peak_bytes(0.0, batch) > usable_bytes:
            return 0.0
        longest = math.inf
        for fixed, intercept, slope in (
            (self.fixed_bytes, self.utterance_bytes_intercept, self.utterance_bytes_per_second),
            (
                self.forward_fixed_bytes + self.backward_extra_bytes,
                self.forward_bytes_intercept,
                self.forward_bytes_per_second,
            ),
        ):
            if slope > 0:
                longest = min(longest, (usable_bytes - fixed - batch * intercept) / (batch * slope))
        return max(0.0, longest)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["savers"] = list(self.savers)
        data["measured"] = list(self.measured)
        data["train_gflops_per_batch"] = self.train_flops() / 1e9
        data["peak_bytes"] = self.peak_bytes()
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        fields = {k: data[k] for k in cls.__dataclass_fields__ if k in data}
        fields["savers"] = tuple(fields.get("savers", ()))
        fields["measured"] = tuple(fields.get("measured", ()))
        return cls(**fields)


def _line(fixed: float, intercept: float, slope: float, batch: int, seconds: float) -> float:
    """fixed + batch * per-utterance bytes (never negative per utterance)."""
    return fixed + batch * max(0.0, intercept + slope * seconds)


@dataclass
class Prediction:
    """What the planner says about one device (JSON keys as in the issue, plus context)."""

    device: str
    name: str
    device_class: str
    fits: bool
    seconds_per_batch: float | None
    max_seconds_that_fit: float | None
    peak_bytes: float
    usable_bytes: float | None
    precision_used: str
    compute_seconds_per_batch: float | None = None  # the time if memory were no limit
    reasons: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        if data["max_seconds_that_fit"] is not None and math.isinf(data["max_seconds_that_fit"]):
            data["max_seconds_that_fit"] = None
        return data


def predict(device: Device, workload: Workload, fp32_workload: Workload | None = None) -> Prediction:
    """Apply the device model to a workload (see module docstring)."""
    reasons: list[str] = []
    plan = workload
    if not device.supports(workload.precision):
        if fp32_workload is None:
            raise ValueError(f"{device.id} has no {workload.precision}: an fp32 workload is needed to plan it")
        plan = fp32_workload
        reasons.append(f"{workload.precision} not supported: planned as fp32")
    peak = plan.peak_bytes()
    usable = device.usable_bytes
    if usable is None:
        fits, max_seconds = True, None
        reasons.append("memory unknown: assumed to fit")
    else:
        fits = peak <= usable
        max_seconds = plan.max_seconds(usable)
        if not fits:
            reasons.append(f"out of memory: needs {peak / 2**30:.2f} GiB, usable {usable / 2**30:.2f} GiB")
    compute = None
    if device.memory_only:
        reasons.append(f"memory-only device, no throughput ({device.source or 'no calibration'})")
    else:
        assert device.throughput_flops is not None  # not memory_only
        compute = plan.train_flops() / (device.throughput_flops * device.speedup(plan.precision))
    return Prediction(
        device=device.id,
        name=device.name,
        device_class=device.device_class,
        fits=fits,
        seconds_per_batch=compute if fits else None,
        max_seconds_that_fit=max_seconds,
        peak_bytes=peak,
        usable_bytes=usable,
        precision_used=plan.precision,
        compute_seconds_per_batch=compute,
        reasons=reasons,
    )


# -- federated schedule ----------------------------------------------------------------------
@dataclass(frozen=True)
class FLSchedule:
    clients: int
    utterances_per_client: int
    rounds: int
    local_epochs: int = 1
    clients_per_round: int | None = None
    bandwidth_mbps: float | None = None

    def __post_init__(self) -> None:
        for name in ("clients", "utterances_per_client", "rounds", "local_epochs"):
            if getattr(self, name) < 1:
                raise ValueError(f"FL schedule: {name} must be >= 1")
        if self.clients_per_round is not None and not 1 <= self.clients_per_round <= self.clients:
            raise ValueError("FL schedule: clients_per_round must be between 1 and clients")

    @property
    def sampled(self) -> int:
        return self.clients_per_round or self.clients


def local_training_seconds(seconds_per_batch: float, batch: int, schedule: FLSchedule) -> float:
    return schedule.local_epochs * math.ceil(schedule.utterances_per_client / batch) * seconds_per_batch


def communication_seconds(model_bytes: float, schedule: FLSchedule) -> float:
    """Download + upload of the model once per round at ``bandwidth_mbps`` (0 if not given)."""
    if not schedule.bandwidth_mbps:
        return 0.0
    return 2 * model_bytes * 8 / (schedule.bandwidth_mbps * 1e6)


def expected_slowest(client_seconds: list[float], sampled: int) -> float:
    """Expected maximum of ``sampled`` clients drawn uniformly without replacement.

    Exact order statistic: the j-th fastest (1-based) client is the slowest of the sample
    with probability C(j-1, k-1) / C(n, k).
    """
    times = sorted(client_seconds)
    n, k = len(times), sampled
    if not 1 <= k <= n:
        raise ValueError(f"cannot sample {k} of {n} clients")
    total = math.comb(n, k)
    return sum(t * math.comb(j, k - 1) for j, t in enumerate(times) if j >= k - 1) / total


def fl_wallclock(
    client_seconds_per_batch: list[float], batch: int, schedule: FLSchedule, model_bytes: float = 0.0
) -> dict[str, float]:
    """Wall-clock of the whole federated training for clients with the given step times."""
    local = [local_training_seconds(t, batch, schedule) for t in client_seconds_per_batch]
    communication = communication_seconds(model_bytes, schedule)
    round_seconds = expected_slowest(local, min(schedule.sampled, len(local))) + communication
    total = schedule.rounds * round_seconds
    return {
        "round_seconds": round_seconds,
        "communication_seconds_per_round": communication,
        "total_seconds": total,
        "total_hours": total / 3600,
    }


# -- hardware trend --------------------------------------------------------------------------
def first_year_reaching(
    seconds: float, target_seconds: float, doubling_months: float = 18.0, baseline_year: int = BASELINE_YEAR
) -> int:
    """First calendar year in which a device class, getting 2x faster every
    ``doubling_months``, needs at most ``target_seconds`` for what takes it ``seconds`` now."""
    if seconds <= 0 or target_seconds <= 0 or doubling_months <= 0:
        raise ValueError("trend: times and doubling period must be positive")
    if seconds <= target_seconds:
        return baseline_year
    years = math.log2(seconds / target_seconds) * doubling_months / 12.0
    # the tiny tolerance keeps exact multiples (e.g. 2x slower, 12-month doubling) on their year
    return baseline_year + math.ceil(years - 1e-9)


def trend_assumption(doubling_months: float, target: str) -> str:
    return (
        f"Assumption: per-device training throughput doubles every {doubling_months:g} months "
        f"from the {BASELINE_YEAR} measurements (DEVICES.md); memory is not projected; the target is "
        f"{target}'s {BASELINE_YEAR} time for the same workload."
    )
