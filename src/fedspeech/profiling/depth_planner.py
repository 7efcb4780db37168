"""Pick each client's early-exit depth from its memory budget and the round deadline.

The planner needs, per candidate depth, the FLOPs and the peak memory of one training
step at the planned workload (:class:`DepthCost`). They can come from anywhere (e.g. the
general profiler later); :func:`measure_depth_costs` measures them here on the actual
model at two input lengths and fits a line in audio length, because training FLOPs and
memory grow (about) linearly with input length and exactly linearly with batch size
(DEVICES.md). The line ignores attention's T² term: small next to the CNN and the
feed-forward blocks of real models at a few seconds, but it makes extrapolating far from
the measured lengths optimistic (for tiny test models, badly so). :func:`plan_depth`
therefore measures at half the planned length and at the planned length itself.

Peak memory of a step = parameters the client holds (frozen CNN included, layers > d not)
+ gradients and optimizer state of what it trains + activations saved for backward
(summed over unique storages seen by ``torch.autograd.graph.saved_tensors_hooks``; the
peak is reached at the end of the forward pass). Transient buffers are left to the
device's headroom.
"""

from __future__ import annotations

import json
import math
import random
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from fedspeech.models.early_exit import (
    EarlyExitModel,
    measuring,
    step_inputs,
    synthetic_batch,
    training_step_loss,
)
from fedspeech.profiling.catalogue import Device

PRECISIONS: tuple[str, ...] = ("fp32", "mixed")
# AdamW keeps two fp32 moments per trained parameter.
ADAMW_STATES_PER_PARAM = 2


@dataclass(frozen=True)
class DepthCost:
    """Cost of one training step (forward + backward) of a depth-``depth`` client."""

    depth: int
    train_flops: float
    peak_bytes: float


@dataclass(frozen=True)
class DepthCostModel:
    """Per-depth cost, linear in audio seconds per utterance and in batch size.

    ``*_fixed`` and ``*_per_second`` are per utterance; ``static_bytes`` (weights, grads,
    optimizer state) does not depend on the input.
    """

    depth: int
    flops_fixed: float
    flops_per_second: float
    activation_bytes_fixed: float
    activation_bytes_per_second: float
    static_bytes: float

    def at(self, seconds: float, batch: int) -> DepthCost:
        flops = batch * max(0.0, self.flops_fixed + self.flops_per_second * seconds)
        activations = batch * max(0.0, self.activation_bytes_fixed + self.activation_bytes_per_second * seconds)
        return DepthCost(self.depth, flops, self.static_bytes + activations)


def as_device(device: object) -> Device:
    """A :class:`~fedspeech.profiling.catalogue.Device` from itself, a dict of its fields
    (:meth:`Device.from_dict` spellings) or any object with the same attributes."""
    if isinstance(device, Device):
        return device
    if isinstance(device, Mapping):
        return Device.from_dict(device)
    fields = {
        key: getattr(device, key)
        for key in ("memory_bytes", "throughput_flops", "headroom", "mixed_precision", "mixed_precision_speedup")
        if getattr(device, key, None) is not None
    }
    return Device.from_dict(fields, str(getattr(device, "name", type(device).__name__)))


# ---- measuring ---------------------------------------------------------------------


def _storage_key(tensor: torch.Tensor) -> tuple[int, int] | None:
    try:
        storage = tensor.untyped_storage()
    except (RuntimeError, NotImplementedError):  # tensor subclasses without storage
        return None
    return storage.data_ptr(), storage.nbytes()


def _measure_step(
    model: EarlyExitModel,
    depth: int,
    seconds: float,
    precision: str,
    sample_rate: int,
    cached_cnn: bool = False,
) -> tuple[float, float]:
    """(FLOPs, saved-activation bytes) of one batch-1 training step (from cached CNN
    features with ``cached_cnn``)."""
    from fedspeech.models.accounting import flop_counter

    param_storages = {_storage_key(p) for p in model.parameters()}
    saved: set[tuple[int, int]] = set()

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        key = _storage_key(tensor)
        if key is not None and key not in param_storages:
            saved.add(key)
        return tensor

    audio, targets = synthetic_batch(model, seconds, 1, sample_rate)
    inputs = step_inputs(model, audio, cached_cnn)
    device_type = audio.device.type
    autocast_dtype = torch.bfloat16 if device_type == "cpu" else torch.float16
    counter = flop_counter()
    with measuring(model), counter:
        with torch.autocast(device_type, dtype=autocast_dtype, enabled=precision == "mixed"):
            with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                loss = training_step_loss(model, inputs, targets, depth, cached_cnn)
        loss.backward()
    return float(counter.get_total_flops()), float(sum(nbytes for _, nbytes in saved))


