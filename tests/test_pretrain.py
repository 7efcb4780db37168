"""Federated pretraining end to end with the in-process Flower runner."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import Wav2Vec2Model

from fedspeech.apps.pretrain.run import run_centralised, run_pretraining
from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.data.manifest import read_manifest
from fedspeech.federated.checkpoints import completed_rounds, round_dir


@pytest.fixture(scope="module")
def partition(speaker_partition) -> Path:
    return speaker_partition(2)


def settings(small_corpus: Path, partition: Path, out: Path, **kw) -> PretrainSettings:
    base = dict(
        manifest=str(small_corpus),
        partition=str(partition),
        out_dir=str(out),
        model="tiny",
        rounds=2,
        max_seconds=1.0,
        batch_size=4,
        lr=5e-4,
        val_max_utterances=8,
    )
    return PretrainSettings(**{**base, **kw})


def test_two_rounds_log_checkpoints_and_hf_loading(small_corpus, partition, tmp_path):
    records = run_pretraining(settings(small_corpus, partition, tmp_path / "run"))
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert r["sampled"] == [0, 1]
        assert {c["client"] for c in r["clients"]} == {0, 1}
        assert all(c["examples"] > 0 and c["train_loss"] > 0 for c in r["clients"])
        assert r["val_loss"] is not None and r["val_loss"] > 0
        assert r["bytes_to_clients"] > 0 and r["bytes_from_clients"] > 0
        assert r["round_seconds"] > 0
    # the round's checkpoint is a Hugging Face folder that transformers loads
    backbone = Wav2Vec2Model.from_pretrained(round_dir(tmp_path / "run", 2))
    saved = load_file(str(round_dir(tmp_path / "run", 2) / "model.safetensors"))
    key = "encoder.layers.0.attention.k_proj.weight"
    assert torch.equal(backbone.state_dict()[key], saved["wav2vec2." + key])


def test_resume_matches_uninterrupted_run(small_corpus, partition, tmp_path):
    straight = run_pretraining(settings(small_corpus, partition, tmp_path / "a"))
    run_pretraining(settings(small_corpus, partition, tmp_path / "b", rounds=1))
    resumed = run_pretraining(settings(small_corpus, partition, tmp_path / "b", resume=True))
    assert [r["round"] for r in resumed] == [1, 2]
    assert resumed[1]["val_loss"] == pytest.approx(straight[1]["val_loss"], rel=1e-5)
    a = load_file(str(round_dir(tmp_path / "a", 2) / "model.safetensors"))
    b = load_file(str(round_dir(tmp_path / "b", 2) / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_refuses_to_overwrite_an_earlier_run(small_corpus, partition, tmp_path):
    run_pretraining(settings(small_corpus, partition, tmp_path / "r", rounds=1))
    with pytest.raises(ValueError, match="--resume"):
        run_pretraining(settings(small_corpus, partition, tmp_path / "r", rounds=1))


def test_backbone_only_sends_less(small_corpus, partition, tmp_path):
    full = run_pretraining(settings(small_corpus, partition, tmp_path / "full", rounds=1))
    backbone = run_pretraining(
        settings(small_corpus, partition, tmp_path / "bb", rounds=1, backbone_only=True, strategy="loss")
    )
    assert backbone[0]["bytes_to_clients"] < full[0]["bytes_to_clients"]
    assert backbone[0]["bytes_from_clients"] < full[0]["bytes_from_clients"]


def test_feature_matching_with_fedu(small_corpus, partition, tmp_path):
    records = run_pretraining(settings(small_corpus, partition, tmp_path / "fedu", method="byol", strategy="fedu"))
    second = records[1]["clients"]
    assert all("fedu-divergence" in c and c["fedu-divergence"] > 0 for c in second)
    assert Wav2Vec2Model.from_pretrained(round_dir(tmp_path / "fedu", 2)) is not None


def test_failing_client_does_not_stop_the_run(small_corpus, partition, tmp_path):
    # Client 1's audio is corrupt: it fails every round, client 0 carries on.
    from fedspeech.data.partition import Partition, client_utterances

    part = Partition.load(partition)
    utts = read_manifest(small_corpus)
    broken_dir = tmp_path / "broken"
    broken_dir.mkdir()
    rows = []
    bad_ids = {u.id for u in client_utterances(part, utts, 1)}
    for u in utts:
        if u.id in bad_ids:
            bad = broken_dir / f"{u.id}.wav"
            bad.write_bytes(b"not audio")
            u = dataclasses.replace(u, path=str(bad))
        rows.append(u)
    from fedspeech.data.manifest import write_manifest

    manifest = write_manifest(rows, tmp_path / "manifest.tsv")
    records = run_pretraining(settings(manifest, partition, tmp_path / "run", rounds=1))
    assert records[0]["sampled"] == [0]
    assert len(records[0]["failed"]) == 1 and "unusable" in records[0]["failed"][0]["error"]


def test_centralised_baseline_sees_the_same_examples(small_corpus, partition, tmp_path):
    fed = run_pretraining(settings(small_corpus, partition, tmp_path / "fed", rounds=1))
    central = run_centralised(settings(small_corpus, partition, tmp_path / "central", rounds=1))
    assert central[0]["examples"] == sum(c["examples"] for c in fed[0]["clients"])
    assert completed_rounds(tmp_path / "central") == [1]


def test_centralised_resume_matches_an_uninterrupted_run(small_corpus, partition, tmp_path):
    """Dropout and Gumbel noise are seeded per round, so a resumed centralised run (here: the
    second round in a process that has already trained) ends on the same model."""
    run_centralised(settings(small_corpus, partition, tmp_path / "whole", rounds=2))
    run_centralised(settings(small_corpus, partition, tmp_path / "cut", rounds=1))
    run_centralised(settings(small_corpus, partition, tmp_path / "cut", rounds=2, resume=True))
    whole, cut = (load_file(str(round_dir(tmp_path / n, 2) / "model.safetensors")) for n in ("whole", "cut"))
    assert all(torch.equal(whole[k], cut[k]) for k in whole)


def test_per_round_probes_keep_the_best_round_per_task(small_corpus, partition, tmp_path):
    import json

    out = tmp_path / "probed"
    records = run_pretraining(settings(small_corpus, partition, out, probes="kws,speaker"))
    for r in records:
        assert set(r["probes"]) == {"kws", "speaker"}
        assert all(0.0 <= v <= 1.0 for v in r["probes"].values())
    best = json.loads((out / "best_rounds.json").read_text())
    assert best  # tracker state written
    for task in ("kws", "speaker"):
        scores = [r["probes"][task] for r in records]
        best_round = records[scores.index(max(scores))]["round"]  # ties keep the earlier round
        saved = load_file(str(out / "best" / task / "model.safetensors"))
        expected = load_file(str(round_dir(out, best_round) / "model.safetensors"))
        assert all(torch.equal(saved[k], expected[k]) for k in expected)


@pytest.mark.parametrize(
    "recipe",
    [
        dict(
            optimizer_state="server",
            server_optimizer="fedadam",
            server_lr=0.01,
            server_momentum=0.9,
            lr_schedule="step",
        ),
        dict(server_optimizer="fedavgm", server_lr=1.0, server_momentum=0.5),
    ],
)
def test_recipe_options_resume_exactly(small_corpus, partition, tmp_path, recipe):
    """Server-optimiser moments and optimiser states are part of what a resumed run restores:
    stopping after round 1 and resuming gives the uninterrupted run's model."""
    straight = run_pretraining(settings(small_corpus, partition, tmp_path / "a", **recipe))
    run_pretraining(settings(small_corpus, partition, tmp_path / "b", rounds=1, **recipe))
    resumed = run_pretraining(settings(small_corpus, partition, tmp_path / "b", resume=True, **recipe))
    assert resumed[1]["val_loss"] == pytest.approx(straight[1]["val_loss"], rel=1e-5)
    a = load_file(str(round_dir(tmp_path / "a", 2) / "model.safetensors"))
    b = load_file(str(round_dir(tmp_path / "b", 2) / "model.safetensors"))
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_client_kept_optimizer_state_changes_later_rounds_only(small_corpus, partition, tmp_path):
    # "client" keeps each client's AdamW moments in its node state: round 1 is the same as
    # with fresh moments, round 2 starts from round 1's moments and so differs.
    reset = run_pretraining(settings(small_corpus, partition, tmp_path / "reset"))
    kept = run_pretraining(settings(small_corpus, partition, tmp_path / "kept", optimizer_state="client"))
    assert kept[0]["val_loss"] == pytest.approx(reset[0]["val_loss"], rel=1e-6)
    assert kept[1]["val_loss"] != pytest.approx(reset[1]["val_loss"], rel=1e-6)
    assert kept[1]["bytes_from_clients"] == reset[1]["bytes_from_clients"]  # nothing extra on the wire


