"""The Flower app for federated downstream fine-tuning (ASR, keyword spotting, speaker ID):
one ``ServerApp`` and one ``ClientApp``, run unchanged by the in-process runner and by
Flower's Simulation Engine (``run_federated_finetune``).

Clients are a partition of the task's *training* utterances (by default speaker-disjoint,
made with :func:`fedspeech.data.partition.partition_by_speaker` into ``OUT/partition.json``).
Every train message carries the class list (keywords, speakers, or CTC characters), fixed
by the server from the whole manifest, so every client builds the same head even when it
has seen only a few classes. A client loads the global trainable weights (backbone and
head; a frozen CNN is never sent, since every side builds it from the same seed or
checkpoint), fine-tunes ``local-epochs`` on its own utterances with the centralised loop
(:func:`fedspeech.downstream.finetune.train_epochs`) and replies with what it trained and
its number of utterances.

Server: samples clients deterministically per (seed, round), aggregates with the chosen
rule (sample-weighted FedAvg by default), evaluates the global model on dev every round
(accuracy, or WER/CER for ASR), keeps the best round (its model under
``OUT/checkpoints/round_NNNN``), writes one JSON line per round, and at the end evaluates
the best round's model on test into ``OUT/result.json``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import Utterance, read_manifest
from fedspeech.data.partition import Partition, client_utterances, partition_by_speaker
from fedspeech.downstream.finetune import (
    DEV_KEYS,
    evaluate_asr,
    evaluate_classifier,
    evaluation_dataset,
    seeded,
    selection_key,
    train_epochs,
    training_dataset,
)
from fedspeech.downstream.heads import (
    CTCModel,
    DownstreamModel,
    UtteranceClassifier,
    is_preset,
    make_optimizer,
    wants_normalized_audio,
)
from fedspeech.downstream.state import load_trainable_state, trainable_state
from fedspeech.downstream.tasks import TaskData, asr_utterances, in_split, kws_utterances, speaker_id_split, task_data
from fedspeech.downstream.text import CharVocab
from fedspeech.federated import checkpoints, roundlog
from fedspeech.federated.finetune_settings import FinetuneSettings
from fedspeech.federated.inprocess import client_rows, message_bytes
from fedspeech.federated.sampling import SampledGrid, sampled_nodes, wait_for_nodes
from fedspeech.federated.strategies import make_strategy

log = logging.getLogger(__name__)

client_app = ClientApp()
server_app = ServerApp()

RESULT_FILE = "result.json"
PARTITION_FILE = "partition.json"
CLASSES_KEY = "classes"  # config key: the class list (CTC: the vocabulary's tokens)
LR_SCALE_KEY = "lr-scale"
TARGET_FIELD = {"kws": "label", "speaker": "speaker"}
RUNNERS = ("inprocess", "simulation")
APP_COMPONENTS = {"serverapp": "fedspeech.federated.finetune_app:server_app",
                  "clientapp": "fedspeech.federated.finetune_app:client_app"}


# ----------------------------------------------------------------------------- data and model


def task_train_utterances(utterances: list[Utterance], task: str, seed: int) -> list[Utterance]:
    """The task's training utterances (the pool clients are carved from); unlike
    ``task_data`` it needs no test split, so a SuperNode's own manifest will do."""
    if task == "speaker":
        return speaker_id_split(utterances, seed=seed)[0]
    return in_split(asr_utterances(utterances) if task == "asr" else kws_utterances(utterances), "train")


def class_names(task: str, data: TaskData) -> list[str]:
    """The fixed label vocabulary of a run, from every split of the manifest (as the
    centralised run does): classifier classes, or the CTC vocabulary's tokens."""
    everything = [*data.train, *data.dev, *data.test]
    if task == "asr":
        return CharVocab.from_texts(u.transcript for u in everything).tokens
    field = TARGET_FIELD[task]
    if empty := [u.id for u in everything if not getattr(u, field)]:
        raise ValueError(f"task {task}: utterance(s) without a {field}: {empty[:5]}")
    return sorted({getattr(u, field) for u in everything})


def build_model(settings: FinetuneSettings, classes: list[str]) -> DownstreamModel:
    """The global model's architecture, identical on every side: built under the run's
    seed, so frozen (never transmitted) weights of a random-init preset agree too."""
    options = dict(freeze_feature_encoder=settings.freeze_cnn, freeze_backbone=settings.freeze_backbone,
                   **settings.config_overrides)
    with seeded(settings.seed):
        if settings.task == "asr":
            return CTCModel.build(settings.backbone, CharVocab.from_dict({"tokens": classes}), **options)
        return UtteranceClassifier.build(settings.backbone, classes, target_field=TARGET_FIELD[settings.task],
                                         layer_weighted=settings.layer_weighted, **options)