def _static_bytes(model: EarlyExitModel, depth: int) -> float:
    """Weights held + gradients + AdamW moments (fp32) of what is trained.

    Under autocast the 16-bit weight copies are saved for backward, so the activation
    measurement already holds them (as a length-independent term).
    """
    state = model.state_dict()
    held = model.held_keys(depth)
    trained = model.trainable_keys(depth)
    held_bytes = sum(state[k].numel() * state[k].element_size() for k in held)
    trained_bytes = sum(state[k].numel() * state[k].element_size() for k in trained)
    optimizer_bytes = sum(state[k].numel() * 4 * ADAMW_STATES_PER_PARAM for k in trained)
    return float(held_bytes + trained_bytes + optimizer_bytes)


def measure_depth_costs(
    model: EarlyExitModel,
    depths: Sequence[int] | None = None,
    lengths: tuple[float, float] = (1.0, 2.0),
    precision: str = "fp32",
    sample_rate: int = 16_000,
    cached_cnn: bool = False,
) -> list[DepthCostModel]:
    """Measure each depth (default: every exit) at two audio lengths and fit the lines.

    Runs ``2 × len(depths)`` batch-1 training steps (no optimizer step; weights unchanged,
    existing gradients restored). ``precision="mixed"`` measures under autocast
    (bfloat16 on CPU, float16 on GPU). ``cached_cnn``: steps start from the frozen CNN's
    cached features, so the CNN's forward pass is not part of a step's cost.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    short, long = sorted(lengths)
    if not long > short:
        raise ValueError(f"need two different lengths, got {lengths}")
    costs = []
    for depth in depths if depths is not None else model.exits:
        depth = model.check_depth(depth)
        flops_a, act_a = _measure_step(model, depth, short, precision, sample_rate, cached_cnn)
        flops_b, act_b = _measure_step(model, depth, long, precision, sample_rate, cached_cnn)
        flops_slope = (flops_b - flops_a) / (long - short)
        act_slope = (act_b - act_a) / (long - short)
        costs.append(
            DepthCostModel(
                depth=depth,
                flops_fixed=flops_a - flops_slope * short,
                flops_per_second=flops_slope,
                activation_bytes_fixed=act_a - act_slope * short,
                activation_bytes_per_second=act_slope,
                static_bytes=_static_bytes(model, depth),
            )
        )
    return costs


# ---- planning ----------------------------------------------------------------------


@dataclass(frozen=True)
class DepthCandidate:
    depth: int
    peak_bytes: float
    seconds_per_round: float
    fits_memory: bool
    fits_deadline: bool


@dataclass(frozen=True)
class DepthPlan:
    """The chosen depth (0: nothing fits) and its predicted cost; ``reason`` says why."""

    depth: int
    predicted_peak_bytes: float
    predicted_seconds_per_round: float
    reason: str
    precision: str = "fp32"
    candidates: tuple[DepthCandidate, ...] = ()

    @property
    def feasible(self) -> bool:
        return self.depth > 0


CostSource = EarlyExitModel | Callable[[], EarlyExitModel] | Sequence[DepthCostModel] | Sequence[DepthCost]


def _gb(num_bytes: float) -> str:
    return f"{num_bytes / 1e9:.2f} GB"


def _per_round(seconds: float) -> str:
    return "unknown s/round" if math.isnan(seconds) else f"{seconds:.0f} s/round"


def _costs_at(
    source: CostSource,
    seconds: float,
    batch: int,
    precision: str,
    measure_lengths: tuple[float, float] | None,
) -> list[DepthCost]:
    if isinstance(source, EarlyExitModel) or callable(source):
        model = source if isinstance(source, EarlyExitModel) else source()
        lengths = measure_lengths or (seconds / 2, seconds)
        source = measure_depth_costs(model, lengths=lengths, precision=precision)
    costs = []
    for item in source:
        if isinstance(item, DepthCostModel):
            costs.append(item.at(seconds, batch))
        elif isinstance(item, DepthCost):
            costs.append(item)  # already at the planned workload
        else:
            raise TypeError(f"expected DepthCost or DepthCostModel, got {type(item).__name__}")
    if not costs:
        raise ValueError("no depth costs to plan from")
    return sorted(costs, key=lambda c: c.depth)


def plan_depth(
    costs: CostSource,
    device: Device | Mapping[str, object],
    deadline_seconds: float,
    steps_per_round: int,
    batch: int = 1,
    seconds: float = 5.0,
    precision: str = "fp32",
    measure_lengths: tuple[float, float] | None = None,
) -> DepthPlan:
    """Deepest depth whose peak fits ``memory × (1 − headroom)`` and whose round ≤ deadline.

    ``costs``: an :class:`EarlyExitModel` or a builder of one (measured here at
    ``measure_lengths``, default half the planned length and the planned length), fitted
    :class:`DepthCostModel` s (evaluated at ``seconds`` and ``batch``), or
    :class:`DepthCost` s already at the planned workload. Round time =
    ``steps_per_round`` × step FLOPs / device throughput. Mixed precision is used only if
    the device has it; otherwise the plan falls back to fp32 and says so.
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if steps_per_round < 1 or batch < 1 or seconds <= 0 or deadline_seconds <= 0:
        raise ValueError("steps_per_round, batch, seconds and deadline_seconds must be positive")
    device = as_device(device)
    notes = []
    if precision == "mixed" and not device.mixed_precision:
        precision = "fp32"
        notes.append(f"{device.name} has no mixed precision: planned in fp32")
    usable = device.usable_bytes
    if usable is None:
        raise ValueError(f"device {device.name!r}: no memory size; the depth planner needs one")
    if device.throughput_flops is None:
        throughput = math.nan  # round time unknown: NaN seconds, deadline not checked
        notes.append(f"{device.name} has no throughput: deadline not checked")
    else:
        speedup = device.mixed_speedup if precision == "mixed" else 1.0
        throughput = device.throughput_flops * speedup

    def candidate(cost: DepthCost) -> DepthCandidate:
        round_seconds = steps_per_round * cost.train_flops / throughput
        return DepthCandidate(
            depth=cost.depth,
            peak_bytes=cost.peak_bytes,
            seconds_per_round=round_seconds,
            fits_memory=cost.peak_bytes <= usable,
            fits_deadline=math.isnan(round_seconds) or round_seconds <= deadline_seconds,
        )

    candidates = tuple(candidate(c) for c in _costs_at(costs, seconds, batch, precision, measure_lengths))
    assert device.memory_bytes is not None  # usable_bytes was not None
    budget = (
        f"usable {_gb(usable)} ({_gb(device.memory_bytes)} less {device.headroom:.0%} headroom), "
        f"deadline {deadline_seconds:.0f} s"
    )

    def verdict(c: DepthCandidate) -> str:
        problems = []
        if not c.fits_memory:
            problems.append(f"needs {_gb(c.peak_bytes)}")
        if not c.fits_deadline:
            problems.append(f"takes {_per_round(c.seconds_per_round)}")
        return f"depth {c.depth} " + (" and ".join(problems) if problems else "fits")

    fitting = [c for c in candidates if c.fits_memory and c.fits_deadline]
    if not fitting:
        shallowest = candidates[0]
        reason = f"nothing fits on {device.name}: {verdict(shallowest)}; {budget}"
        reason = "; ".join([reason] + notes)
        return DepthPlan(0, shallowest.peak_bytes, shallowest.seconds_per_round, reason, precision, candidates)
    best = fitting[-1]
    deeper = [c for c in candidates if c.depth > best.depth]
    reason = (
        f"depth {best.depth} on {device.name}: peak {_gb(best.peak_bytes)}, "
        f"{_per_round(best.seconds_per_round)}; {budget}"
    )
    if deeper:
        reason += f"; deeper rejected: {verdict(deeper[0])}"
    reason = "; ".join([reason] + notes)
    return DepthPlan(best.depth, best.peak_bytes, best.seconds_per_round, reason, precision, candidates)


