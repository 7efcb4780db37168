"""Flower's Simulation Engine from Python: ``flwr run APP local`` against a local simulation
SuperLink (Ray backend), with the outcome checked and every process cleaned up."""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

from fedspeech.federated.engines.processes import (
    LOCAL_CONNECTION,
    EngineError,
    RunResult,
    TaggedProcesses,
    free_port,
    port_in_use,
    submit_and_wait,
    wait_healthy,
    write_connection,
)

log = logging.getLogger(__name__)


class LocalSimulation:
    """Flower's Simulation Engine on this machine, for one or more runs.

    ``flwr`` would start the local simulation SuperLink itself (detached, 15 s start-up
    limit, on fixed ports 39091/39093) and leave it running. We start the very same command
    ourselves instead, on free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` /
    ``FLWR_LOCAL_CONTROL_API_PORT`` tell ``flwr`` where it is), so runs of different users
    or tests never share or kill each other's SuperLink, a slow machine gets a longer
    start-up, and on exit we stop it with the SuperExec, ServerApps and Ray processes.
    """

    def __init__(
        self,
        flwr_home: Path,
        num_supernodes: int,
        *,
        num_cpus_per_client: float = 1,
        port: int | None = None,
        startup_timeout: float = 120.0,
        federation_config: dict[str, Any] | None = None,
    ):
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if num_cpus_per_client < 1 or num_cpus_per_client != int(num_cpus_per_client):
            # Flower 1.41's federation config holds client-resources-num-cpus as uint32.
            raise ValueError(
                f"num_cpus_per_client must be a whole number >= 1 (Flower 1.41 "
                f"accepts no fractions), got {num_cpus_per_client}"
            )
        if port is not None and port_in_use(port):
            raise EngineError(
                f"port {port} is taken (a local SuperLink already running?); "
                "stop it or leave port=None to use a free one"
            )
        self.flwr_home = Path(flwr_home).resolve()
        self.num_supernodes = num_supernodes
        self.num_cpus_per_client = num_cpus_per_client
        self.port = port or free_port()
        self.control_port = free_port()
        self.startup_timeout = startup_timeout
        self.tag = ""  # FEDSPEECH_ENGINE_TAG of every process this instance starts
        self.federation_config = {
            "num-supernodes": num_supernodes,
            "client-resources-num-cpus": int(num_cpus_per_client),
            **(federation_config or {}),
        }
        self._processes: TaggedProcesses | None = None
        self._ray_tmp: Path | None = None

    def start(self) -> LocalSimulation:
        runtime = self.flwr_home / "local-superlink"
        runtime.mkdir(parents=True, exist_ok=True)
        write_connection(self.flwr_home, LOCAL_CONNECTION, {"address": ":local:"})
        processes = self._processes = TaggedProcesses(self.flwr_home, runtime)
        self.tag = processes.tag
        processes.env["FLWR_LOCAL_SUPERLINK_HTTP_API_PORT"] = str(self.port)
        processes.env["FLWR_LOCAL_CONTROL_API_PORT"] = str(self.control_port)
        # Ray's sessions in a private, short (socket paths are limited to ~107 bytes) temp
        # dir: no clash with other Ray users' /tmp/ray, and removed on exit.
        self._ray_tmp = Path(tempfile.mkdtemp(prefix="fsray-", dir="/tmp" if Path("/tmp").is_dir() else None))
        processes.env["RAY_TMPDIR"] = str(self._ray_tmp)
        try:
            # The command flwr.cli.local_superlink uses, with our ports.
            processes.start(
                "superlink",
                [
                    str(Path(sys.executable).parent / "flower-superlink"),
                    "--insecure",
                    "--simulation",
                    "--isolation",
                    "subprocess",
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(self.port),
                    "--control-api-address",
                    f"127.0.0.1:{self.control_port}",
                    # In memory (no --database): a fresh run history each time, nothing left behind.
                ],
            )
            wait_healthy(processes, "superlink", f"http://127.0.0.1:{self.port}/health", self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, app_dir: Path, run_config: dict[str, Any], timeout: float, *, check: bool = True) -> RunResult:
        """Run the app once under simulation; raises ``EngineError`` unless it completed
        (``check=False`` returns the failed result instead)."""
        if self._processes is None:
            raise RuntimeError("LocalSimulation.run() outside `with` (or before start())")
        federation = " ".join(f"{k}={json.dumps(v)}" for k, v in self.federation_config.items())
        return submit_and_wait(
            self._processes, LOCAL_CONNECTION, app_dir, run_config, timeout, ["--federation-config", federation], check
        )

    def stop(self) -> None:
        if self._processes is not None:
            self._processes.stop_all()
            self._processes = None
        if self._ray_tmp is not None:
            shutil.rmtree(self._ray_tmp, ignore_errors=True)
            self._ray_tmp = None

    def __enter__(self) -> LocalSimulation:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def run_simulation(
    app_dir: Path,
    run_config: dict[str, Any],
    num_supernodes: int,
    *,
    flwr_home: Path,
    num_cpus_per_client: float = 1,
    timeout: float,
) -> RunResult:
    """Run a Flower app once under the Simulation Engine (Ray) and return its result.

    Raises ``EngineError`` (with the log tail) unless the run finished completed; always
    stops the SuperLink, SuperExec, ServerApp and Ray processes it started.
    """
    with LocalSimulation(flwr_home, num_supernodes, num_cpus_per_client=num_cpus_per_client) as sim:
        return sim.run(app_dir, run_config, timeout)
