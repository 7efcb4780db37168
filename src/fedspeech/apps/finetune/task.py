"""The science of federated downstream fine-tuning (ASR, keyword spotting, speaker ID), free
of Flower: the task's training pool and class list, the global model's architecture and a
client's local round. ``client_app``/``server_app`` wrap it; ``run`` starts it.

Clients are a partition of the task's *training* utterances (by default speaker-disjoint,
made with :func:`fedspeech.data.partition.partition_by_speaker` into ``OUT/partition.json``).
Every train message carries the class list (keywords, speakers, or CTC characters), fixed
by the server from the whole manifest, so every client builds the same head even when it
has seen only a few classes. A client loads the global trainable weights (backbone and
head; a frozen CNN is never sent, since every side builds it from the same seed or
checkpoint), fine-tunes ``local-epochs`` on its own utterances with the centralised loop
(:func:`fedspeech.downstream.finetune.train_epochs`) and replies with what it trained and
its number of utterances.
"""

from __future__ import annotations

import time
from functools import lru_cache
from typing import Any

import numpy as np
import torch

from fedspeech.apps.finetune.settings import FinetuneSettings
from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import Utterance, read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.downstream.finetune import evaluate_asr, evaluate_classifier, seeded, train_epochs, training_dataset
from fedspeech.downstream.heads import (
    CTCModel,
    DownstreamModel,
    UtteranceClassifier,
    make_optimizer,
    wants_normalized_audio,
)
from fedspeech.downstream.state import load_trainable_state, trainable_state
from fedspeech.downstream.tasks import TaskData, asr_utterances, in_split, kws_utterances, speaker_id_split
from fedspeech.downstream.text import CharVocab

RESULT_FILE = "result.json"
PARTITION_FILE = "partition.json"
CLASSES_KEY = "classes"  # config key: the class list (CTC: the vocabulary's tokens)
LR_SCALE_KEY = "lr-scale"
TARGET_FIELD = {"kws": "label", "speaker": "speaker"}


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
    options = dict(
        freeze_feature_encoder=settings.freeze_cnn,
        freeze_backbone=settings.freeze_backbone,
        **settings.config_overrides,
    )
    with seeded(settings.seed):
        if settings.task == "asr":
            return CTCModel.build(settings.backbone, CharVocab.from_dict({"tokens": classes}), **options)
        return UtteranceClassifier.build(
            settings.backbone,
            classes,
            target_field=TARGET_FIELD[settings.task],
            layer_weighted=settings.layer_weighted,
            **options,
        )


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
def _client_dataset(
    manifest: str, partition: str, client_id: int, task: str, max_seconds: float, seed: int
) -> AudioDataset:
    """A client's training audio, decoded once per process (clients are called every round)."""
    return training_dataset(
        client_task_utterances(manifest, partition, client_id, task, seed),
        max_seconds=max_seconds or None,
        seed=seed + client_id,
        crop_training=task != "asr",
    )


def num_train_utterances(settings: FinetuneSettings, num_clients: int) -> int:
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


def local_finetune(
    settings: FinetuneSettings,
    node_config: dict,
    global_state: dict[str, torch.Tensor],
    classes: list[str],
    server_round: int,
    lr_scale: float,
) -> tuple[dict[str, torch.Tensor], dict]:
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
    loader = make_loader(
        dataset,
        settings.batch_size,
        shuffle=True,
        seed=_round_seed(settings.seed, server_round, client_id),
        normalize=wants_normalized_audio(settings.backbone),
    )
    optimizer = make_optimizer(model, settings.lr_backbone * lr_scale, settings.lr_head * lr_scale)
    with seeded(_round_seed(settings.seed, server_round, client_id, 1)):  # dropout, SpecAugment
        stats = train_epochs(
            model,
            loader,
            optimizer,
            epochs=settings.local_epochs,
            grad_clip=settings.grad_clip or None,
            start_epoch=(server_round - 1) * settings.local_epochs,
        )
    metrics = {
        "num-examples": len(dataset),  # FedAvg weight n_k: the client's utterances
        "train_loss": stats.last_loss,
        "partition-id": client_id,
        "steps": stats.steps,
        "skipped-batches": stats.skipped_batches,
        "seconds": time.perf_counter() - started,
    }
    return trainable_state(model), metrics
