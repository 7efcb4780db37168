"""The real pretraining app under Flower's own engines: the Deployment Engine (SuperLink and
two SuperNodes on loopback, TLS, SuperNode authentication, partitions via --node-config) and
the Simulation Engine. Both must reproduce the in-process runner's rounds."""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Wav2Vec2Model

from fedspeech.apps.pretrain.run import deployment_cluster, run_pretraining, with_absolute_paths
from fedspeech.federated import roundlog
from fedspeech.federated.checkpoints import round_dir
from fedspeech.federated.engines import project_app_dir
from test_pretrain import partition, settings  # noqa: F401, F811  (the same fixture and settings)


def assert_same_run(
    engine: list[dict], inprocess: list[dict], engine_dir: Path, inprocess_dir: Path, rounds: int = 2
) -> None:
    """Same rounds, clients, losses and final weights (other processes may use other thread
    counts, so floating-point sums may differ in the last bits)."""
    assert [r["round"] for r in engine] == list(range(1, rounds + 1))
    for a, b in zip(engine, inprocess):
        assert a["sampled"] == b["sampled"] == [0, 1]
        by_client = {c["client"]: c for c in b["clients"]}
        for c in a["clients"]:
            assert c["examples"] == by_client[c["client"]]["examples"]
            assert c["train_loss"] == pytest.approx(by_client[c["client"]]["train_loss"], rel=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["bytes_from_clients"] == b["bytes_from_clients"]
    Wav2Vec2Model.from_pretrained(round_dir(engine_dir, rounds))  # an HF checkpoint transformers loads
    x = load_file(str(round_dir(engine_dir, rounds) / "model.safetensors"))
    y = load_file(str(round_dir(inprocess_dir, rounds) / "model.safetensors"))
    assert x.keys() == y.keys()
    differ = {k: float((x[k] - y[k]).abs().max()) for k in x if not torch.allclose(x[k], y[k], rtol=1e-3, atol=1e-4)}
    assert not differ, f"weights differ (max abs difference per array): {differ}"


@pytest.mark.slow
def test_deployment_engine_runs_the_pretraining_app_like_inprocess(small_corpus, partition, tmp_path):
    inprocess = run_pretraining(settings(small_corpus, partition, tmp_path / "inprocess"))
    engine_dir = tmp_path / "deployment"
    deployed = run_pretraining(settings(small_corpus, partition, engine_dir), runner="deployment", timeout=600)
    assert_same_run(deployed, inprocess, engine_dir, tmp_path / "inprocess")
    # the SuperLink served over TLS (process clean-up is tested in test_engines.py)
    assert "https://127.0.0.1" in (engine_dir / "deployment" / "logs" / "superlink.log").read_text()


@pytest.mark.slow
def test_deployment_engine_resumes_after_the_superlink_is_killed_mid_run(small_corpus, partition, tmp_path):
    """The server machine dies in round 2: the SuperLink and its ServerApp are SIGKILLed while
    the SuperNodes keep running. The SuperLink restarts on its state database, the SuperNodes
    rejoin by themselves, the dead run is stopped and the app is submitted again with
    ``resume``: round 1 is not lost and the run ends as an uninterrupted one. (Two rounds,
    as the test above: each round of a Flower engine's run may differ from the in-process
    one in the last bits, and the tolerance is checked for two.)"""
    rounds = 2
    inprocess = run_pretraining(settings(small_corpus, partition, tmp_path / "inprocess", rounds=rounds))
    engine = with_absolute_paths(settings(small_corpus, partition, tmp_path / "deployment", rounds=rounds))
    out = Path(engine.out_dir)
    with deployment_cluster(engine, database=True) as cluster:
        first = cluster.submit(project_app_dir(), engine.to_run_config())
        deadline = time.monotonic() + 600
        while roundlog.last_round(out) < 1:  # round 1 complete: now in round 2
            assert time.monotonic() < deadline, "round 1 never completed"
            time.sleep(0.1)
        cluster.kill_superlink()
        killed_after = roundlog.last_round(out)
        assert killed_after < rounds
        cluster.restart_superlink()
        cluster.stop_run(first)
        resumed = cluster.run(project_app_dir(), dataclasses.replace(engine, resume=True).to_run_config(), timeout=600)
    assert resumed.ok, f"killed after round {killed_after}: {resumed.details}"
    print(f"killed after round {killed_after}")
    assert_same_run(roundlog.read_rounds(out), inprocess, out, tmp_path / "inprocess", rounds=rounds)


@pytest.mark.slow
def test_simulation_engine_runs_feature_matching_with_fedu_like_inprocess(small_corpus, partition, tmp_path):
    kw = dict(method="byol", strategy="fedu")
    inprocess = run_pretraining(settings(small_corpus, partition, tmp_path / "inprocess", **kw))
    simulated = run_pretraining(
        settings(small_corpus, partition, tmp_path / "simulation", **kw), runner="simulation", timeout=600
    )
    assert_same_run(simulated, inprocess, tmp_path / "simulation", tmp_path / "inprocess")
