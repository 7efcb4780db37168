"""Flower's Deployment Engine on this machine: one ``flower-superlink`` and N
``flower-supernode`` processes on 127.0.0.1, optionally with TLS and SuperNode
authentication, each SuperNode with its own ``--node-config``."""

from __future__ import annotations

import logging
import os
import signal
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, cast

from fedspeech.federated.engines.app_folder import node_config_arg
from fedspeech.federated.engines.processes import (
    CLUSTER_CONNECTION,
    EngineError,
    RunResult,
    TaggedProcesses,
    descendants,
    file_tail,
    free_port,
    parse_json_output,
    submit,
    submit_and_wait,
    tail,
    wait_healthy,
    write_connection,
)
from fedspeech.federated.tls import Certificates, make_self_signed_certs, make_supernode_keys

log = logging.getLogger(__name__)


class DeploymentCluster:
    """Flower's Deployment Engine on loopback: a SuperLink and ``num_supernodes``
    SuperNodes, each with its own ``--node-config``.

    ``tls=True`` generates a CA and server certificate (or pass ``certificates``);
    ``supernode_auth=True`` (needs TLS) generates one key pair per SuperNode, registers the
    public keys with ``flwr supernode register`` and starts the SuperLink with
    ``--enable-supernode-auth``, so only those SuperNodes may join. Use as a context
    manager: every process is terminated on exit, also after errors.

    The SuperLink keeps its state in memory unless ``database=True`` (SQLite file in
    ``workdir``): on a saturated 2-core machine the SQLite state timed out on its lock
    ("database is locked", HTTP 500) while SuperNodes pushed model-sized replies, which
    killed the ServerApp; the in-memory state has no such lock.
    """

    def __init__(
        self,
        workdir: Path,
        num_supernodes: int,
        *,
        node_configs: list[dict[str, Any]] | None = None,
        tls: bool = False,
        certificates: Certificates | None = None,
        supernode_auth: bool = False,
        database: bool = False,
        startup_timeout: float = 120.0,
    ):
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if node_configs is not None and len(node_configs) != num_supernodes:
            raise ValueError(f"node_configs has {len(node_configs)} entries for {num_supernodes} SuperNodes")
        self.workdir = Path(workdir).resolve()
        self.num_supernodes = num_supernodes
        self.tls = tls or certificates is not None
        if supernode_auth and not self.tls:
            raise ValueError("SuperNode authentication needs TLS (Flower refuses it with --insecure)")
        self.supernode_auth = supernode_auth
        self.database = database
        self.certificates = certificates
        self.startup_timeout = startup_timeout
        self.node_configs = [
            {"partition-id": i, "num-partitions": num_supernodes, **(node_configs[i] if node_configs else {})}
            for i in range(num_supernodes)
        ]
        self._node_args = [node_config_arg(c) for c in self.node_configs]  # bad values fail here
        self.flwr_home = self.workdir / "flwr-home"
        self.port: int | None = None
        self.node_ids: list[int] = []  # registered ids (SuperNode authentication only)
        self.tag = ""  # FEDSPEECH_ENGINE_TAG of every process this instance starts
        self._processes: TaggedProcesses | None = None

    @property
    def address(self) -> str:
        if self.port is None:
            raise RuntimeError("the cluster is not started")
        return f"127.0.0.1:{self.port}"

    def log_path(self, name: str) -> Path:
        """Log of ``superlink`` or ``supernode-I``."""
        return self.workdir / "logs" / f"{name}.log"

    def _tls_args(self, role: str) -> list[str]:
        if not self.tls:
            return ["--insecure"]
        assert self.certificates is not None
        if role == "superlink":
            return [
                "--ssl-ca-certfile",
                str(self.certificates.ca_cert),
                "--ssl-certfile",
                str(self.certificates.server_cert),
                "--ssl-keyfile",
                str(self.certificates.server_key),
            ]
        return ["--root-certificates", str(self.certificates.ca_cert)]

    def _database(self) -> Path:
        return self.workdir / "superlink-state.db"

    def _start_superlink(self) -> None:
        """Start the SuperLink on ``self.port`` and wait until it answers its health check."""
        assert self._processes is not None
        self._processes.start(
            "superlink",
            [
                str(Path(sys.executable).parent / "flower-superlink"),
                *self._tls_args("superlink"),
                *(["--enable-supernode-auth"] if self.supernode_auth else []),
                "--isolation",
                "subprocess",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                *(["--database", str(self._database())] if self.database else []),
            ],
        )
        scheme = "https" if self.tls else "http"
        wait_healthy(
            self._processes,
            "superlink",
            f"{scheme}://{self.address}/health",
            self.startup_timeout,
            ca_file=cast(Certificates, self.certificates).ca_cert if self.tls else None,
        )

    def start(self) -> DeploymentCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        if self.database:
            self._database().unlink(missing_ok=True)  # runs are told apart from earlier ones by a fresh history
        if self.tls and self.certificates is None:
            self.certificates = make_self_signed_certs(self.workdir / "certs")
        self.port = free_port()
        connection: dict[str, Any] = {"address": self.address}
        if self.tls:
            assert self.certificates is not None  # made just above when TLS had none
            connection["root-certificates"] = str(Path(self.certificates.ca_cert).resolve())
        else:
            connection["insecure"] = True
        write_connection(self.flwr_home, CLUSTER_CONNECTION, connection)
        processes = self._processes = TaggedProcesses(self.flwr_home, self.workdir / "logs")
        self.tag, self.node_ids = processes.tag, []
        try:
            self._start_superlink()
            keys: list[Path | None] = [*self._register_all()] if self.supernode_auth else [None] * self.num_supernodes
            for i in range(self.num_supernodes):
                self.start_supernode(f"supernode-{i}", self._node_args[i], keys[i])
            self._wait_nodes_online()
        except BaseException:
            self.stop()
            raise
        return self

    def kill_superlink(self) -> None:
        """SIGKILL the SuperLink and every process it spawned (the ServerApp), as a crash of
        the server machine would; the SuperNodes keep running and retry the connection."""
        if self._processes is None:
            raise RuntimeError("start the cluster first")
        superlink = self._processes.children["superlink"]
        doomed = [superlink.pid, *descendants(superlink.pid)]
        for pid in doomed:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass  # already gone
        superlink.wait()

    def restart_superlink(self) -> None:
        """Start the SuperLink again on the same address and state database; the SuperNodes
        (Flower retries without limit by default) rejoin. Needs ``database=True``: an
        in-memory SuperLink would forget the registered SuperNode keys and every run."""
        if not self.database:
            raise ValueError("restart_superlink needs database=True (the state must outlive the SuperLink)")
        if self._processes is None:
            raise RuntimeError("start the cluster first")
        if self._processes.children["superlink"].poll() is None:
            raise RuntimeError("the SuperLink is still running: kill_superlink() first")
        self._start_superlink()
        self._wait_nodes_online()

    def submit(self, app_dir: Path, run_config: dict[str, Any]) -> int:
        """Submit the app with ``flwr run`` and return its run id without waiting for it."""
        if self._processes is None:
            raise RuntimeError("start the cluster first")
        return submit(self._processes, CLUSTER_CONNECTION, app_dir, run_config, self.startup_timeout)

    def stop_run(self, run_id: int) -> None:
        """``flwr stop RUN_ID`` (e.g. a run whose ServerApp died with the SuperLink)."""
        if self._processes is None:
            raise RuntimeError("start the cluster first")
        done = self._processes.cli(["stop", str(run_id), CLUSTER_CONNECTION], timeout=60.0)
        if done.returncode != 0:
            raise EngineError(f"`flwr stop {run_id}` failed:\n{tail(done.stdout + done.stderr)}")

    def start_supernode(self, name: str, node_config: str, private_key: Path | None = None) -> None:
        """Start one more SuperNode (``node_config`` as ``--node-config`` takes it), with this
        private key under SuperNode authentication; it joins only if its key is registered."""
        if self._processes is None:
            raise RuntimeError("start the cluster first")
        self._processes.start(
            name,
            [
                str(Path(sys.executable).parent / "flower-supernode"),
                *self._tls_args("supernode"),
                *(["--auth-supernode-private-key", str(private_key)] if private_key is not None else []),
                "--superlink",
                self.address,
                "--port",
                str(free_port()),
                "--node-config",
                node_config,
            ],
        )

    def _register_all(self) -> list[Path]:
        """Create a key pair per SuperNode and register the public keys with the SuperLink
        (concurrently: each `flwr` call is a Python start-up); returns each node's private key."""
        assert self._processes is not None
        processes = self._processes
        keys = [
            make_supernode_keys(self.workdir / "supernode-keys", f"supernode-{i}") for i in range(self.num_supernodes)
        ]
        commands = [["supernode", "register", str(k.public_key), CLUSTER_CONNECTION, "--format", "json"] for k in keys]
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            replies = list(pool.map(lambda c: processes.cli(c, timeout=self.startup_timeout), commands))
        for i, done in enumerate(replies):
            try:
                reply = parse_json_output(done.stdout)
            except ValueError:
                reply = {}
            if not reply.get("success"):
                raise EngineError(
                    f"`flwr supernode register` failed for SuperNode {i}: "
                    f"{reply.get('error-message') or tail(done.stdout + done.stderr)}"
                )
            self.node_ids.append(int(reply["node-id"]))
        return [Path(k.private_key) for k in keys]

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink reports online (``flwr supernode list``)."""
        assert self._processes is not None
        done = self._processes.cli(["supernode", "list", CLUSTER_CONNECTION, "--format", "json"], timeout=60.0)
        try:
            nodes = parse_json_output(done.stdout).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def _wait_nodes_online(self) -> None:
        assert self._processes is not None
        deadline = time.monotonic() + self.startup_timeout
        while True:
            for i in range(self.num_supernodes):
                self._processes.check_alive(f"supernode-{i}")
            online = self.online_nodes()
            if online >= self.num_supernodes:
                return
            if time.monotonic() > deadline:
                raise EngineError(
                    f"only {online}/{self.num_supernodes} SuperNodes online after "
                    f"{self.startup_timeout:.0f} s; supernode-0 log:\n"
                    f"{file_tail(self.log_path('supernode-0'))}"
                )
            time.sleep(1.0)

    def run(self, app_dir: Path, run_config: dict[str, Any], timeout: float, *, check: bool = True) -> RunResult:
        """Submit the app with ``flwr run`` and wait for it to finish; raises
        ``EngineError`` unless it completed (``check=False`` returns the result)."""
        if self._processes is None:
            raise RuntimeError("DeploymentCluster.run() outside `with` (or before start())")
        return submit_and_wait(self._processes, CLUSTER_CONNECTION, app_dir, run_config, timeout, [], check)

    def stop(self) -> None:
        if self._processes is not None:
            self._processes.stop_all()
            self._processes = None

    def __enter__(self) -> DeploymentCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