def evaluate(model: DownstreamModel, loader) -> dict[str, Any]:
    return evaluate_asr(model, loader) if isinstance(model, CTCModel) else evaluate_classifier(model, loader)


def client_task_utterances(manifest: str, partition: str, client_id: int, task: str, seed: int) -> list[Utterance]:
    """A client's labelled utterances of the task. A partition made for pretraining works
    too: it is intersected with the task's training utterances."""
    utterances = read_manifest(manifest)
    usable = {u.id for u in task_train_utterances(utterances, task, seed)}
    mine = [u for u in client_utterances(Partition.load(partition), utterances, client_id) if u.id in usable]
    if not mine:
        raise ValueError(f"client {client_id} of {partition} holds no {task} training utterances of {manifest}")
    return mine


@lru_cache(maxsize=256)
def _client_dataset(manifest: str, partition: str, client_id: int, task: str, max_seconds: float,
                    seed: int) -> AudioDataset:
    """A client's training audio, decoded once per process (clients are called every round)."""
    return training_dataset(client_task_utterances(manifest, partition, client_id, task, seed),
                            max_seconds=max_seconds or None, seed=seed + client_id, crop_training=task != "asr")


def _num_train(settings: FinetuneSettings, num_clients: int) -> int:
    """Training utterances over all clients, counted without decoding audio on the server
    (ASR drops clips longer than ``max_seconds``, as ``training_dataset`` does)."""
    total = 0
    for client in range(num_clients):
        mine = client_task_utterances(settings.manifest, settings.partition, client, settings.task, settings.seed)
        if settings.task == "asr" and settings.max_seconds:
            mine = [u for u in mine if u.duration <= settings.max_seconds]
        total += len(mine)
    return total


def _round_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(p) for p in parts]).generate_state(1)[0])


# ----------------------------------------------------------------------------- client


