"""Who trains how deep, and how long it takes them: fleets, devices and depth plans.

A federation's fleet assigns every client a device of the profiling catalogue
(``profiling/devices.json`` plus user files), by fractions or one per client
(:class:`~fedspeech.profiling.depth_planner.FleetConfig`). Each client plans its own depth
with :func:`~fedspeech.profiling.depth_planner.plan_depth` from its device's memory (less
headroom), its throughput and the round deadline; the server then assigns the training
depth per mode (:func:`training_depths`). The simulated device time of a client is the
work it really did (training FLOPs counted per batch) over its device's throughput.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from functools import lru_cache
from pathlib import Path

from fedspeech.profiling.catalogue import Device
from fedspeech.profiling.depth_planner import DepthCostModel, DepthPlan, FleetConfig, plan_depth

# ----------------------------------------------------------------------------- devices


def _planner_device(entry: Device) -> Device:
    """A catalogue entry as a fleet sees it: named by its catalogue id (the round log's
    device tiers), its memory in (fractional) bytes as a fleet file gives them."""
    assert entry.memory_bytes is not None  # resolve_device() rejects entries without memory
    return dataclasses.replace(entry, name=entry.id, memory_bytes=float(entry.memory_bytes))


@lru_cache(maxsize=8)
def _catalogue(extra_file: str) -> dict:
    from fedspeech.profiling.catalogue import load_catalogue

    return load_catalogue([Path(extra_file)] if extra_file else [])


def resolve_device(name: str, fleet: FleetConfig, catalogue_file: str = "") -> Device:
    """The device called ``name``: the fleet's own description first, then the catalogue
    (packaged, user, then ``catalogue_file``; by id or display name)."""
    if name in fleet.devices:
        return fleet.devices[name]
    from fedspeech.profiling.catalogue import select_devices

    try:
        (entry,) = select_devices(_catalogue(catalogue_file), [name])
    except ValueError as error:
        raise ValueError(f"fleet: {error} (or describe it in a fleet file's 'devices' table)") from None
    if not entry.memory_bytes:
        raise ValueError(f"fleet: catalogue device {name!r} has no memory size; the planner needs one")
    return _planner_device(entry)


def parse_fleet(spec: str, seed: int = 0) -> FleetConfig:
    """A fleet from a ``.json``/``.toml`` file, ``"dev:0.4,dev2:0.6"`` (fractions) or
    ``"dev,dev2,..."`` (one device per client, in client order)."""
    text = spec.strip()
    if not text:
        raise ValueError("fleet: empty; give 'device:fraction,...', 'device,device,...' or a fleet file")
    if text.endswith((".json", ".toml")):
        return FleetConfig.load(text)
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if all(":" not in p for p in parts):
        return FleetConfig(clients=tuple(parts), seed=seed)
    fractions: dict[str, float] = {}
    for part in parts:
        name, _, value = part.rpartition(":")
        try:
            fraction = float(value)
        except ValueError:
            raise ValueError(f"fleet: {part!r} is not 'device:fraction'") from None
        if not name or name in fractions:
            raise ValueError(f"fleet: {part!r}: missing or repeated device name")
        fractions[name] = fraction
    return FleetConfig(fractions=fractions, seed=seed)


def client_device(
    fleet_spec: str,
    fleet_seed: int,
    catalogue_file: str,
    partition_id: int,
    num_clients: int,
    override: str | None = None,
) -> Device:
    """Client ``partition_id``'s device: ``override`` (a SuperNode's ``device`` node config)
    or its place in the fleet."""
    fleet = parse_fleet(fleet_spec, fleet_seed)
    name = override or fleet.assign(num_clients)[partition_id]
    return resolve_device(name, fleet, catalogue_file)


# ----------------------------------------------------------------------------- plans


def steps_per_round(num_utterances: int, batch_size: int, local_epochs: int) -> int:
    return local_epochs * max(1, math.ceil(num_utterances / batch_size))


def device_seconds(train_flops: float, device: Device, precision: str = "fp32") -> float | None:
    """Predicted seconds for ``train_flops`` on ``device`` (None: the device has no timing)."""
    if device.throughput_flops is None:
        return None
    speedup = device.mixed_speedup if precision == "mixed" and device.mixed_precision else 1.0
    return train_flops / (device.throughput_flops * speedup)


@dataclass(frozen=True)
class ClientPlan:
    """A client's own plan, as it reports it to the server (JSON-able)."""

    client: int
    device: str
    depth: int  # deepest affordable depth; 0 = nothing fits
    precision: str
    reason: str
    steps_per_round: int
    seconds: float  # planned utterance length (the longest crop a batch may hold)
    full_depth_seconds: float | None  # predicted round time at full depth
    full_depth_fits_memory: bool
    candidates: tuple[dict, ...]  # every exit depth: peak_bytes, seconds_per_round, fits_memory, fits_deadline
    max_depth: int | None = None  # the client's own cap, if it set one

    def to_dict(self) -> dict:
        data = asdict(self)
        data["candidates"] = list(self.candidates)
        return data

    @classmethod
    def from_dict(cls, data: Mapping) -> ClientPlan:
        return cls(**{**data, "candidates": tuple(data["candidates"])})


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


