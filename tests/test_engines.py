"""Flower's Simulation and Deployment Engines run a real app end to end, and the launcher's
pieces (config files, certificates, keys, process clean-up) do what Flower needs.

The two engine tests start real SuperLink/SuperNode/Ray processes and are the slowest of
the suite (see docs/deployment.md for timings); every process they start carries a tag
and the tests assert none is left afterwards, also when a run fails.
"""

from __future__ import annotations

import json
import socket
import ssl
import sys
import threading
import time
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key
from flwr.common.config import parse_config_args

from fedspeech.federated.engines import (
    DeploymentCluster,
    EngineError,
    LocalSimulation,
    TaggedProcesses,
    node_config_arg,
    tagged_pids,
    write_run_config,
)
from fedspeech.federated.tls import make_self_signed_certs, make_supernode_keys

APP = Path(__file__).parent / "engine_app"


def fedavg_of_toy_clients(num_clients: int, server_round: int) -> float:
    """The toy client ``i`` sends ``i + round`` with weight ``i + 1``."""
    weights = [i + 1 for i in range(num_clients)]
    return sum((i + server_round) * w for i, w in enumerate(weights)) / sum(weights)


# ----------------------------------------------------------------------------- fast


def test_node_config_arg_round_trips_through_flowers_parser():
    config = {
        "partition-id": 3,
        "num-partitions": 8,
        "manifest": "/data/my corpus/train.tsv",
        "partition": "/data/parts.toml",
        "weight": 0.5,
        "augment": True,
    }
    arg = node_config_arg(config)
    # Flower's SuperNode parses --node-config with parse_config_args([arg]).
    assert parse_config_args([arg]) == config
    assert parse_config_args([node_config_arg({"name": "it's"})]) == {"name": "it's"}
    with pytest.raises(ValueError, match="key"):
        node_config_arg({"bad key": 1})
    with pytest.raises(ValueError, match="only str"):
        node_config_arg({"k": [1, 2]})


def test_write_run_config_checks_keys_against_the_app(tmp_path):
    path = write_run_config(tmp_path / "o.toml", {"num-rounds": 3, "result-path": "/x"}, APP)
    assert parse_config_args([str(path)]) == {"num-rounds": 3, "result-path": "/x"}
    with pytest.raises(ValueError, match=r"\['rounds'\].*engine_app"):
        write_run_config(tmp_path / "o.toml", {"rounds": 3}, APP)
    with pytest.raises(ValueError, match="num-rounds"):
        write_run_config(tmp_path / "o.toml", {"num-rounds": [3]}, APP)
    with pytest.raises(FileNotFoundError, match="pyproject.toml"):
        write_run_config(tmp_path / "o.toml", {}, tmp_path)


def test_self_signed_certs_give_a_working_tls_handshake_on_loopback(tmp_path):
    certs = make_self_signed_certs(tmp_path, hosts=("127.0.0.1", "localhost"))
    server_cert = x509.load_pem_x509_certificate(certs.server_cert.read_bytes())
    names = server_cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert certs.server_key.stat().st_mode & 0o077 == 0

    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(certs.server_cert, certs.server_key)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]

    def serve() -> None:
        conn, _ = listener.accept()
        with server_ctx.wrap_socket(conn, server_side=True) as tls:
            tls.sendall(tls.recv(5))

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(certs.ca_cert))  # verifies chain + hostname
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with client_ctx.wrap_socket(raw, server_hostname="127.0.0.1") as tls:
            tls.sendall(b"hello")
            assert tls.recv(5) == b"hello"
    thread.join(5)
    listener.close()

    # A certificate for another host must not verify for 127.0.0.1.
    other = make_self_signed_certs(tmp_path / "other", hosts=("superlink.example.org",))
    listener = socket.create_server(("127.0.0.1", 0))
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(other.server_cert, other.server_key)
    port = listener.getsockname()[1]

    def serve_once() -> None:
        conn, _ = listener.accept()
        try:
            server_ctx.wrap_socket(conn, server_side=True).close()
        except (ssl.SSLError, OSError):
            conn.close()

    thread = threading.Thread(target=serve_once, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(other.ca_cert))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with pytest.raises(ssl.SSLCertVerificationError):
            client_ctx.wrap_socket(raw, server_hostname="127.0.0.1")
    thread.join(5)
    listener.close()


