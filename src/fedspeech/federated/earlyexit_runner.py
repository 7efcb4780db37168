"""Run the early-exit app with a chosen runner, one mode or the method and its baselines.

``inprocess`` drives the app in this process (no Ray); ``simulation`` runs the very same
``earlyexit_app`` under Flower's Simulation Engine from a small generated Flower app folder
(``OUT/flwr-app/pyproject.toml``: the repository's own pyproject.toml is the pretraining
app). Under the Deployment Engine, start a SuperLink and SuperNodes yourself (each
SuperNode may say ``--node-config "device='raspberry-pi-4'"``) and ``flwr run`` that folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from fedspeech.data.partition import Partition
from fedspeech.federated import roundlog
from fedspeech.federated.earlyexit_settings import MODES, EarlyExitSettings

log = logging.getLogger(__name__)

RUNNERS = ("inprocess", "simulation")
APP_COMPONENTS = {"serverapp": "fedspeech.federated.earlyexit_app:server_app",
                  "clientapp": "fedspeech.federated.earlyexit_app:client_app"}


def write_flower_app(folder: str | Path, settings: EarlyExitSettings) -> Path:
    """A Flower app folder whose components are this package's early-exit apps and whose
    ``[tool.flwr.app.config]`` holds ``settings`` (so ``flwr run FOLDER`` runs them)."""
    from fedspeech.federated.engines import write_app_folder

    return write_app_folder(Path(folder), "fedspeech-early-exit", "fedspeech federated early-exit fine-tuning",
                            APP_COMPONENTS, settings.to_run_config())


def _absolute(settings: EarlyExitSettings) -> EarlyExitSettings:
    """Engines run the apps in other processes and folders: give them absolute paths."""
    def resolve(path: str) -> str:
        return str(Path(path).resolve()) if path else path

    model = settings.model if not Path(settings.model).is_dir() else resolve(settings.model)
    return dataclasses.replace(settings, manifest=resolve(settings.manifest), partition=resolve(settings.partition),
                               out_dir=resolve(settings.out_dir), catalogue=resolve(settings.catalogue), model=model)


def run_early_exit(settings: EarlyExitSettings, runner: str = "inprocess",
                   node_configs: list[dict] | None = None, timeout: float = 3600.0) -> list[dict]:
    """Run one mode; returns its round log. ``node_configs`` (in-process only) may give
    each client a ``device`` or a ``max-depth`` of its own."""
    if not settings.manifest or not settings.partition:
        raise ValueError("--manifest and --partition are required (make a partition with `fedspeech partition`)")
    num_clients = Partition.load(settings.partition).num_clients
    if runner == "inprocess":
        from fedspeech.federated import earlyexit_app
        from fedspeech.federated.inprocess import run_inprocess

        if node_configs is not None:
            node_configs = [{"partition-id": i, "num-partitions": num_clients, **c} for i, c in enumerate(node_configs)]
        run_inprocess(earlyexit_app.server_app, earlyexit_app.client_app, num_clients, settings.to_run_config(),
                      node_configs)
    elif runner == "simulation":
        from fedspeech.federated.engines import run_simulation

        if node_configs is not None:
            raise ValueError("node_configs: the Simulation Engine gives nodes only partition ids; use the fleet")
        settings = _absolute(settings)
        out = Path(settings.out_dir)
        app_dir = write_flower_app(out / "flwr-app", settings)
        run_simulation(app_dir, settings.to_run_config(), num_clients, flwr_home=out / "flwr-home", timeout=timeout)
    else:
        raise ValueError(f"runner: unknown {runner!r} ({', '.join(RUNNERS)})")
    return roundlog.read_rounds(settings.out_dir)


def run_modes(settings: EarlyExitSettings, modes: Sequence[str] = MODES, runner: str = "inprocess",
              timeout: float = 3600.0) -> dict[str, list[dict]]:
    """Run each mode with otherwise identical settings into ``OUT/<mode>``."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: unknown {unknown} (choose from {', '.join(MODES)})")
    results = {}
    for mode in modes:
        mode_settings = dataclasses.replace(settings, mode=mode, out_dir=str(Path(settings.out_dir) / mode))
        log.info("running mode %s into %s", mode, mode_settings.out_dir)
        results[mode] = run_early_exit(mode_settings, runner, timeout=timeout)
    return results
