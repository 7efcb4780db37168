"""The real pretraining app under Flower's own engines: the Deployment Engine (SuperLink and
two SuperNodes on loopback, TLS, SuperNode authentication, partitions via --node-config) and
the Simulation Engine. Both must reproduce the in-process runner's rounds."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Wav2Vec2Model

from fedspeech.apps.pretrain.run import run_pretraining
from fedspeech.federated.checkpoints import round_dir
from test_pretrain import partition, settings  # noqa: F401, F811  (the same fixture and settings)


def assert_same_run(engine: list[dict], inprocess: list[dict], engine_dir: Path, inprocess_dir: Path) -> None:
    """Same rounds, clients, losses and final weights (other processes may use other thread
    counts, so floating-point sums may differ in the last bits)."""
    assert [r["round"] for r in engine] == [1, 2]
    for a, b in zip(engine, inprocess):
        assert a["sampled"] == b["sampled"] == [0, 1]
        by_client = {c["client"]: c for c in b["clients"]}
        for c in a["clients"]:
            assert c["examples"] == by_client[c["client"]]["examples"]
            assert c["train_loss"] == pytest.approx(by_client[c["client"]]["train_loss"], rel=1e-3)
        assert a["val_loss"] == pytest.approx(b["val_loss"], rel=1e-3)
        assert a["bytes_from_clients"] == b["bytes_from_clients"]
    Wav2Vec2Model.from_pretrained(round_dir(engine_dir, 2))  # an HF checkpoint transformers loads
    x = load_file(str(round_dir(engine_dir, 2) / "model.safetensors"))
    y = load_file(str(round_dir(inprocess_dir, 2) / "model.safetensors"))
    assert x.keys() == y.keys()
    assert all(torch.allclose(x[k], y[k], rtol=1e-3, atol=1e-4) for k in x)


@pytest.mark.slow
def test_deployment_engine_runs_the_pretraining_app_like_inprocess(small_corpus, partition, tmp_path):
    inprocess = run_pretraining(settings(small_corpus, partition, tmp_path / "inprocess"))
    engine_dir = tmp_path / "deployment"
    deployed = run_pretraining(settings(small_corpus, partition, engine_dir), runner="deployment", timeout=600)
    assert_same_run(deployed, inprocess, engine_dir, tmp_path / "inprocess")
    # the SuperLink served over TLS (process clean-up is tested in test_engines.py)
    assert "https://127.0.0.1" in (engine_dir / "deployment" / "logs" / "superlink.log").read_text()


@pytest.mark.slow
def test_simulation_engine_runs_feature_matching_with_fedu_like_inprocess(small_corpus, partition, tmp_path):
    kw = dict(method="byol", strategy="fedu")
    inprocess = run_pretraining(settings(small_corpus, partition, tmp_path / "inprocess", **kw))
    simulated = run_pretraining(
        settings(small_corpus, partition, tmp_path / "simulation", **kw), runner="simulation", timeout=600
    )
    assert_same_run(simulated, inprocess, tmp_path / "simulation", tmp_path / "inprocess")
