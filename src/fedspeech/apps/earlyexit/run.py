"""Run the early-exit app with a chosen runner, one mode or the method and its baselines.

``inprocess`` drives the app in this process (no Ray); ``simulation`` runs the very same
``client_app``/``server_app`` under Flower's Simulation Engine from a small generated Flower app folder
(``OUT/flwr-app/pyproject.toml``: the repository's own pyproject.toml is the pretraining
app); ``deployment`` runs it under Flower's Deployment Engine on this machine (a SuperLink
and one SuperNode per client on loopback, TLS, SuperNode authentication), each SuperNode
told its partition, and optionally its ``device`` and ``max-depth``, by ``--node-config``,
as on real machines. Across machines, start the SuperLink and SuperNodes by hand
(docs/deployment.md) and ``flwr run`` that folder.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING

from fedspeech.apps.earlyexit.settings import MODES, EarlyExitSettings
from fedspeech.data.partition import Partition
from fedspeech.federated import roundlog
from fedspeech.federated.runners import check_runner

if TYPE_CHECKING:
    from fedspeech.federated.engines import DeploymentCluster

log = logging.getLogger(__name__)

APP_COMPONENTS = {
    "serverapp": "fedspeech.apps.earlyexit.server_app:server_app",
    "clientapp": "fedspeech.apps.earlyexit.client_app:client_app",
}


def write_flower_app(folder: str | Path, settings: EarlyExitSettings) -> Path:
    """A Flower app folder whose components are this package's early-exit apps and whose
    ``[tool.flwr.app.config]`` holds ``settings`` (so ``flwr run FOLDER`` runs them)."""
    from fedspeech.federated.engines import write_app_folder

    return write_app_folder(
        Path(folder),
        "fedspeech-early-exit",
        "fedspeech federated early-exit fine-tuning",
        APP_COMPONENTS,
        settings.to_run_config(),
    )


def _absolute(settings: EarlyExitSettings) -> EarlyExitSettings:
    """Engines run the apps in other processes and folders: give them absolute paths."""

    def resolve(path: str) -> str:
        return str(Path(path).resolve()) if path else path

    model = settings.model if not Path(settings.model).is_dir() else resolve(settings.model)
    fleet = resolve(settings.fleet) if Path(settings.fleet).is_file() else settings.fleet
    return dataclasses.replace(
        settings,
        manifest=resolve(settings.manifest),
        partition=resolve(settings.partition),
        out_dir=resolve(settings.out_dir),
        catalogue=resolve(settings.catalogue),
        model=model,
        fleet=fleet,
    )


def deployment_cluster(
    settings: EarlyExitSettings, node_configs: list[dict] | None = None, workdir: str | Path | None = None
) -> DeploymentCluster:
    """A loopback Deployment Engine (TLS, SuperNode authentication) with one SuperNode per
    client of ``settings.partition``; each SuperNode's node config names its manifest and
    partition, plus ``node_configs[i]`` (e.g. ``device``, ``max-depth``). Not started: use
    it as a context manager, and run any number of modes on it (``run_early_exit(...,
    cluster=...)``)."""
    from fedspeech.federated.engines import DeploymentCluster

    settings = _absolute(settings)
    num_clients = Partition.load(settings.partition).num_clients
    if node_configs is not None and len(node_configs) != num_clients:
        raise ValueError(f"node_configs: {len(node_configs)} entries for {num_clients} clients")
    nodes = [
        {"manifest": settings.manifest, "partition": settings.partition, **(node_configs or [{}] * num_clients)[i]}
        for i in range(num_clients)
    ]
    return DeploymentCluster(
        Path(workdir or Path(settings.out_dir) / "deployment"),
        num_clients,
        node_configs=nodes,
        tls=True,
        supernode_auth=True,
        startup_timeout=300,
    )


def run_early_exit(
    settings: EarlyExitSettings,
    runner: str = "inprocess",
    node_configs: list[dict] | None = None,
    timeout: float = 3600.0,
    cluster: DeploymentCluster | None = None,
) -> list[dict]:
    """Run one mode; returns its round log. ``node_configs`` (in-process and deployment) may
    give each client a ``device`` or a ``max-depth`` of its own. ``cluster``: a started
    :func:`deployment_cluster` to run on (deployment only; else one is started and stopped)."""
    if not settings.manifest or not settings.partition:
        raise ValueError("--manifest and --partition are required (make a partition with `fedspeech partition`)")
    check_runner(runner)
    if cluster is not None and runner != "deployment":
        raise ValueError("cluster: only the deployment runner runs on a cluster")
    num_clients = Partition.load(settings.partition).num_clients
    if runner == "inprocess":
        from fedspeech.apps.earlyexit.client_app import client_app
        from fedspeech.apps.earlyexit.server_app import server_app
        from fedspeech.federated.inprocess import run_inprocess

        if node_configs is not None:
            node_configs = [{"partition-id": i, "num-partitions": num_clients, **c} for i, c in enumerate(node_configs)]
        run_inprocess(server_app, client_app, num_clients, settings.to_run_config(), node_configs)
        return roundlog.read_rounds(settings.out_dir)

    settings = _absolute(settings)
    out = Path(settings.out_dir)
    app_dir = write_flower_app(out / "flwr-app", settings)
    if runner == "simulation":
        from fedspeech.federated.engines import run_simulation

        if node_configs is not None:
            raise ValueError("node_configs: the Simulation Engine gives nodes only partition ids; use the fleet")
        run_simulation(app_dir, settings.to_run_config(), num_clients, flwr_home=out / "flwr-home", timeout=timeout)
    else:
        with ExitStack() as stack:
            if cluster is None:
                cluster = stack.enter_context(deployment_cluster(settings, node_configs))
            elif node_configs is not None:
                raise ValueError("node_configs: a running cluster has its SuperNodes' configs already")
            cluster.run(app_dir, settings.to_run_config(), timeout=timeout)
    return roundlog.read_rounds(settings.out_dir)


def run_modes(
    settings: EarlyExitSettings,
    modes: Sequence[str] = MODES,
    runner: str = "inprocess",
    timeout: float = 3600.0,
    node_configs: list[dict] | None = None,
) -> dict[str, list[dict]]:
    """Run each mode with otherwise identical settings into ``OUT/<mode>`` (under the
    Deployment Engine, all on one cluster started once)."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"modes: unknown {unknown} (choose from {', '.join(MODES)})")
    results = {}
    with ExitStack() as stack:
        cluster = None
        if runner == "deployment":
            workdir = Path(settings.out_dir) / "deployment"
            cluster = stack.enter_context(deployment_cluster(settings, node_configs, workdir))
            node_configs = None
        for mode in modes:
            mode_settings = dataclasses.replace(settings, mode=mode, out_dir=str(Path(settings.out_dir) / mode))
            log.info("running mode %s into %s", mode, mode_settings.out_dir)
            results[mode] = run_early_exit(mode_settings, runner, node_configs, timeout=timeout, cluster=cluster)
    return results