def plan_client(
    client: int,
    device: Device,
    costs: Sequence[DepthCostModel],
    *,
    deadline: float,
    steps: int,
    batch: int,
    seconds: float,
    precision: str,
    max_depth: int | None = None,
) -> ClientPlan:
    """Plan one client's depth; ``max_depth`` is a cap the client sets itself (e.g. to save battery)."""
    plan: DepthPlan = plan_depth(
        list(costs), device, deadline, steps, batch=batch, seconds=seconds, precision=precision
    )
    depth, reason = plan.depth, plan.reason
    if max_depth is not None and depth > max_depth:
        allowed = [c.depth for c in plan.candidates if c.depth <= max_depth]
        depth = max(allowed, default=0)
        reason += f"; capped by the client at depth {max_depth} -> {depth}"
    full = plan.candidates[-1]
    return ClientPlan(
        client=client,
        device=device.name,
        depth=depth,
        precision=plan.precision,
        reason=reason,
        steps_per_round=steps,
        seconds=seconds,
        full_depth_seconds=_finite_or_none(full.seconds_per_round),
        full_depth_fits_memory=full.fits_memory,
        candidates=tuple(
            {
                "depth": c.depth,
                "peak_bytes": c.peak_bytes,
                "seconds_per_round": _finite_or_none(c.seconds_per_round),
                "fits_memory": c.fits_memory,
                "fits_deadline": c.fits_deadline,
            }
            for c in plan.candidates
        ),
        max_depth=max_depth,
    )


def inclusive_deadline(plans: Iterable[ClientPlan]) -> float:
    """The tightest round deadline at which every client that can hold the shallowest exit
    in memory can also train it in time: nobody is left out, slower devices go shallower."""
    times = [
        p.candidates[0]["seconds_per_round"]
        for p in plans
        if p.candidates[0]["fits_memory"] and p.candidates[0]["seconds_per_round"] is not None
    ]
    if not times:
        raise ValueError("auto deadline: no client has a timed device that fits the shallowest exit; set --deadline")
    return max(times)


def with_deadline(plan: ClientPlan, deadline: float) -> ClientPlan:
    """``plan`` decided again under ``deadline``, from its candidates (memory, own cap kept)."""
    candidates = tuple(
        {**c, "fits_deadline": c["seconds_per_round"] is None or c["seconds_per_round"] <= deadline}
        for c in plan.candidates
    )
    fitting = [
        c["depth"]
        for c in candidates
        if c["fits_memory"] and c["fits_deadline"] and (plan.max_depth is None or c["depth"] <= plan.max_depth)
    ]
    depth = max(fitting, default=0)
    reason = (
        f"depth {depth} on {plan.device} within the auto deadline {deadline:.4g} s"
        if depth
        else f"nothing fits on {plan.device} within the auto deadline {deadline:.4g} s"
    )
    return dataclasses.replace(plan, depth=depth, reason=reason, candidates=candidates)


def training_depths(mode: str, planned: Mapping[int, int], num_layers: int) -> dict[int, int]:
    """Depth each taking-part client trains at, by mode; clients left out are absent.

    ``planned`` maps a client (or node) to its affordable depth (0 = nothing fits). Under
    ``full`` every client trains full depth even if its plan says it cannot (METHODS §3
    baseline (a): it is simulated as taking as long as it would, and flagged if it would
    not even fit in memory).
    """
    if mode == "adaptive":
        depths = {k: d for k, d in planned.items() if d > 0}
    elif mode == "full":
        depths = {k: num_layers for k in planned}
    elif mode == "exclusion":
        depths = {k: num_layers for k, d in planned.items() if d >= num_layers}
        if not depths:
            raise ValueError(
                f"mode exclusion: no client can train all {num_layers} layers within the "
                "deadline and its memory; nobody would take part"
            )
    elif mode == "smallest":
        affordable = [d for d in planned.values() if d > 0]
        common = min(affordable, default=0)
        depths = {k: common for k, d in planned.items() if d > 0}
    else:
        raise ValueError(f"mode: unknown {mode!r}")
    if not depths:
        raise ValueError(
            f"mode {mode}: no client can train even the shallowest exit (raise the deadline "
            "or check the fleet's devices)"
        )
    return depths