def local_finetune(settings: FinetuneSettings, node_config: dict, global_state: dict[str, torch.Tensor],
                   classes: list[str], server_round: int, lr_scale: float) -> tuple[dict[str, torch.Tensor], dict]:
    """One client's round on plain tensors: load the global weights, fine-tune backbone and
    head on the client's utterances, return (trained weights, metrics). Deterministic per
    (seed, round, client), so a test can recompute what a client sent."""
    client_id = int(node_config["partition-id"])
    # A SuperNode may point at its own files (--node-config "manifest=... partition=...").
    manifest = str(node_config.get("manifest", settings.manifest))
    partition = str(node_config.get("partition", settings.partition))
    started = time.perf_counter()
    model = build_model(settings, classes)
    load_trainable_state(model, global_state)
    dataset = _client_dataset(manifest, partition, client_id, settings.task, settings.max_seconds, settings.seed)
    loader = make_loader(dataset, settings.batch_size, shuffle=True,
                         seed=_round_seed(settings.seed, server_round, client_id),
                         normalize=wants_normalized_audio(settings.backbone))
    optimizer = make_optimizer(model, settings.lr_backbone * lr_scale, settings.lr_head * lr_scale)
    with seeded(_round_seed(settings.seed, server_round, client_id, 1)):  # dropout, SpecAugment
        stats = train_epochs(model, loader, optimizer, epochs=settings.local_epochs,
                             grad_clip=settings.grad_clip or None,
                             start_epoch=(server_round - 1) * settings.local_epochs)
    metrics = {
        "num-examples": len(dataset),  # FedAvg weight n_k: the client's utterances
        "train_loss": stats.last_loss,
        "partition-id": client_id,
        "steps": stats.steps,
        "skipped-batches": stats.skipped_batches,
        "seconds": time.perf_counter() - started,
    }
    return trainable_state(model), metrics


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    state, metrics = local_finetune(
        FinetuneSettings.from_run_config(context.run_config), dict(context.node_config),
        msg.content["arrays"].to_torch_state_dict(), [str(c) for c in config[CLASSES_KEY]],
        server_round=int(config["server-round"]), lr_scale=float(config[LR_SCALE_KEY]),
    )
    content = RecordDict({"arrays": ArrayRecord(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- server


def _save_best(out: Path, server_round: int, model: DownstreamModel, classes: list[str],
               settings: FinetuneSettings) -> Path:
    """The best round's model: an HF folder (the CTC model, or the classifier's backbone)
    plus the classifier head in ``extra.safetensors``; older best rounds are removed."""
    if isinstance(model, CTCModel):
        hf_model, extra = model.hf, {}
    else:
        in_backbone = {f"speech_model.{name}" for name in model.backbone.state_dict()}
        hf_model = model.backbone
        extra = {k: v for k, v in model.state_dict().items() if k not in in_backbone}
    folder = checkpoints.save_checkpoint(out, server_round, hf_model, extra,
                                         state={"task": settings.task, "classes": classes,
                                                "settings": settings.to_run_config()})
    checkpoints.prune_checkpoints(out, 1)
    return folder


def run_server(grid: Grid, settings: FinetuneSettings) -> dict[str, Any]:
    """Run the federated fine-tuning; returns (and writes to ``OUT/result.json``) the test
    result of the best round."""
    out = Path(settings.out_dir)
    if roundlog.log_path(out).exists():
        raise ValueError(f"{out}: holds an earlier run (fine-tuning does not resume); choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    if not settings.partition:
        raise ValueError("partition: required by the ServerApp (run_federated_finetune makes one)")
    utterances = read_manifest(settings.manifest)
    data = task_data(utterances, settings.task, seed=settings.seed)
    classes = class_names(settings.task, data)
    model = build_model(settings, classes)
    crop = settings.task != "asr"
    options = dict(max_seconds=settings.max_seconds_or_none, seed=settings.seed, crop_training=crop)
    normalize = wants_normalized_audio(settings.backbone)
    dev_loader = None
    if settings.use_dev and data.dev:
        dev_loader = make_loader(evaluation_dataset(data.dev, **options), settings.batch_size, normalize=normalize)
    test_loader = make_loader(evaluation_dataset(data.test, **options), settings.batch_size, normalize=normalize)
    metric = "wer" if settings.task == "asr" else "accuracy"

    num_clients = Partition.load(settings.partition).num_clients
    nodes = wait_for_nodes(grid, num_clients)
    # Sampling is ours (SampledGrid): the strategy addresses every node it is shown.
    strategy = make_strategy(settings.strategy, fraction_train=1.0, fraction_evaluate=0.0, min_train_nodes=1,
                             min_available_nodes=1)
    arrays = ArrayRecord(trainable_state(model))
    history: list[dict] = []
    best_key, best_round, best_state, total_steps = None, None, None, 0
    started_run = time.perf_counter()
    for server_round in range(1, settings.rounds + 1):
        started = time.perf_counter()
        chosen = sampled_nodes(nodes, settings.clients_per_round, server_round, settings.seed)
        config = ConfigRecord({LR_SCALE_KEY: settings.lr_scale(server_round), CLASSES_KEY: list(classes)})
        messages = list(strategy.configure_train(server_round, arrays, config, SampledGrid(grid, chosen)))
        replies = list(grid.send_and_receive(messages))
        clients = client_rows(replies)
        ok = [c for c in clients if "error" not in c]
        if not ok:
            reasons = "; ".join(c["error"] for c in clients) or "no replies"
            raise RuntimeError(f"round {server_round}: every client failed: {reasons}")
        new_arrays, _ = strategy.aggregate_train(server_round, replies)
        if new_arrays is not None:  # the strategies return the full global record
            arrays = new_arrays
        load_trainable_state(model, arrays.to_torch_state_dict())
        total_steps += sum(c["steps"] for c in ok)
        examples = sum(c["examples"] for c in ok)
        record: dict[str, Any] = {
            "round": server_round,
            "sampled": sorted(c["client"] for c in ok),
            "failed": [c for c in clients if "error" in c],
            "clients": ok,
            "aggregation": strategy.last_report.log_record() if strategy.last_report else {},
            "train_loss": sum(c["train_loss"] * c["examples"] for c in ok) / max(1, examples),
            "lr_scale": config[LR_SCALE_KEY],
            "bytes_to_clients": sum(message_bytes(m) for m in messages),
            "bytes_from_clients": sum(message_bytes(r) for r in replies),
        }
        if dev_loader is not None:
            record["dev"] = {k: v for k, v in evaluate(model, dev_loader).items() if k in DEV_KEYS}
            key = selection_key(record["dev"])
            improved = best_key is None or key > best_key  # ties keep the earlier round
        else:
            key, improved = None, True  # without dev the last round is the one reported
        if improved:
            best_key, best_round, best_state = key, server_round, trainable_state(model)
            _save_best(out, server_round, model, classes, settings)
        record["best_round"] = best_round
        record["round_seconds"] = round(time.perf_counter() - started, 3)
        roundlog.append_round(out, record)
        history.append(record)
        log.info("round %d: train loss %.4f%s (best round %d)", server_round, record["train_loss"],
                 f", dev {metric} {record['dev'][metric]:.4f}" if "dev" in record else "", best_round)
    train_seconds = time.perf_counter() - started_run

    best = checkpoints.round_dir(out, best_round)
    load_trainable_state(model, best_state)
    result = evaluate(model, test_loader)
    partition = Partition.load(settings.partition)
    result.update(
        task=settings.task, backbone=settings.backbone, federated=True, strategy=settings.strategy,
        rounds=settings.rounds, num_clients=num_clients, clients_per_round=min(settings.clients_per_round or num_clients, num_clients),
        local_epochs=settings.local_epochs, best_round=best_round,
        selected_on=f"dev {metric}" if dev_loader is not None else "last round",
        round_losses=[h["train_loss"] for h in history],
        history=[{k: h[k] for k in ("round", "train_loss", "dev", "best_round") if k in h} for h in history],
        num_train=_num_train(settings, num_clients),
        num_dev=len(data.dev) if dev_loader is not None else 0, num_eval=len(data.test), steps=total_steps,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        train_seconds=round(train_seconds, 2), seed=settings.seed, out_dir=str(out), checkpoint=str(best),
        partition=settings.partition, partition_scheme=partition.scheme,
    )
    if settings.task == "asr":
        result["vocab"] = classes
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, FinetuneSettings.from_run_config(context.run_config))


# ----------------------------------------------------------------------------- runners


def write_flower_app(folder: str | Path, settings: FinetuneSettings) -> Path:
    """A Flower app folder whose components are this module's apps and whose
    ``[tool.flwr.app.config]`` holds ``settings`` (the repository's own pyproject.toml is the
    pretraining app), so ``flwr run FOLDER`` runs federated fine-tuning."""
    from fedspeech.federated.engines import write_app_folder

    return write_app_folder(Path(folder), "fedspeech-finetune", "fedspeech federated downstream fine-tuning",
                            APP_COMPONENTS, settings.to_run_config())


def prepare(settings: FinetuneSettings) -> FinetuneSettings:
    """Check the inputs and make paths absolute (engines run the apps in other processes and
    folders); without a partition, write a speaker partition of the task's training
    utterances with ``settings.clients`` clients to ``OUT/partition.json``."""
    if not settings.manifest:
        raise ValueError("--manifest is required")
    manifest = Path(settings.manifest).resolve()
    if not manifest.is_file():
        raise FileNotFoundError(f"{manifest}: manifest not found")
    backbone = settings.backbone
    if not is_preset(backbone):
        if not (Path(backbone) / "config.json").is_file():
            raise ValueError(f"--backbone {backbone}: not a preset (tiny, base, large) and no config.json there")
        backbone = str(Path(backbone).resolve())
    out = Path(settings.out_dir).resolve()
    if roundlog.log_path(out).exists():
        raise ValueError(f"{out}: holds an earlier run (fine-tuning does not resume); choose another --out")
    if settings.partition:
        partition = str(Path(settings.partition).resolve())
        Partition.load(partition)  # fails now, naming the file, rather than in every client
    else:
        utterances = read_manifest(manifest)
        train = task_train_utterances(utterances, settings.task, settings.seed)
        if not train:
            raise ValueError(f"task {settings.task}: no training utterances in {manifest}")
        made = partition_by_speaker(train, settings.clients, settings.seed, split=None, manifest=str(manifest))
        partition = str(made.save(out / PARTITION_FILE))
    return dataclasses.replace(settings, manifest=str(manifest), backbone=backbone, out_dir=str(out),
                               partition=partition)


def run_federated_finetune(settings: FinetuneSettings, runner: str = "inprocess",
                           timeout: float = 24 * 3600) -> dict[str, Any]:
    """Run federated fine-tuning with ``runner`` (``inprocess`` or ``simulation``); returns
    the result (test metrics of the best round and bookkeeping, also in ``OUT/result.json``).
    The round log is ``OUT/rounds.jsonl``."""
    if runner not in RUNNERS:
        raise ValueError(f"runner: unknown {runner!r} ({', '.join(RUNNERS)})")
    settings = prepare(settings)
    num_clients = Partition.load(settings.partition).num_clients
    if settings.clients_per_round > num_clients:
        raise ValueError(f"clients_per_round: {settings.clients_per_round} exceeds the {num_clients} clients "
                         f"of {settings.partition}")
    out = Path(settings.out_dir)
    if runner == "inprocess":
        from fedspeech.federated.inprocess import run_inprocess

        run_inprocess(server_app, client_app, num_clients, settings.to_run_config())
    else:
        from fedspeech.federated.engines import run_simulation

        app_dir = write_flower_app(out / "flwr-app", settings)
        run_simulation(app_dir, settings.to_run_config(), num_clients, flwr_home=out / "flwr-home", timeout=timeout)
    path = out / RESULT_FILE
    if not path.is_file():
        raise RuntimeError(f"{path}: the run finished without a result")
    return json.loads(path.read_text(encoding="utf-8"))


__all__ = ["FinetuneSettings", "build_model", "class_names", "client_app", "client_task_utterances", "evaluate",
           "local_finetune", "prepare", "run_federated_finetune", "run_server", "server_app",
           "task_train_utterances", "write_flower_app"]
