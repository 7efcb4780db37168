"""The processes behind Flower's engines, started and cleaned up by us: every process carries
a unique ``FEDSPEECH_ENGINE_TAG`` (inherited by all its descendants), so on exit exactly those
are terminated; and a run's outcome, read back from the SuperLink (``flwr list``)."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
import ssl
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import tomli_w

from fedspeech.federated.engines.app_folder import write_run_config

log = logging.getLogger(__name__)

TAG_VARIABLE = "FEDSPEECH_ENGINE_TAG"
LOCAL_CONNECTION = "fedspeech-local"  # names in FLWR_HOME/config.toml
CLUSTER_CONNECTION = "fedspeech-cluster"
COMPLETED = "finished:completed"
_ANSI = re.compile(r"\x1b\[[0-9;]*m")


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


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_in_use(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(0.5)
        return sock.connect_ex((host, port)) == 0


def tail(text: str, lines: int = 40) -> str:
    return "\n".join(_ANSI.sub("", text).rstrip().splitlines()[-lines:])


def file_tail(path: Path, lines: int = 40) -> str:
    try:
        return tail(path.read_text(errors="replace"), lines)
    except OSError:
        return f"(no log at {path})"


def write_connection(flwr_home: Path, name: str, connection: dict[str, Any]) -> Path:
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


def parse_json_output(stdout: str) -> dict:
    """The JSON object a ``flwr ... --format json`` printed (tolerating text before it)."""
    start = stdout.find("{")
    if start < 0:
        raise ValueError("no JSON object in output")
    obj, _ = json.JSONDecoder().raw_decode(stdout[start:])
    return obj


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


def descendants(pid: int) -> list[int]:
    """Ids of every live process below ``pid`` in the process tree (Linux /proc)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else ():
        if not entry.name.isdigit():
            continue
        try:
            parent = int((entry / "stat").read_text().rsplit(")", 1)[-1].split()[1])
        except (OSError, ValueError, IndexError):  # gone meanwhile
            continue
        children.setdefault(parent, []).append(int(entry.name))
    found, queue = [], [pid]
    while queue:
        below = children.get(queue.pop(), [])
        found += below
        queue += below
    return found


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
        env.update(
            {
                "FLWR_HOME": str(self.flwr_home),
                "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
                "FLWR_DISABLE_UPDATE_CHECK": "1",
                "FLWR_TELEMETRY_ENABLED": "0",
                "RAY_USAGE_STATS_ENABLED": "0",  # offline: Ray would try to report usage
                TAG_VARIABLE: self.tag,
                # flwr starts flower-superexec, flwr-serverapp, flwr-clientapp by name.
                "PATH": os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")]),
            }
        )
        return env

    def log_path(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log_file = self.log_path(name).open("ab")
        self._log_files.append(log_file)
        log.info("starting %s: %s", name, " ".join(command))
        process = subprocess.Popen(
            command, env=self.env, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        self.children[name] = process
        return process

    def check_alive(self, name: str) -> None:
        process = self.children[name]
        if process.poll() is not None:
            raise EngineError(
                f"{name} exited with code {process.returncode}; log "
                f"{self.log_path(name)}:\n{file_tail(self.log_path(name))}"
            )

    def cli(self, args: list[str], timeout: float) -> subprocess.CompletedProcess:
        """Run ``flwr ARGS`` with our environment (and tag: a CLI can start a SuperLink)."""
        command = [str(Path(sys.executable).parent / "flwr"), *args]
        log.debug("running %s", " ".join(command))
        try:
            return subprocess.run(
                command,
                env=self.env,
                capture_output=True,
                text=True,
                timeout=max(timeout, 1.0),
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:  # run() has killed it; output is bytes here
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            raise EngineError(f"`flwr {' '.join(args)}` did not return within {timeout:.0f} s\n{tail(out)}") from None

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


def wait_healthy(processes: TaggedProcesses, name: str, url: str, timeout: float, ca_file: Path | None = None) -> None:
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
            raise EngineError(
                f"{name} not healthy at {url} after {timeout:.0f} s; log:\n{file_tail(processes.log_path(name))}"
            )
        time.sleep(0.5)


def submit(
    processes: TaggedProcesses, connection: str, app_dir: Path, run_config: dict[str, Any], timeout: float
) -> int:
    """``flwr run`` without ``--stream``: submit the app and return the new run's id at once."""
    app_dir = Path(app_dir).resolve()
    overrides = write_run_config(processes.flwr_home / f"run-config-{uuid.uuid4().hex[:8]}.toml", run_config, app_dir)
    done = processes.cli(
        ["run", str(app_dir), connection, "--run-config", str(overrides), "--format", "json"], timeout=timeout
    )
    try:
        reply = parse_json_output(done.stdout)
    except ValueError:
        reply = {}
    if not reply.get("success"):
        reason = reply.get("error-message") or tail(done.stdout + done.stderr)
        raise EngineError(f"`flwr run {app_dir}` failed: {reason}")
    processes.seen_runs.add(reply["run-id"])
    return int(reply["run-id"])


def submit_and_wait(
    processes: TaggedProcesses,
    connection: str,
    app_dir: Path,
    run_config: dict[str, Any],
    timeout: float,
    extra_args: list[str],
    check: bool,
) -> RunResult:
    """``flwr run --stream`` (returns when the run ends), then read the run's real status
    with ``flwr list``; stop the run if it outlives ``timeout``.

    The run is identified as the run on *our* SuperLink (fresh database) that we have not
    seen yet, so nothing depends on parsing ``flwr``'s human-readable output.
    """
    app_dir = Path(app_dir).resolve()
    start = time.monotonic()
    deadline = start + timeout
    overrides = write_run_config(processes.flwr_home / f"run-config-{uuid.uuid4().hex[:8]}.toml", run_config, app_dir)
    command = ["run", str(app_dir), connection, "--run-config", str(overrides), *extra_args, "--stream"]
    try:
        streamed = processes.cli(command, timeout=deadline - time.monotonic())
        output, exit_code = streamed.stdout + streamed.stderr, streamed.returncode
    except EngineError as exc:  # timed out while streaming: the status check below decides
        output, exit_code = str(exc), None
    output = _ANSI.sub("", output)
    while True:
        new = [run for run in list_runs(processes, connection, deadline) if run["run-id"] not in processes.seen_runs]
        if not new:
            raise EngineError(f"`flwr {' '.join(command)}` started no run (exit code {exit_code}):\n{tail(output)}")
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
        raise EngineError(f"run {run_id} still {status!r} after {timeout:.0f} s; stopped it. Log tail:\n{tail(output)}")
    result = RunResult(
        run_id=run_id,
        status=status,
        details=str(info.get("status-details", "")),
        seconds=time.monotonic() - start,
        log=output,
        info=info,
    )
    if check and not result.ok:
        raise EngineError(f"run {run_id} ended {status}: {result.details}\nLog tail:\n{tail(output)}")
    return result


def list_runs(processes: TaggedProcesses, connection: str, deadline: float) -> list[dict]:
    """The rows of ``flwr list --format json`` (all runs on this SuperLink)."""
    listed = processes.cli(["list", connection, "--format", "json"], timeout=max(deadline - time.monotonic(), 30.0))
    try:
        reply = parse_json_output(listed.stdout)
    except ValueError:
        reply = {}
    if not reply.get("success"):
        raise EngineError(
            f"`flwr list {connection}` failed: {reply.get('error-message') or tail(listed.stdout + listed.stderr)}"
        )
    return list(reply.get("runs", []))