def test_supernode_keys_load_as_flower_loads_them(tmp_path):
    from flwr.cli.supernode.register import try_load_public_key

    keys = make_supernode_keys(tmp_path, "node-0")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert len(try_load_public_key(keys.public_key)) > 0  # what `flwr supernode register` does
    assert keys.private_key.stat().st_mode & 0o077 == 0


def test_stop_all_terminates_detached_descendants_that_ignore_sigterm(tmp_path):
    """flwr detaches its SuperExec (own session); clean-up must find it by the tag, and
    escalate to SIGKILL for a process that ignores SIGTERM."""
    ready = tmp_path / "grandchild-ready"
    grandchild = (
        "import pathlib, signal, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); "
        f"pathlib.Path({str(ready)!r}).touch(); time.sleep(300)"
    )
    script = (
        "import subprocess, sys, time\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}], start_new_session=True)\n"
        "time.sleep(300)\n"
    )
    processes = TaggedProcesses(tmp_path / "home", tmp_path / "logs")
    try:
        processes.start("parent", [sys.executable, "-c", script])
        deadline = time.monotonic() + 30
        while not ready.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        assert ready.exists() and len(tagged_pids(processes.tag)) == 2
        started = time.monotonic()
    finally:
        processes.stop_all(grace=1.0)
    assert tagged_pids(processes.tag) == []
    assert time.monotonic() - started >= 1.0  # the grandchild outlived SIGTERM, then got SIGKILL


# ----------------------------------------------------------------------------- engines


@pytest.mark.slow
def test_deployment_engine_over_tls_with_supernode_auth_runs_two_rounds(tmp_path):
    """A SuperLink and two SuperNodes on loopback, TLS with generated certificates, only
    registered SuperNodes admitted (a third one with an unregistered key is refused, and the
    run completes with the registered two), each SuperNode with its own node config."""
    result_path = tmp_path / "result.json"
    node_configs = [
        {"manifest": str(tmp_path / f"client {i}.tsv"), "partition": str(tmp_path / "p.toml")} for i in range(2)
    ]
    with DeploymentCluster(
        tmp_path / "cluster", 2, node_configs=node_configs, tls=True, supernode_auth=True, startup_timeout=150
    ) as cluster:
        tag = cluster.tag
        assert len(tagged_pids(tag)) >= 3  # SuperLink, 2 SuperNodes (+ their SuperExecs)
        assert len(cluster.node_ids) == 2
        intruder = make_supernode_keys(tmp_path / "intruder-keys", "intruder")  # never registered
        cluster.start_supernode("intruder", node_config_arg({"partition-id": 9}), Path(intruder.private_key))
        result = cluster.run(APP, {"num-rounds": 2, "result-path": str(result_path)}, timeout=240)
        assert cluster.online_nodes() == 2  # the intruder never joined
        refused = "Failed to activate SuperNode"  # Flower's exit code 305 on an unknown key
        for _ in range(60):
            if refused in cluster.log_path("intruder").read_text():
                break
            time.sleep(1.0)
        assert refused in cluster.log_path("intruder").read_text()
        assert "https://127.0.0.1" in cluster.log_path("superlink").read_text()
    assert tagged_pids(tag) == []

    assert result.ok and result.status == "finished:completed"
    written = json.loads(result_path.read_text())
    assert written["rounds"] == 2
    assert written["arrays"][0] == pytest.approx([fedavg_of_toy_clients(2, 2)] * 4)
    metrics = written["train-metrics"]["2"]
    assert metrics["num-partitions"] == 2 and metrics["has-manifest"] == 1  # node configs arrived


@pytest.mark.slow
def test_simulation_engine_runs_two_rounds_and_reports_a_failing_serverapp(tmp_path):
    result_path = tmp_path / "result.json"
    with LocalSimulation(tmp_path / "flwr-home", num_supernodes=3, num_cpus_per_client=1) as sim:
        tag = sim.tag
        result = sim.run(APP, {"num-rounds": 2, "result-path": str(result_path)}, timeout=240)
        assert result.ok
        written = json.loads(result_path.read_text())
        assert written["rounds"] == 2
        assert written["arrays"][0] == pytest.approx([fedavg_of_toy_clients(3, 2)] * 4)
        assert written["train-metrics"]["2"]["num-partitions"] == 3  # --federation-config applied

        # `flwr run --stream` exits 0 here; the launcher must still report the failure.
        with pytest.raises(EngineError, match="finished:failed.*failed on purpose"):
            sim.run(APP, {"fail-server": True}, timeout=240)
    assert tagged_pids(tag) == []