# ---- fleets ------------------------------------------------------------------------


def _device_entry(name: str, spec: object) -> Device:
    if not isinstance(spec, Mapping):
        raise ValueError(f"fleet: devices[{name!r}] must be a table of fields")
    return Device.from_dict(spec, name)


@dataclass(frozen=True)
class FleetConfig:
    """Which device each client runs on: by fractions (shuffled per seed) or listed per client.

    Dict form (JSON or TOML)::

        {"seed": 0, "fractions": {"rpi4": 0.4, "jetson-nx": 0.3, "laptop": 0.3},
         "devices": {"rpi4": {"memory_gb": 8, "throughput_flops": 2e10, "headroom": 0.3}}}

    or ``{"clients": ["rpi4", "laptop", ...]}``. ``devices`` is optional; when given, every
    device name used must be described there.
    """

    fractions: Mapping[str, float] | None = None
    clients: tuple[str, ...] | None = None
    seed: int = 0
    devices: Mapping[str, Device] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.fractions is None) == (self.clients is None):
            raise ValueError("fleet: give exactly one of 'fractions' or 'clients'")
        if self.fractions is not None:
            if not self.fractions:
                raise ValueError("fleet: 'fractions' is empty")
            for name, value in self.fractions.items():
                if not (isinstance(value, int | float) and math.isfinite(value) and value >= 0):
                    raise ValueError(f"fleet: fractions[{name!r}] must be a number >= 0, got {value!r}")
            total = sum(self.fractions.values())
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"fleet: 'fractions' must sum to 1, got {total:g}")
        if self.clients is not None and not self.clients:
            raise ValueError("fleet: 'clients' is empty")
        if self.devices:
            missing = sorted(set(self.device_names) - set(self.devices))
            if missing:
                raise ValueError(f"fleet: devices {missing} are used but missing from 'devices'")

    @property
    def device_names(self) -> list[str]:
        if self.fractions is not None:
            return sorted(self.fractions)
        assert self.clients is not None  # __post_init__: exactly one of fractions and clients
        return sorted(set(self.clients))

    def assign(self, num_clients: int) -> list[str]:
        """Device name of each client ``0..num_clients-1``; same seed, same answer.

        Fractions become exact counts by largest remainder (ties by name), then the list is
        shuffled with the seed, so e.g. 0.4/0.3/0.3 of 10 clients is always 4/3/3.
        """
        if num_clients < 1:
            raise ValueError(f"fleet: need at least one client, got {num_clients}")
        if self.clients is not None:
            if len(self.clients) != num_clients:
                raise ValueError(f"fleet: 'clients' lists {len(self.clients)} devices for {num_clients} clients")
            return list(self.clients)
        assert self.fractions is not None  # __post_init__: exactly one of fractions and clients
        names = sorted(self.fractions)
        exact = {n: self.fractions[n] * num_clients for n in names}
        counts = {n: math.floor(exact[n]) for n in names}
        left = num_clients - sum(counts.values())
        by_remainder = sorted(names, key=lambda n: (-(exact[n] - counts[n]), n))
        for name in by_remainder[:left]:
            counts[name] += 1
        assignment = [n for n in names for _ in range(counts[n])]
        random.Random(self.seed).shuffle(assignment)
        return assignment

    def devices_for(self, num_clients: int) -> list[Device]:
        """Like :meth:`assign`, resolved to :class:`Device` s (needs ``devices``)."""
        if not self.devices:
            raise ValueError("fleet: no 'devices' described")
        return [self.devices[name] for name in self.assign(num_clients)]

    @classmethod
    def from_dict(cls, data: Mapping[str, object]) -> FleetConfig:
        unknown = sorted(set(data) - {"fractions", "clients", "seed", "devices"})
        if unknown:
            raise ValueError(f"fleet: unknown fields {unknown}")
        fractions = data.get("fractions")
        clients = data.get("clients")
        if fractions is not None and not isinstance(fractions, Mapping):
            raise ValueError("fleet: 'fractions' must map device names to fractions")
        if clients is not None and not (
            isinstance(clients, Sequence) and not isinstance(clients, str) and all(isinstance(c, str) for c in clients)
        ):
            raise ValueError("fleet: 'clients' must be a list of device names")
        devices_raw = data.get("devices") or {}
        if not isinstance(devices_raw, Mapping):
            raise ValueError("fleet: 'devices' must map device names to their fields")
        seed = data.get("seed", 0)
        if not isinstance(seed, int) or isinstance(seed, bool):
            raise ValueError(f"fleet: 'seed' must be an integer, got {seed!r}")
        return cls(
            fractions=dict(fractions) if fractions is not None else None,
            clients=tuple(clients) if clients is not None else None,
            seed=seed,
            devices={name: _device_entry(name, spec) for name, spec in devices_raw.items()},
        )

    @classmethod
    def load(cls, path: str | Path) -> FleetConfig:
        """Read a fleet from a ``.json`` or ``.toml`` file."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"fleet file {path} not found")
        try:
            if path.suffix == ".toml":
                data = tomllib.loads(path.read_text())
            elif path.suffix == ".json":
                data = json.loads(path.read_text())
            else:
                raise ValueError("expected a .json or .toml file")
            return cls.from_dict(data)
        except (ValueError, tomllib.TOMLDecodeError) as error:
            raise ValueError(f"{path}: {error}") from None
