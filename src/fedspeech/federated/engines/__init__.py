"""Run a Flower app under Flower's own engines, from Python, and clean up after it.

- ``run_simulation`` / ``LocalSimulation``: the Simulation Engine (``flwr run APP local``
  against a local simulation SuperLink, Ray backend).
- ``DeploymentCluster``: the Deployment Engine on this machine: one ``flower-superlink`` and
  N ``flower-supernode`` processes on 127.0.0.1, optionally with TLS and SuperNode
  authentication, each SuperNode with its own ``--node-config``.

Both drive the real ``flwr`` CLI (what an operator types, see docs/deployment.md) and add
what it leaves to the caller (Flower 1.41, see docs/flower.md):

- the outcome: ``flwr run --stream`` exits 0 even when the ServerApp raised, so the run's
  status is read back with ``flwr list --format json`` and anything but
  ``finished:completed`` raises ``EngineError`` with the log tail;
- the processes: the SuperLink starts a detached SuperExec, which starts the ServerApp
  (and Ray's daemons and actors under simulation). Every process we start carries a unique
  ``FEDSPEECH_ENGINE_TAG`` environment variable, which all its descendants inherit, so on
  exit we terminate exactly those processes (found by their id via /proc) and nothing else;
- offline operation: runtime dependency installation, update checks and telemetry are off.

Modules, one job each: ``app_folder`` (Flower app folders and run configs), ``processes``
(the tagged ``flwr``/SuperLink/SuperNode processes, the run outcome), ``simulation`` and
``deployment`` (the two engines). Their public names are re-exported here.
"""

from fedspeech.federated.engines.app_folder import (
    app_config,
    node_config_arg,
    project_app_dir,
    write_app_folder,
    write_run_config,
)
from fedspeech.federated.engines.deployment import DeploymentCluster
from fedspeech.federated.engines.processes import (
    COMPLETED,
    TAG_VARIABLE,
    EngineError,
    RunResult,
    SimulationResult,
    TaggedProcesses,
    free_port,
    port_in_use,
    tagged_pids,
)
from fedspeech.federated.engines.simulation import LocalSimulation, run_simulation

__all__ = [
    "COMPLETED",
    "TAG_VARIABLE",
    "DeploymentCluster",
    "EngineError",
    "LocalSimulation",
    "RunResult",
    "SimulationResult",
    "TaggedProcesses",
    "app_config",
    "free_port",
    "node_config_arg",
    "port_in_use",
    "project_app_dir",
    "run_simulation",
    "tagged_pids",
    "write_app_folder",
    "write_run_config",
]
