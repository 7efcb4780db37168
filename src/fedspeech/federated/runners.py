"""The one list of runners every workload offers (import-free, for ``--help``)."""

from __future__ import annotations

#: in-process (Flower's Grid driven in this process), Flower's Simulation Engine, Flower's
#: Deployment Engine (SuperLink + SuperNodes on loopback here; on real machines by hand).
RUNNERS = ("inprocess", "simulation", "deployment")


def check_runner(runner: str, offered: tuple[str, ...] = RUNNERS) -> str:
    """``runner`` if the workload offers it; a ``ValueError`` naming the choices otherwise."""
    if runner not in offered:
        raise ValueError(f"runner: unknown {runner!r} (choose one of {', '.join(offered)})")
    return runner
