"""The device catalogue: a JSON data file users extend, seeded from DEVICES.md.

Format (``profiling/devices.json``, and any user file given with ``--catalogue``)::

    {"devices": [{
        "id": "a40", "name": "NVIDIA A40", "class": "server GPU",
        "memory_gib": 48, "headroom": 0.10,
        "mixed_precision": ["fp16", "bf16"], "mixed_precision_speedup": 2.0,
        "calibration": {"model": "base", "seconds": 5.5, "batch": 1, "precision": "fp32",
                        "seconds_per_batch": 0.12, "train_gflops": 171.4},
        "source": "..."}]}

- ``headroom``: fraction of ``memory_gib`` the OS, other apps and the framework hold;
  the planner only uses ``memory_gib * (1 - headroom)``.
- ``calibration``: one measured training step on the device. Its effective throughput is
  ``train_gflops / seconds_per_batch``, where ``train_gflops`` is what our profiler counts
  for that workload (forward + backward). ``throughput_gflops`` may be given instead.
  Devices with neither (phones) are memory-only.
- ``mixed_precision_speedup``: assumed (or calibrated) step-time speed-up of the listed
  mixed precisions over FP32; other precisions fall back to FP32 on that device.

Later files override earlier entries with the same ``id`` field by field.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

GIB = 2**30
PACKAGED = "devices.json"
DEFAULT_USER_CATALOGUE = Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "fedspeech" / "devices.json"
_REQUIRED = ("id", "name", "class", "headroom")


@dataclass(frozen=True)
class Device:
    """A training device, the one type the feasibility planner, the depth planner and the
    early-exit fleets share: an entry of the catalogue, or a device described in a fleet
    file (:meth:`from_dict`).

    ``throughput_flops``: sustained training FLOP/s at fp32; ``None`` for memory-only
    devices (phones with no published timing), whose plans check memory only.
    ``mixed_precision``: the mixed precisions it has (empty: none), each
    ``mixed_precision_speedup`` times faster than fp32.
    """

    id: str
    name: str
    device_class: str = "custom"
    memory_bytes: float | None = None
    headroom: float = 0.2
    mixed_precision: tuple[str, ...] = ()
    mixed_precision_speedup: float = 1.0
    throughput_flops: float | None = None
    calibration: dict[str, Any] | None = None
    source: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.memory_bytes is not None and not self.memory_bytes > 0:
            raise ValueError(f"device {self.name!r}: memory_bytes must be > 0")
        if self.throughput_flops is not None and not self.throughput_flops > 0:
            raise ValueError(f"device {self.name!r}: throughput_flops must be > 0")
        if not 0.0 <= self.headroom < 1.0:
            raise ValueError(f"device {self.name!r}: headroom must be in [0, 1)")
        if not self.mixed_precision_speedup > 0:
            raise ValueError(f"device {self.name!r}: mixed_precision_speedup must be > 0")

    @property
    def usable_bytes(self) -> float | None:
        """Memory less headroom (whole bytes for catalogue sizes, which are whole bytes)."""
        if self.memory_bytes is None:
            return None
        usable = self.memory_bytes * (1.0 - self.headroom)
        return int(usable) if isinstance(self.memory_bytes, int) else usable

    @property
    def memory_only(self) -> bool:
        return self.throughput_flops is None

    @property
    def mixed_speedup(self) -> float:
        """The step-time factor of mixed precision (used only where the device has it)."""
        return self.mixed_precision_speedup

    def speedup(self, precision: str) -> float:
        return self.mixed_precision_speedup if precision in self.mixed_precision else 1.0

    def supports(self, precision: str) -> bool:
        return precision == "fp32" or precision in self.mixed_precision

    @classmethod
    def from_dict(cls, data: Mapping[str, object], name: str | None = None) -> Device:
        """A device described by hand (a fleet file's ``devices`` table, a test), named ``name``.

        Memory: ``memory_bytes``, ``memory_gb`` (10^9) or ``memory_gib`` (2^30); speed:
        ``throughput_flops`` or ``seconds_per_flop`` (both may be absent: memory only);
        ``mixed_precision``: ``true`` or a list of precisions (non-empty = available);
        ``mixed_speedup`` or ``mixed_precision_speedup``.
        """
        fields: dict[str, Any] = dict(data)
        label = str(fields.pop("name", name or "?"))
        known = {
            "memory_bytes",
            "memory_gb",
            "memory_gib",
            "throughput_flops",
            "seconds_per_flop",
            "headroom",
            "mixed_precision",
            "mixed_speedup",
            "mixed_precision_speedup",
        }
        if unknown := sorted(set(fields) - known):
            raise ValueError(f"device {label!r}: unknown fields {unknown} (known: {sorted(known)})")
        try:
            if "memory_gb" in fields:
                fields["memory_bytes"] = float(fields.pop("memory_gb")) * 1e9
            if "memory_gib" in fields:
                fields["memory_bytes"] = float(fields.pop("memory_gib")) * 2**30
            throughput = fields.get("throughput_flops")
            if "seconds_per_flop" in fields:
                throughput = 1.0 / float(fields.pop("seconds_per_flop"))
            mixed = fields.get("mixed_precision", False)
            precisions = (
                tuple(str(p) for p in mixed) if isinstance(mixed, (list, tuple)) else (("mixed",) if mixed else ())
            )
            return cls(
                id=label,
                name=label,
                memory_bytes=float(fields["memory_bytes"]),
                throughput_flops=None if throughput is None else float(throughput),
                headroom=float(fields.get("headroom", 0.2)),
                mixed_precision=precisions,
                mixed_precision_speedup=float(
                    fields.get(
                        "mixed_speedup",
                        fields.get("mixed_precision_speedup", 1.0),
                    )
                ),
            )
        except KeyError as missing:
            raise ValueError(f"device {label!r}: missing field {missing}") from None
        except (TypeError, ValueError, ZeroDivisionError) as bad:
            raise ValueError(f"device {label!r}: {bad}") from None


def _local_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def device_from_entry(entry: dict[str, Any], origin: str) -> Device:
    """Validate one catalogue entry; errors name the file and the field."""
    where = f"{origin}: device {entry.get('id', '?')!r}"
    for key in _REQUIRED:
        if key not in entry:
            raise ValueError(f"{where}: missing field {key!r}")
    headroom = float(entry["headroom"])
    if not 0.0 <= headroom < 1.0:
        raise ValueError(f"{where}: headroom must be in [0, 1), got {headroom}")
    memory = entry.get("memory_gib")
    if memory == "auto":  # the machine we run on
        memory_bytes = _local_memory_bytes()
    elif memory is None:
        memory_bytes = None
    else:
        if float(memory) <= 0:
            raise ValueError(f"{where}: memory_gib must be > 0")
        memory_bytes = int(float(memory) * GIB)
    throughput = entry.get("throughput_gflops")
    calibration = entry.get("calibration")
    if throughput is None and calibration:
        for key in ("seconds_per_batch", "train_gflops"):
            if not isinstance(calibration.get(key), (int, float)) or calibration[key] <= 0:
                raise ValueError(f"{where}: calibration.{key} must be a positive number")
        throughput = calibration["train_gflops"] / calibration["seconds_per_batch"]
    if throughput is not None and float(throughput) <= 0:
        raise ValueError(f"{where}: throughput_gflops must be > 0")
    speedup = float(entry.get("mixed_precision_speedup", 1.0))
    if speedup <= 0:
        raise ValueError(f"{where}: mixed_precision_speedup must be > 0")
    mixed = tuple(entry.get("mixed_precision", ()))
    for precision in mixed:
        if precision not in ("bf16", "fp16"):
            raise ValueError(f"{where}: mixed_precision entries must be bf16/fp16, got {precision!r}")
    known = {
        "id",
        "name",
        "class",
        "memory_gib",
        "headroom",
        "mixed_precision",
        "mixed_precision_speedup",
        "throughput_gflops",
        "calibration",
        "source",
    }
    return Device(
        id=str(entry["id"]),
        name=str(entry["name"]),
        device_class=str(entry["class"]),
        memory_bytes=memory_bytes,
        headroom=headroom,
        mixed_precision=mixed,
        mixed_precision_speedup=speedup,
        throughput_flops=None if throughput is None else float(throughput) * 1e9,
        calibration=calibration,
        source=str(entry.get("source", "")),
        extra={k: v for k, v in entry.items() if k not in known},
    )


def _read_entries(path: Path | None) -> tuple[list[dict[str, Any]], str]:
    if path is None:
        text = resources.files("fedspeech.profiling").joinpath(PACKAGED).read_text(encoding="utf-8")
        origin = f"packaged {PACKAGED}"
    else:
        if not path.is_file():
            raise FileNotFoundError(f"device catalogue {path} does not exist")
        text, origin = path.read_text(encoding="utf-8"), str(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{origin}: not valid JSON ({error})") from None
    entries = data.get("devices") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{origin}: expected an object with a 'devices' list")
    return entries, origin


def load_catalogue(extra_files: list[Path] | tuple[Path, ...] = (), include_user: bool = True) -> dict[str, Device]:
    """Packaged devices, then the user catalogue (if present), then ``extra_files``."""
    layers: list[Path | None] = [None]
    if include_user and DEFAULT_USER_CATALOGUE.is_file():
        layers.append(DEFAULT_USER_CATALOGUE)
    layers.extend(Path(p) for p in extra_files)
    merged: dict[str, tuple[dict[str, Any], str]] = {}
    for path in layers:
        entries, origin = _read_entries(path)
        for entry in entries:
            if not isinstance(entry, dict) or "id" not in entry:
                raise ValueError(f"{origin}: every device needs an 'id'")
            previous = merged.get(entry["id"], ({}, origin))[0]
            merged[entry["id"]] = ({**previous, **entry}, origin)
    return {key: device_from_entry(entry, origin) for key, (entry, origin) in merged.items()}


def select_devices(catalogue: dict[str, Device], names: list[str] | None) -> list[Device]:
    """Devices by id or (case-insensitive) name; all of them when ``names`` is empty."""
    if not names:
        return list(catalogue.values())
    chosen = []
    for wanted in names:
        match = catalogue.get(wanted) or next((d for d in catalogue.values() if d.name.lower() == wanted.lower()), None)
        if match is None:
            raise ValueError(f"unknown device {wanted!r}; known: {', '.join(catalogue)}")
        chosen.append(match)
    return chosen


def write_user_entry(path: Path, entry: dict[str, Any]) -> None:
    """Add or replace one device in a user catalogue file (created if missing)."""
    data: dict[str, Any] = {"devices": []}
    if path.is_file():
        entries, _ = _read_entries(path)
        data["devices"] = [e for e in entries if e.get("id") != entry["id"]]
    data["devices"].append(entry)
    device_from_entry(entry, str(path))  # refuse to write what we could not read back
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
