"""Start federated fine-tuning: check the inputs, make a speaker partition when none is
given, and run the app in-process or on Flower's Simulation Engine (``fedspeech finetune
--federated``)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

from fedspeech.apps.finetune.settings import RUNNERS, FinetuneSettings
from fedspeech.apps.finetune.task import PARTITION_FILE, RESULT_FILE, task_train_utterances
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition, partition_by_speaker
from fedspeech.downstream.heads import is_preset
from fedspeech.federated import roundlog
from fedspeech.federated.runners import check_runner

APP_COMPONENTS = {
    "serverapp": "fedspeech.apps.finetune.server_app:server_app",
    "clientapp": "fedspeech.apps.finetune.client_app:client_app",
}


def write_flower_app(folder: str | Path, settings: FinetuneSettings) -> Path:
    """A Flower app folder whose components are the fine-tuning apps and whose
    ``[tool.flwr.app.config]`` holds ``settings`` (the repository's own pyproject.toml is the
    pretraining app), so ``flwr run FOLDER`` runs federated fine-tuning."""
    from fedspeech.federated.engines import write_app_folder

    return write_app_folder(
        Path(folder),
        "fedspeech-finetune",
        "fedspeech federated downstream fine-tuning",
        APP_COMPONENTS,
        settings.to_run_config(),
    )


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
    return dataclasses.replace(
        settings, manifest=str(manifest), backbone=backbone, out_dir=str(out), partition=partition
    )


def run_federated_finetune(
    settings: FinetuneSettings, runner: str = "inprocess", timeout: float = 24 * 3600
) -> dict[str, Any]:
    """Run federated fine-tuning with ``runner`` (``inprocess`` or ``simulation``); returns
    the result (test metrics of the best round and bookkeeping, also in ``OUT/result.json``).
    The round log is ``OUT/rounds.jsonl``."""
    check_runner(runner, RUNNERS)
    settings = prepare(settings)
    num_clients = Partition.load(settings.partition).num_clients
    if settings.clients_per_round > num_clients:
        raise ValueError(
            f"clients_per_round: {settings.clients_per_round} exceeds the {num_clients} clients of {settings.partition}"
        )
    out = Path(settings.out_dir)
    if runner == "inprocess":
        from fedspeech.apps.finetune.client_app import client_app
        from fedspeech.apps.finetune.server_app import server_app
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
