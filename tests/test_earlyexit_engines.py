"""The early-exit app under Flower's Deployment Engine (SuperLink and two SuperNodes on
loopback, TLS, SuperNode authentication): the method and the three baselines run on one
cluster, each SuperNode names its own device (and one caps its depth) by --node-config,
every mode reproduces the in-process run with the same node configs, and what a client
keeps for later rounds (cost lines, CNN features) survives Flower's one process per message."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedspeech.apps.earlyexit.run import run_modes
from fedspeech.apps.earlyexit.settings import MODES
from fedspeech.federated.checkpoints import round_dir
from test_earlyexit_app import fleet_file, make_settings

# SuperNode i names device dev{i}, made for exactly depth 6, 4 (test_earlyexit_app.fleet_file);
# node 1 caps itself at 2. The fleet's own client order (swapped) would give other depths.
NODE_CONFIGS = [{"device": "dev0"}, {"device": "dev1", "max-depth": 2}]
EXPECTED_DEPTHS = {"adaptive": {0: 6, 1: 2}, "full": {0: 6, 1: 6}, "exclusion": {0: 6}, "smallest": {0: 2, 1: 2}}


@pytest.fixture(scope="module")
def partition(speaker_partition) -> Path:
    return speaker_partition(2)


def depths(record: dict) -> dict[int, int]:
    return {c["client"]: c["depth"] for c in record["clients"]}


def assert_same_round(a: dict, b: dict, mode: str) -> None:
    """One round under the engine and in-process: same clients, depths, costs, bytes, losses."""
    assert depths(a) == depths(b) == EXPECTED_DEPTHS[mode], mode
    # the device each SuperNode named, not the (swapped) fleet's
    assert {c["client"]: c["device"] for c in a["clients"]} == {k: f"dev{k}" for k in depths(a)}
    by_client = {c["client"]: c for c in b["clients"]}
    for c in a["clients"]:
        other = by_client[c["client"]]
        assert (c["device"], c["examples"], c["arrays_sent"], c["bytes_sent"]) == (
            other["device"],
            other["examples"],
            other["arrays_sent"],
            other["bytes_sent"],
        )
        assert c["train_flops"] == pytest.approx(other["train_flops"], rel=1e-9)
        assert c["train_loss"] == pytest.approx(other["train_loss"], rel=1e-3)
    assert a["upload_bytes"] == b["upload_bytes"] and a["layers_not_trained"] == b["layers_not_trained"]
    assert a["accuracy"].keys() == b["accuracy"].keys()


@pytest.mark.slow
def test_deployment_engine_runs_every_mode_like_inprocess(small_corpus, partition, tmp_path):
    settings = make_settings(small_corpus, partition, tmp_path / "inprocess", rounds=2)
    fleet = json.loads(fleet_file(settings, [6, 4], tmp_path).read_text())
    fleet["clients"] = fleet["clients"][::-1]
    (tmp_path / "fleet.json").write_text(json.dumps(fleet))
    settings.fleet = str(tmp_path / "fleet.json")

    inprocess = run_modes(settings, MODES, node_configs=NODE_CONFIGS)
    engine_dir = tmp_path / "deployment"
    settings.out_dir = str(engine_dir)
    deployed = run_modes(settings, MODES, runner="deployment", timeout=600, node_configs=NODE_CONFIGS)

    for mode in MODES:
        assert len(deployed[mode]) == len(inprocess[mode]) == 2
        for a, b in zip(deployed[mode], inprocess[mode]):
            assert_same_round(a, b, mode)
        # the CNN features computed in round 1 served round 2, in a new ClientApp process
        assert all(c["cnn_cache_flops"] > 0 for c in deployed[mode][0]["clients"])
        assert all(c["cnn_cache_flops"] == 0 for c in deployed[mode][1]["clients"])
        # other processes may use other thread counts: sums differ in the last bits
        x = load_file(str(round_dir(engine_dir / mode, 2) / "extra.safetensors"))
        y = load_file(str(round_dir(tmp_path / "inprocess" / mode, 2) / "extra.safetensors"))
        assert x.keys() == y.keys()
        assert all(torch.allclose(x[k], y[k], rtol=1e-3, atol=1e-4) for k in x), mode
    # the SuperLink served over TLS, and the cluster was started once for the four modes
    logs = engine_dir / "deployment" / "logs"
    assert "https://127.0.0.1" in (logs / "superlink.log").read_text()
    assert sorted(p.name for p in logs.iterdir()) == ["superlink.log", *(f"supernode-{i}.log" for i in range(2))]
    assert not any(Path(engine_dir, mode, "deployment").exists() for mode in MODES)
