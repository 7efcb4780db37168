"""Run a Flower app under Flower's own engines, from Python, and clean up after it.

- ``run_simulation`` / ``LocalSimulation``: the Simulation Engine (``flwr run APP local``
  against a local simulation SuperLink, Ray backend).
- ``DeploymentCluster``: the Deployment Engine on this machine: one ``flower-superlink`` and
  N ``flower-supernode`` processes on 127.0.0.1, optionally with TLS and SuperNode
  authentication, each SuperNode with its own ``--node-config``.

Both drive the real ``flwr`` CLI (what an operator types, see docs/deployment.md) and add
what it leaves to the caller (Flower 1.41, see ../shared/docs/FLOWER.md):

- the outcome: ``flwr run --stream`` exits 0 even when the ServerApp raised, so the run's
  status is read back with ``flwr list --format json`` and anything but
  ``finished:completed`` raises ``EngineError`` with the log tail;
- the processes: the SuperLink starts a detached SuperExec, which starts the ServerApp
  (and Ray's daemons and actors under simulation). Every process we start carries a unique
  ``FEDSPEECH_ENGINE_TAG`` environment variable, which all its descendants inherit, so on
  exit we terminate exactly those processes (found by their id via /proc) and nothing else;
- offline operation: runtime dependency installation, update checks and telemetry are off.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedspeech.federated.tls import Certificates, make_self_signed_certs, make_supernode_keys

log = logging.getLogger(__name__)

TAG_VARIABLE = "FEDSPEECH_ENGINE_TAG"
LOCAL_CONNECTION = "fedspeech-local"  # names in FLWR_HOME/config.toml
CLUSTER_CONNECTION = "fedspeech-cluster"
COMPLETED = "finished:completed"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_SCALARS = (bool, int, float, str)


class EngineError(RuntimeError):
    """A Flower engine failed to start, or a run did not complete; the message carries
    the status and the tail of the relevant log."""


@dataclass
class RunResult:
    """Outcome of one ``flwr run``, as the SuperLink recorded it."""

    run_id: int
    status: str  # "finished:completed", "finished:failed", "finished:stopped", ...
    details: str  # Flower's status details, e.g. the ServerApp's exception
    seconds: float  # wall time from submission until the run finished
    log: str  # the run's log (ServerApp side), ANSI colours removed
    info: dict = field(default_factory=dict)  # the run's row of `flwr list --format json`

    @property
    def ok(self) -> bool:
        return self.status == COMPLETED


# Same record for both engines; the name the simulation API was specified with.
SimulationResult = RunResult


# ----------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def _tail(text: str, lines: int = 40) -> str:
    return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])


def _file_tail(path: Path, lines: int = 40) -> str:
    try:
        return _tail(path.read_text(errors="replace"), lines)
    except OSError:
        return f"(no log at {path})"


def app_config(app_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of a Flower app, with a clear error if the
    folder is not a Flower app."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject}: not found; a Flower app folder needs a pyproject.toml")
    with pyproject.open("rb") as f:
        data = tomllib.load(f)
    app = data.get("tool", {}).get("flwr", {}).get("app")
    if not isinstance(app, dict) or "components" not in app:
        raise ValueError(f"{pyproject}: no [tool.flwr.app.components] table, so not a Flower app")
    return dict(app.get("config", {}))


def project_app_dir() -> Path:
    """The fedspeech Flower app folder: the source checkout's root, whose pyproject.toml
    holds ``[tool.flwr.app]`` (``flwr run`` packs an app from a folder, not a package)."""
    root = Path(__file__).resolve().parents[3]
    try:
        app_config(root)
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(f"fedspeech is not installed from a source checkout ({exc}); "
                                "pass the checkout folder as the app folder") from None
    return root


def write_app_folder(folder: Path, name: str, description: str, components: dict[str, str],
                     run_config: dict[str, Any]) -> Path:
    """A Flower app folder (a ``pyproject.toml`` only) whose components are importable
    ``module:object`` names of this package and whose ``[tool.flwr.app.config]`` is
    ``run_config``, so ``flwr run FOLDER`` runs a workload other than the checkout's own
    app (the repository's ``pyproject.toml`` declares the pretraining app)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {"name": name, "version": "0.1.0", "license": "Apache-2.0", "description": description,
                    "dependencies": []},
        "tool": {"flwr": {"app": {"publisher": "fedspeech", "components": components, "config": run_config}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(document))
    return folder


def write_run_config(path: Path, run_config: dict[str, Any], app_dir: Path) -> Path:
    """Write run-config overrides as the TOML file ``flwr run --run-config`` reads.

    ``flwr`` only accepts keys that exist in the app's ``[tool.flwr.app.config]``; we check
    first so the error names the key and the file instead of a CLI traceback.
    """
    known = app_config(app_dir)
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise ValueError(f"run_config keys {unknown} are not in [tool.flwr.app.config] of "
                         f"{Path(app_dir) / 'pyproject.toml'} (known: {sorted(known)})")
    for key, value in run_config.items():
        if not isinstance(value, _SCALARS):
            raise ValueError(f"run_config[{key!r}] = {value!r}: Flower run configs hold only "
                             "str, int, float or bool")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


def node_config_arg(config: dict[str, Any]) -> str:
    """Format a SuperNode's ``--node-config`` string.

    Strings are quoted (TOML literal strings): Flower splits the argument on spaces and
    reads an argument that ends in ``.toml`` as a file name, so an unquoted path would break.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"node config key {key!r}: use letters, digits, '-' or '_'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, str):
            if "'" not in value and "\n" not in value:
                text = f"'{value}'"
            elif '"' not in value and "\\" not in value and "\n" not in value:
                text = f'"{value}"'
            else:
                raise ValueError(f"node config {key}={value!r}: cannot quote a value holding both quote kinds")
        else:
            raise ValueError(f"node config {key}={value!r}: only str, int, float or bool")
        parts.append(f"{key}={text}")
    return " ".join(parts)


def _write_connection(flwr_home: Path, name: str, connection: dict[str, Any]) -> Path:
    """Add (or replace) SuperLink connection ``name`` in ``FLWR_HOME/config.toml``, keeping
    any other connections there (every ``flwr`` call names the connection explicitly)."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    path = flwr_home / "config.toml"
    data: dict[str, Any] = {}
    if path.is_file():
        try:
            data = tomllib.loads(path.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise ValueError(f"{path}: not valid TOML ({exc})") from None
    superlink = data.setdefault("superlink", {})
    superlink[name] = connection
    superlink.setdefault("default", name)
    path.write_text(tomli_w.dumps(data))
    return path


def _parse_json_output(stdout: str) -> dict:
    """The JSON object a ``flwr ... --format json`` printed (tolerating text before it)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON object in output")
    obj, _ = json.JSONDecoder().raw_decode(stdout[start:])
    return obj


# ----------------------------------------------------------------------------- processes


def tagged_pids(tag: str) -> list[int]:
    """Ids of the live processes whose environment holds ``FEDSPEECH_ENGINE_TAG=tag``
    (Linux /proc; only our own processes are readable)."""
    needle = f"{TAG_VARIABLE}={tag}".encode()
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:  # gone, or not ours
            continue
    return pids


def _is_zombie(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    return stat.rsplit(")", 1)[-1].split()[0] == "Z"


class TaggedProcesses:
    """The processes one engine instance started, and everything they spawned.

    ``start`` gives each child the environment ``flwr`` needs plus our tag; ``stop_all``
    sends SIGTERM to every tagged process, waits, then SIGKILLs what is left.
    """

    def __init__(self, flwr_home: Path, log_dir: Path):
        self.flwr_home = Path(flwr_home).resolve()
        self.log_dir = Path(log_dir)
        self.tag = uuid.uuid4().hex
        self.children: dict[str, subprocess.Popen] = {}
        self.seen_runs: set[str] = set()  # run ids already submitted to our SuperLink
        self._log_files: list[Any] = []
        self.env = self._make_env()

    def _make_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update({
            "FLWR_HOME": str(self.flwr_home),
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_TELEMETRY_ENABLED": "0",
            "RAY_USAGE_STATS_ENABLED": "0",  # offline: Ray would try to report usage
            TAG_VARIABLE: self.tag,
            # flwr starts flower-superexec, flwr-serverapp, flwr-clientapp by name.
            "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
        })
        return env

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path(name).open("ab")
        self._log_files.append(log_file)
        log.info("starting %s: %s", name, " ".join(command))
        process = subprocess.Popen(command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT,
                                   stdin=subprocess.DEVNULL)
        self.children[name] = process
        return process

    def check_alive(self, name: str) -> None:
        process = self.children[name]
        if process.poll() is not None:
            raise EngineError(f"{name} exited with code {process.returncode}; log "
                              f"{self.log_path(name)}:\n{_file_tail(self.log_path(name))}")

    def cli(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` with our environment (and tag: a CLI can start a SuperLink)."""
        command = [str(Path(sys.executable).parent / "flwr"), *args]
        log.debug("running %s", " ".join(command))
        try:
            return subprocess.run(command, env=self.env, capture_output=True, text=True,
                                  timeout=max(timeout, 1.0), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired as exc:  # run() has killed it; output is bytes here
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            raise EngineError(f"`flwr {' '.join(args)}` did not return within {timeout:.0f} s\n"
                              f"{_tail(out)}") from None

    def stop_all(self, grace: float = 10.0) -> None:
        """Terminate every process we started or that descends from them."""
        for process in self.children.values():
            if process.poll() is None:
                process.terminate()
        self._signal_tagged(signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and self._alive():
            time.sleep(0.2)
        if self._alive():
            leftovers = self._signal_tagged(signal.SIGKILL)
            for process in self.children.values():
                if process.poll() is None:
                    process.kill()
            log.warning("killed %d engine processes that ignored SIGTERM for %.0f s", leftovers, grace)
            deadline = time.monotonic() + 5.0
            while time.monotonic() < deadline and self._alive():
                time.sleep(0.1)
        for process in self.children.values():
            try:
                process.wait(timeout=1.0)
            except subprocess.TimeoutExpired:
                log.warning("process %s did not exit", process.pid)
        for log_file in self._log_files:
            log_file.close()
        self._log_files.clear()
        if remaining := self._alive():
            log.warning("engine processes still alive after stop: %s", remaining)

    def _alive(self) -> list[int]:
        own = [p.pid for p in self.children.values() if p.poll() is None]
        return sorted(set(own) | {pid for pid in tagged_pids(self.tag) if not _is_zombie(pid)})

    def _signal_tagged(self, sig: signal.Signals) -> int:
        count = 0
        for pid in tagged_pids(self.tag):
            try:
                os.kill(pid, sig)
                count += 1
            except OSError:
                pass
        return count


def _wait_healthy(processes: TaggedProcesses, name: str, url: str, timeout: float,
                  ca_file: Path | None = None) -> None:
    """Poll a SuperLink's ``/health`` endpoint until it answers (or its process dies)."""
    handlers: list[urllib.request.BaseHandler] = [urllib.request.ProxyHandler({})]  # loopback: no proxy
    if ca_file:
        handlers.append(urllib.request.HTTPSHandler(context=ssl.create_default_context(cafile=str(ca_file))))
    opener = urllib.request.build_opener(*handlers)
    deadline = time.monotonic() + timeout
    while True:
        processes.check_alive(name)
        try:
            with opener.open(url, timeout=2.0) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        if time.monotonic() > deadline:
            raise EngineError(f"{name} not healthy at {url} after {timeout:.0f} s; log:\n"
                              f"{_file_tail(processes.log_path(name))}")
        time.sleep(0.5)


# ----------------------------------------------------------------------------- runs


def _submit_and_wait(processes: TaggedProcesses, connection: str, app_dir: Path,
                     run_config: dict[str, Any], timeout: float, extra_args: list[str],
                     check: bool) -> RunResult:
    """``flwr run --stream`` (returns when the run ends), then read the run's real status
    with ``flwr list``; stop the run if it outlives ``timeout``.

    The run is identified as the run on *our* SuperLink (fresh database) that we have not
    seen yet, so nothing depends on parsing ``flwr``'s human-readable output.
    """
    app_dir = Path(app_dir).resolve()
    start = time.monotonic()
    deadline = start + timeout
    overrides = write_run_config(processes.flwr_home / f"run-config-{uuid.uuid4().hex[:8]}.toml",
                                 run_config, app_dir)
    command = ["run", str(app_dir), connection, "--run-config", str(overrides), *extra_args, "--stream"]
    try:
        streamed = processes.cli(command, timeout=deadline - time.monotonic())
        output, exit_code = streamed.stdout + streamed.stderr, streamed.returncode
    except EngineError as exc:  # timed out while streaming: the status check below decides
        output, exit_code = str(exc), None
    output = _ANSI.sub("", output)
    while True:
        new = [run for run in _list_runs(processes, connection, deadline) if run["run-id"] not in processes.seen_runs]
        if not new:
            raise EngineError(f"`flwr {' '.join(command)}` started no run (exit code {exit_code}):\n"
                              f"{_tail(output)}")
        info = new[0]
        # The stream can end before the status is final (e.g. a dropped connection).
        if str(info.get("status", "")).startswith("finished") or time.monotonic() > deadline:
            break
        time.sleep(2.0)
    processes.seen_runs.add(info["run-id"])
    run_id, status = int(info["run-id"]), str(info.get("status", "unknown"))
    if not status.startswith("finished"):
        try:
            processes.cli(["stop", str(run_id), connection], timeout=30.0)
        except EngineError:
            pass  # the engine's processes are terminated on exit anyway
        raise EngineError(f"run {run_id} still {status!r} after {timeout:.0f} s; stopped it. "
                          f"Log tail:\n{_tail(output)}")
    result = RunResult(run_id=run_id, status=status, details=str(info.get("status-details", "")),
                       seconds=time.monotonic() - start, log=output, info=info)
    if check and not result.ok:
        raise EngineError(f"run {run_id} ended {status}: {result.details}\nLog tail:\n{_tail(output)}")
    return result


def _list_runs(processes: TaggedProcesses, connection: str, deadline: float) -> list[dict]:
    """The rows of ``flwr list --format json`` (all runs on this SuperLink)."""
    listed = processes.cli(["list", connection, "--format", "json"],
                           timeout=max(deadline - time.monotonic(), 30.0))
    try:
        reply = _parse_json_output(listed.stdout)
    except ValueError:
        reply = {}
    if not reply.get("success"):
        raise EngineError(f"`flwr list {connection}` failed: "
                          f"{reply.get('error-message') or _tail(listed.stdout + listed.stderr)}")
    return list(reply.get("runs", []))


# ----------------------------------------------------------------------------- simulation


class LocalSimulation:
    """Flower's Simulation Engine on this machine, for one or more runs.

    ``flwr`` would start the local simulation SuperLink itself (detached, 15 s start-up
    limit, on fixed ports 39091/39093) and leave it running. We start the very same command
    ourselves instead, on free ports (``FLWR_LOCAL_SUPERLINK_HTTP_API_PORT`` /
    ``FLWR_LOCAL_CONTROL_API_PORT`` tell ``flwr`` where it is), so runs of different users
    or tests never share or kill each other's SuperLink, a slow machine gets a longer
    start-up, and on exit we stop it with the SuperExec, ServerApps and Ray processes.
    """

    def __init__(self, flwr_home: Path, num_supernodes: int, *, num_cpus_per_client: float = 1,
                 port: int | None = None, startup_timeout: float = 120.0,
                 federation_config: dict[str, Any] | None = None):
        if num_supernodes < 1:
            raise ValueError(f"num_supernodes must be >= 1, got {num_supernodes}")
        if num_cpus_per_client < 1 or num_cpus_per_client != int(num_cpus_per_client):
            # Flower 1.41's federation config holds client-resources-num-cpus as uint32.
            raise ValueError(f"num_cpus_per_client must be a whole number >= 1 (Flower 1.41 "
                             f"accepts no fractions), got {num_cpus_per_client}")
        if port is not None and port_in_use(port):
            raise EngineError(f"port {port} is taken (a local SuperLink already running?); "
                              "stop it or leave port=None to use a free one")
        self.flwr_home = Path(flwr_home).resolve()
        self.num_supernodes = num_supernodes
        self.num_cpus_per_client = num_cpus_per_client
        self.port = port or free_port()
        self.control_port = free_port()
        self.startup_timeout = startup_timeout
        self.tag = ""  # FEDSPEECH_ENGINE_TAG of every process this instance starts
        self.federation_config = {"num-supernodes": num_supernodes,
                                  "client-resources-num-cpus": int(num_cpus_per_client),
                                  **(federation_config or {})}
        self._processes: TaggedProcesses | None = None
        self._ray_tmp: Path | None = None

    def start(self) -> LocalSimulation:
        runtime = self.flwr_home / "local-superlink"
        runtime.mkdir(parents=True, exist_ok=True)
        _write_connection(self.flwr_home, LOCAL_CONNECTION, {"address": ":local:"})
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
            processes.start("superlink", [
                str(Path(sys.executable).parent / "flower-superlink"), "--insecure", "--simulation",
                "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
                "--control-api-address", f"127.0.0.1:{self.control_port}",
                # In memory (no --database): a fresh run history each time, nothing left behind.
            ])
            _wait_healthy(processes, "superlink", f"http://127.0.0.1:{self.port}/health",
                          self.startup_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def run(self, app_dir: Path, run_config: dict[str, Any], timeout: float, *,
            check: bool = True) -> RunResult:
        """Run the app once under simulation; raises ``EngineError`` unless it completed
        (``check=False`` returns the failed result instead)."""
        if self._processes is None:
            raise RuntimeError("LocalSimulation.run() outside `with` (or before start())")
        federation = " ".join(f"{k}={json.dumps(v)}" for k, v in self.federation_config.items())
        return _submit_and_wait(self._processes, LOCAL_CONNECTION, app_dir, run_config, timeout,
                                ["--federation-config", federation], check)

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


def run_simulation(app_dir: Path, run_config: dict[str, Any], num_supernodes: int, *,
                   flwr_home: Path, num_cpus_per_client: float = 1, timeout: float) -> RunResult:
    """Run a Flower app once under the Simulation Engine (Ray) and return its result.

    Raises ``EngineError`` (with the log tail) unless the run finished completed; always
    stops the SuperLink, SuperExec, ServerApp and Ray processes it started.
    """
    with LocalSimulation(flwr_home, num_supernodes, num_cpus_per_client=num_cpus_per_client) as sim:
        return sim.run(app_dir, run_config, timeout)


# ----------------------------------------------------------------------------- deployment


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

    def __init__(self, workdir: Path, num_supernodes: int, *,
                 node_configs: list[dict[str, Any]] | None = None, tls: bool = False,
                 certificates: Certificates | None = None, supernode_auth: bool = False,
                 database: bool = False, startup_timeout: float = 120.0):
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
            return ["--ssl-ca-certfile", str(self.certificates.ca_cert),
                    "--ssl-certfile", str(self.certificates.server_cert),
                    "--ssl-keyfile", str(self.certificates.server_key)]
        return ["--root-certificates", str(self.certificates.ca_cert)]

    def start(self) -> DeploymentCluster:
        self.workdir.mkdir(parents=True, exist_ok=True)
        database_args: list[str] = []
        if self.database:
            database = self.workdir / "superlink-state.db"
            database.unlink(missing_ok=True)  # runs are told apart from earlier ones by a fresh history
            database_args = ["--database", str(database)]
        if self.tls and self.certificates is None:
            self.certificates = make_self_signed_certs(self.workdir / "certs")
        self.port = free_port()
        connection: dict[str, Any] = {"address": self.address}
        if self.tls:
            connection["root-certificates"] = str(Path(self.certificates.ca_cert).resolve())
        else:
            connection["insecure"] = True
        _write_connection(self.flwr_home, CLUSTER_CONNECTION, connection)
        processes = self._processes = TaggedProcesses(self.flwr_home, self.workdir / "logs")
        self.tag, self.node_ids = processes.tag, []
        bin_dir = Path(sys.executable).parent
        try:
            processes.start("superlink", [
                str(bin_dir / "flower-superlink"), *self._tls_args("superlink"),
                *(["--enable-supernode-auth"] if self.supernode_auth else []),
                "--isolation", "subprocess", "--host", "127.0.0.1", "--port", str(self.port),
                *database_args,
            ])
            scheme = "https" if self.tls else "http"
            _wait_healthy(processes, "superlink", f"{scheme}://{self.address}/health", self.startup_timeout,
                          ca_file=self.certificates.ca_cert if self.tls else None)
            auth_args = self._register_all() if self.supernode_auth else [[] for _ in self.node_configs]
            for i in range(self.num_supernodes):
                processes.start(f"supernode-{i}", [
                    str(bin_dir / "flower-supernode"), *self._tls_args("supernode"), *auth_args[i],
                    "--superlink", self.address, "--port", str(free_port()),
                    "--node-config", self._node_args[i],
                ])
            self._wait_nodes_online()
        except BaseException:
            self.stop()
            raise
        return self

    def _register_all(self) -> list[list[str]]:
        """Create a key pair per SuperNode and register the public keys with the SuperLink
        (concurrently: each `flwr` call is a Python start-up); returns each node's args."""
        assert self._processes is not None
        keys = [make_supernode_keys(self.workdir / "supernode-keys", f"supernode-{i}")
                for i in range(self.num_supernodes)]
        commands = [["supernode", "register", str(k.public_key), CLUSTER_CONNECTION, "--format", "json"]
                    for k in keys]
        with ThreadPoolExecutor(max_workers=len(commands)) as pool:
            replies = list(pool.map(lambda c: self._processes.cli(c, timeout=self.startup_timeout), commands))
        for i, done in enumerate(replies):
            try:
                reply = _parse_json_output(done.stdout)
            except ValueError:
                reply = {}
            if not reply.get("success"):
                raise EngineError(f"`flwr supernode register` failed for SuperNode {i}: "
                                  f"{reply.get('error-message') or _tail(done.stdout + done.stderr)}")
            self.node_ids.append(int(reply["node-id"]))
        return [["--auth-supernode-private-key", str(k.private_key)] for k in keys]

    def online_nodes(self) -> int:
        """How many SuperNodes the SuperLink reports online (``flwr supernode list``)."""
        assert self._processes is not None
        done = self._processes.cli(["supernode", "list", CLUSTER_CONNECTION, "--format", "json"], timeout=60.0)
        try:
            nodes = _parse_json_output(done.stdout).get("nodes", [])
        except ValueError:
            return 0
        return sum(1 for node in nodes if node.get("status") == "online")

    def _wait_nodes_online(self) -> None:
        deadline = time.monotonic() + self.startup_timeout
        while True:
            for i in range(self.num_supernodes):
                self._processes.check_alive(f"supernode-{i}")
            online = self.online_nodes()
            if online >= self.num_supernodes:
                return
            if time.monotonic() > deadline:
                raise EngineError(f"only {online}/{self.num_supernodes} SuperNodes online after "
                                  f"{self.startup_timeout:.0f} s; supernode-0 log:\n"
                                  f"{_file_tail(self.log_path('supernode-0'))}")
            time.sleep(1.0)

    def run(self, app_dir: Path, run_config: dict[str, Any], timeout: float, *,
            check: bool = True) -> RunResult:
        """Submit the app with ``flwr run`` and wait for it to finish; raises
        ``EngineError`` unless it completed (``check=False`` returns the result)."""
        if self._processes is None:
            raise RuntimeError("DeploymentCluster.run() outside `with` (or before start())")
        return _submit_and_wait(self._processes, CLUSTER_CONNECTION, app_dir, run_config, timeout, [], check)

    def stop(self) -> None:
        if self._processes is not None:
            self._processes.stop_all()
            self._processes = None

    def __enter__(self) -> DeploymentCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