def test_server_optimizer_state_travels_only_when_asked(small_corpus, partition, tmp_path):
    reset = run_pretraining(settings(small_corpus, partition, tmp_path / "reset"))
    server = run_pretraining(settings(small_corpus, partition, tmp_path / "server", optimizer_state="server"))
    # round 1: only the replies carry AdamW moments; round 2: both directions
    assert server[0]["bytes_to_clients"] == reset[0]["bytes_to_clients"]
    assert server[0]["bytes_from_clients"] > 2 * reset[0]["bytes_from_clients"]
    assert server[1]["bytes_to_clients"] > 2 * reset[1]["bytes_to_clients"]


def test_federated_training_lowers_the_validation_loss(small_corpus, partition, tmp_path):
    """The default recipe must learn: after a few rounds the global model's validation loss
    (held-out speaker, fixed masks) is below the untrained model's and below round 1's."""
    from fedspeech.apps.pretrain.task import validation_loader
    from fedspeech.ssl.methods import get_method
    from fedspeech.ssl.train import evaluate_loss

    run = settings(
        small_corpus,
        partition,
        tmp_path / "learn",
        rounds=4,
        local_epochs=2,
        batch_size=PretrainSettings().batch_size,
        lr=PretrainSettings().lr,
    )  # the default recipe
    method = get_method(run)
    untrained = evaluate_loss(method.fresh_model(), method.objective, validation_loader(run))
    records = run_pretraining(run)
    losses = [r["val_loss"] for r in records]
    assert losses[-1] < untrained - 0.05, (untrained, losses)
    assert losses[-1] < losses[0], losses


