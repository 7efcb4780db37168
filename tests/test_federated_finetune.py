"""Federated fine-tuning (``fedspeech.apps.finetune``) on the session corpus with a
very small model: round log, best-round bookkeeping, sample-weighted FedAvg of what the
clients really sent, the shared label set, determinism of a client's round, bad settings."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from safetensors.torch import load_file

from fedspeech.apps.finetune import client_app, server_app, task
from fedspeech.apps.finetune.run import prepare, run_federated_finetune
from fedspeech.apps.finetune.settings import FinetuneSettings
from fedspeech.apps.finetune.task import class_names, local_finetune
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition, PartitionError
from fedspeech.downstream.finetune import selection_key
from fedspeech.downstream.state import trainable_state
from fedspeech.downstream.tasks import task_data
from fedspeech.federated import roundlog
from fedspeech.federated.inprocess import run_inprocess
from synthetic import SMALL

HEAD = "head.weight"


def settings_for(manifest, out, **changes) -> FinetuneSettings:
    values = dict(
        task="kws",
        manifest=str(manifest),
        out_dir=str(out),
        model_overrides=json.dumps(SMALL),
        clients=3,
        rounds=2,
        local_epochs=1,
        batch_size=8,
        max_seconds=1.0,
        lr_backbone=1e-4,
        lr_head=1e-2,
    )
    return FinetuneSettings(**{**values, **changes})


def recording_client(calls: list[dict]) -> ClientApp:
    """The real ClientApp function, wrapped to keep what each client received and sent."""
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = client_app.client_train(msg, context)
        config = msg.content["config"]
        calls.append(
            {
                "round": int(config["server-round"]),
                "client": int(context.node_config["partition-id"]),
                "classes": list(config["classes"]),
                "lr_scale": float(config["lr-scale"]),
                "received": msg.content["arrays"].to_torch_state_dict(),
                "sent": reply.content["arrays"].to_torch_state_dict(),
                "examples": int(reply.content["metrics"]["num-examples"]),
            }
        )
        return reply

    return app


@pytest.fixture(scope="module")
def kws_run(small_corpus, tmp_path_factory):
    """3 clients (speaker partition of the 4 training speakers), 2 rounds, in-process."""
    settings = prepare(settings_for(small_corpus, tmp_path_factory.mktemp("fed-kws")))
    calls: list[dict] = []
    run_inprocess(server_app.server_app, recording_client(calls), 3, settings.to_run_config())
    result = json.loads((Path(settings.out_dir) / "result.json").read_text())
    return settings, calls, roundlog.read_rounds(settings.out_dir), result


def test_round_log_and_result(kws_run, small_corpus):
    settings, calls, records, result = kws_run
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["sampled"] == [0, 1, 2] and record["failed"] == []
        assert set(record["dev"]) == {"accuracy", "loss"} and 0 <= record["dev"]["accuracy"] <= 1
        assert record["bytes_from_clients"] > 0 and record["train_loss"] > 0
    assert sum(c["examples"] for c in records[0]["clients"]) == result["num_train"] == 48  # 4 speakers x 12
    assert result["task"] == "kws" and result["federated"] and result["num_eval"] == 12 and result["num_dev"] == 12
    assert 0 <= result["accuracy"] <= 1 and sum(map(sum, result["confusion_matrix"])) == 12
    assert result["steps"] == sum(c["steps"] for r in records for c in r["clients"])
    # every client, every round, was told the full label set of the manifest
    labels = sorted({u.label for u in read_manifest(small_corpus) if u.label})
    assert result["labels"] == labels and all(c["classes"] == labels for c in calls)
    assert calls[0]["received"][HEAD].shape[0] == len(labels)
    assert Partition.load(settings.partition).scheme == "speaker"


def test_best_round_bookkeeping(kws_run):
    settings, _, records, result = kws_run
    keys = [selection_key(r["dev"]) for r in records]
    expected = 1 if keys[0] >= keys[1] else 2  # ties keep the earlier round
    assert [r["best_round"] for r in records] == [1, expected]
    assert result["best_round"] == expected and result["selected_on"] == "dev accuracy"
    folders = sorted(p.name for p in (Path(settings.out_dir) / "checkpoints").iterdir())
    assert folders == [f"round_{expected:04d}"]  # only the best round is kept
    # the saved head is that round's aggregate
    saved = load_file(str(Path(result["checkpoint"]) / "extra.safetensors"))
    assert torch.allclose(saved[HEAD].double(), weighted_average(calls_of(kws_run, expected)), atol=1e-6)


def calls_of(run, server_round: int) -> list[dict]:
    return [c for c in run[1] if c["round"] == server_round]


def weighted_average(calls: list[dict]) -> torch.Tensor:
    """Σ n_k w_k / Σ n_k of the head the clients sent (FedAvg, by hand)."""
    sizes = torch.tensor([c["examples"] for c in calls], dtype=torch.float64)
    stacked = torch.stack([c["sent"][HEAD].double() for c in calls])
    return (sizes.view(-1, 1, 1) * stacked).sum(0) / sizes.sum()


def test_aggregate_is_the_sample_weighted_average_of_client_updates(kws_run):
    _, _, records, _ = kws_run
    first, second = calls_of(kws_run, 1), calls_of(kws_run, 2)
    sizes = torch.tensor([c["examples"] for c in first], dtype=torch.float64)
    assert len(set(sizes.tolist())) > 1, "unequal clients are needed to tell weighted from plain averages"
    stacked = torch.stack([c["sent"][HEAD].double() for c in first])
    weighted = weighted_average(first)
    aggregate = second[0]["received"][HEAD].double()
    assert torch.allclose(aggregate, weighted, atol=1e-6)
    assert not torch.allclose(aggregate, stacked.mean(0), atol=1e-6)
    assert all(torch.equal(c["received"][HEAD], second[0]["received"][HEAD]) for c in second)
    weights = sorted(records[0]["aggregation"]["weights"].values())
    assert weights == pytest.approx(sorted((sizes / sizes.sum()).tolist()), abs=1e-6)


def test_a_client_round_is_reproducible(kws_run):
    settings, _, _, _ = kws_run
    call = calls_of(kws_run, 1)[1]
    state, metrics = local_finetune(
        settings,
        {"partition-id": call["client"]},
        call["received"],
        call["classes"],
        server_round=1,
        lr_scale=call["lr_scale"],
    )
    assert metrics["num-examples"] == call["examples"]
    assert torch.equal(state[HEAD], call["sent"][HEAD])
    assert not torch.equal(state[HEAD], call["received"][HEAD])  # it did train


def test_speaker_clients_share_every_speaker_as_a_class(small_corpus, tmp_path):
    settings = prepare(settings_for(small_corpus, tmp_path, task="speaker", clients=2))
    classes = class_names("speaker", task_data(read_manifest(small_corpus), "speaker"))
    assert len(classes) == 6
    model = task.build_model(settings, classes)
    state, metrics = local_finetune(
        settings, {"partition-id": 0}, trainable_state(model), classes, server_round=1, lr_scale=1.0
    )
    client_speakers = {
        u.speaker
        for u in task.client_task_utterances(settings.manifest, settings.partition, 0, "speaker", settings.seed)
    }
    assert len(client_speakers) < len(classes) and state[HEAD].shape[0] == len(classes)
    assert metrics["steps"] >= 1


def test_settings_round_trip_and_bad_settings(small_corpus, tmp_path, kws_run):
    settings = settings_for(small_corpus, tmp_path, layer_weighted=True, use_dev=False)
    assert FinetuneSettings.from_run_config(settings.to_run_config()) == settings
    with pytest.raises(ValueError, match="task: must be one of"):
        FinetuneSettings(task="emotion")
    with pytest.raises(ValueError, match="rounds: must be >= 1"):
        FinetuneSettings(rounds=0)
    with pytest.raises(ValueError, match="strategy: must be one of"):
        FinetuneSettings(strategy="fedu")
    with pytest.raises(ValueError, match="model_overrides: not JSON"):
        FinetuneSettings(model_overrides="{hidden")
    with pytest.raises(ValueError, match="layer_weighted applies to kws and speaker only"):
        FinetuneSettings(task="asr", layer_weighted=True)
    with pytest.raises(PartitionError, match="4 speakers for 5 clients"):
        run_federated_finetune(settings_for(small_corpus, tmp_path / "five", clients=5))
    with pytest.raises(ValueError, match="runner: unknown 'ray'"):
        run_federated_finetune(settings_for(small_corpus, tmp_path / "ray"), runner="ray")
    with pytest.raises(ValueError, match="clients_per_round: 4 exceeds the 3 clients"):
        run_federated_finetune(settings_for(small_corpus, tmp_path / "k", clients_per_round=4))
    with pytest.raises(ValueError, match="holds an earlier run"):
        run_federated_finetune(kws_run[0])