def test_exact_memory_savers_train_the_same_model(small_corpus, partition, tmp_path):
    exact = "recompute-cnn ckpt-transformer fused-quantizer"
    plain = run_pretraining(settings(small_corpus, partition, tmp_path / "plain", rounds=1))
    saved = run_pretraining(settings(small_corpus, partition, tmp_path / "savers", rounds=1, savers=exact))
    assert saved[0]["val_loss"] == pytest.approx(plain[0]["val_loss"], rel=1e-4)
    a = load_file(str(round_dir(tmp_path / "plain", 1) / "model.safetensors"))
    b = load_file(str(round_dir(tmp_path / "savers", 1) / "model.safetensors"))
    assert a.keys() == b.keys()
    # float rounding differs (per-utterance convolutions, a batched-matmul lookup) and AdamW
    # turns it into small steps, so compare each tensor in norm, relative to its size; the
    # attention key bias has a zero gradient up to rounding (softmax ignores it), so AdamW's
    # steps on it are rounding noise either way
    compared = [k for k in a if a[k].is_floating_point() and not k.endswith("attention.k_proj.bias")]
    differ = {k: float((a[k] - b[k]).norm() / (a[k].norm() + 1e-12)) for k in compared}
    assert max(differ.values()) < 1e-3, sorted(differ.items(), key=lambda kv: -kv[1])[:3]
    with pytest.raises(ValueError, match="savers: step-in-backward not available in pretraining"):
        settings(small_corpus, partition, tmp_path / "x", savers="step-in-backward")
    with pytest.raises(ValueError, match="savers: unknown saver"):
        settings(small_corpus, partition, tmp_path / "x", savers="fast-please")


@pytest.mark.parametrize("runner", [run_pretraining, run_centralised], ids=["federated", "centralised"])
def test_cached_cnn_features_train_the_frozen_cnn_model(small_corpus, partition, tmp_path, runner):
    """cache-cnn serves the second local epoch's CNN features from the first: the same model
    as freeze-cnn, whose CNN stays the initial one (the centralised run applies savers too)."""
    from fedspeech.ssl.methods import get_method

    common = dict(rounds=1, local_epochs=2)
    runner(settings(small_corpus, partition, tmp_path / "frozen", savers="freeze-cnn", **common))
    runner(settings(small_corpus, partition, tmp_path / "cached", savers="cache-cnn", **common))
    runner(settings(small_corpus, partition, tmp_path / "trained", **common))
    frozen, cached, trained = (
        load_file(str(round_dir(tmp_path / name, 1) / "model.safetensors")) for name in ("frozen", "cached", "trained")
    )
    cnn = [k for k in frozen if "feature_extractor" in k]
    assert cnn and any(not torch.equal(frozen[k], trained[k]) for k in cnn)  # without the saver the CNN learns
    untrained = get_method(settings(small_corpus, partition, tmp_path / "x")).fresh_model().state_dict()
    assert all(torch.equal(frozen[k], untrained[k]) for k in cnn)
    for key, value in frozen.items():
        torch.testing.assert_close(cached[key], value, rtol=1e-5, atol=1e-6, msg=key)
