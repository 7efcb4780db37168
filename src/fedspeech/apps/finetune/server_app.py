"""The fine-tuning ``ServerApp``: fixes the class list from the whole manifest, runs the shared
round loop (:mod:`fedspeech.federated.round_loop`) with the chosen rule (sample-weighted
FedAvg by default), evaluates the global model on dev every round (accuracy, or WER/CER for
ASR), keeps the best round's model under ``OUT/checkpoints/round_NNNN`` and at the end
evaluates it on test into ``OUT/result.json``. A round in which every client failed stops
the run (there is nothing to aggregate); fine-tuning runs are short and do not resume."""

from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedspeech.apps.finetune.settings import FinetuneSettings
from fedspeech.apps.finetune.task import (
    CLASSES_KEY,
    LR_SCALE_KEY,
    RESULT_FILE,
    build_model,
    class_names,
    evaluate,
    num_train_utterances,
)
from fedspeech.data.audio import make_loader
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition
from fedspeech.downstream.finetune import DEV_KEYS, evaluation_dataset, selection_key
from fedspeech.downstream.heads import CTCModel, DownstreamModel, wants_normalized_audio
from fedspeech.downstream.state import load_trainable_state, trainable_state
from fedspeech.downstream.tasks import task_data
from fedspeech.federated import checkpoints
from fedspeech.federated.inprocess import client_rows, message_bytes
from fedspeech.federated.round_loop import RoundHooks, RoundOutcome, resume_point, round_totals, run_rounds
from fedspeech.federated.rules import rule_options
from fedspeech.federated.sampling import wait_for_nodes
from fedspeech.federated.strategies import make_strategy

log = logging.getLogger(__name__)

server_app = ServerApp()


def _save_best(
    out: Path, server_round: int, model: DownstreamModel, classes: list[str], settings: FinetuneSettings
) -> Path:
    """The best round's model: an HF folder (the CTC model, or the classifier's backbone)
    plus the classifier head in ``extra.safetensors``; older best rounds are removed."""
    if isinstance(model, CTCModel):
        hf_model, extra = model.hf, {}
    else:
        in_backbone = {f"speech_model.{name}" for name in model.backbone.state_dict()}
        hf_model = model.backbone
        extra = {k: v for k, v in model.state_dict().items() if k not in in_backbone}
    folder = checkpoints.save_checkpoint(
        out,
        server_round,
        hf_model,
        extra,
        state={"task": settings.task, "classes": classes, "settings": settings.to_run_config()},
    )
    checkpoints.prune_checkpoints(out, 1, resumable=False)  # best round only; fine-tuning does not resume
    return folder


class FinetuneRounds(RoundHooks):
    """Fine-tuning's part of each round: the class list and lr scale sent out, a stop when
    every client failed, then the dev evaluation and best-round checkpoint."""

    def __init__(self, settings: FinetuneSettings, model: DownstreamModel, classes: list[str], dev_loader):
        self.settings, self.model, self.classes, self.dev_loader = settings, model, classes, dev_loader
        self.out = Path(settings.out_dir)
        self.metric = "wer" if settings.task == "asr" else "accuracy"
        self.best_key: Any = None
        self.best_round: int | None = None
        self.best_state: dict | None = None
        self.total_steps = 0

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {LR_SCALE_KEY: self.settings.lr_scale(server_round), CLASSES_KEY: list(self.classes)}

    def check_replies(self, server_round: int, replies: list[Message]) -> None:
        clients = client_rows(replies)
        if not [c for c in clients if "error" not in c]:
            reasons = "; ".join(c["error"] for c in clients) or "no replies"
            raise RuntimeError(f"round {server_round}: every client failed: {reasons}")

    def after_round(self, outcome: RoundOutcome) -> dict[str, Any]:
        model, server_round = self.model, outcome.server_round
        load_trainable_state(model, outcome.arrays.to_torch_state_dict())
        clients = client_rows(outcome.replies, bytes_sent=outcome.bytes_by_node())
        ok = [c for c in clients if "error" not in c]
        self.total_steps += sum(c["steps"] for c in ok)
        totals = round_totals(ok)
        record: dict[str, Any] = {
            "round": server_round,
            "sampled": totals["sampled"],
            "failed": [c for c in clients if "error" in c],
            "clients": ok,
            "aggregation": outcome.report.log_record() if outcome.report else {},
            "train_loss": totals["train_loss"],
            "lr_scale": outcome.config[LR_SCALE_KEY],
            "bytes_to_clients": sum(message_bytes(m) for m in outcome.messages),
            "bytes_from_clients": sum(outcome.bytes_by_node().values()),
        }
        if self.dev_loader is not None:
            record["dev"] = {k: v for k, v in evaluate(model, self.dev_loader).items() if k in DEV_KEYS}
            key = selection_key(record["dev"])
            improved = self.best_key is None or key > self.best_key  # ties keep the earlier round
        else:
            key, improved = None, True  # without dev the last round is the one reported
        if improved:
            self.best_key, self.best_round, self.best_state = key, server_round, trainable_state(model)
            _save_best(self.out, server_round, model, self.classes, self.settings)
        record["best_round"] = self.best_round
        log.info(
            "round %d: train loss %.4f%s (best round %d)",
            server_round,
            record["train_loss"],
            f", dev {self.metric} {record['dev'][self.metric]:.4f}" if "dev" in record else "",
            self.best_round,
        )
        return record


def run_server(grid: Grid, settings: FinetuneSettings) -> dict[str, Any]:
    """Run the federated fine-tuning; returns (and writes to ``OUT/result.json``) the test
    result of the best round."""
    out = Path(settings.out_dir)
    resume_point(out, False, resumable=False)  # refuses a folder holding an earlier run
    out.mkdir(parents=True, exist_ok=True)
    if not settings.partition:
        raise ValueError("partition: required by the ServerApp (run_federated_finetune makes one)")
    data = task_data(read_manifest(settings.manifest), settings.task, seed=settings.seed)
    classes = class_names(settings.task, data)
    model = build_model(settings, classes)
    options: dict[str, Any] = dict(
        max_seconds=settings.max_seconds_or_none, seed=settings.seed, crop_training=settings.task != "asr"
    )
    normalize = wants_normalized_audio(settings.backbone)
    dev_loader = None
    if settings.use_dev and data.dev:
        dev_loader = make_loader(evaluation_dataset(data.dev, **options), settings.batch_size, normalize=normalize)
    test_loader = make_loader(evaluation_dataset(data.test, **options), settings.batch_size, normalize=normalize)

    partition = Partition.load(settings.partition)
    num_clients = partition.num_clients
    nodes = wait_for_nodes(grid, num_clients)
    # Sampling is the round loop's (SampledGrid): the strategy addresses every node it is shown.
    strategy = make_strategy(
        settings.strategy,
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        **rule_options(settings.strategy, settings),
    )
    strategy.dp_population = num_clients
    hooks = FinetuneRounds(settings, model, classes, dev_loader)
    started_run = time.perf_counter()
    history = run_rounds(
        grid,
        strategy,
        hooks,
        ArrayRecord(trainable_state(model)),
        nodes=nodes,
        clients_per_round=settings.clients_per_round,
        seed=settings.seed,
        rounds=settings.rounds,
        out=out,
        label="federated fine-tuning",
        reply_timeout=settings.reply_timeout,
        secure_aggregation=settings.secure_aggregation,
    )
    train_seconds = time.perf_counter() - started_run

    # settings.rounds >= 1 and the first round always counts as the best so far
    assert hooks.best_round is not None and hooks.best_state is not None
    best = checkpoints.round_dir(out, hooks.best_round)
    load_trainable_state(model, hooks.best_state)
    result = evaluate(model, test_loader)
    result.update(
        task=settings.task,
        backbone=settings.backbone,
        federated=True,
        strategy=settings.strategy,
        rounds=settings.rounds,
        num_clients=num_clients,
        clients_per_round=min(settings.clients_per_round or num_clients, num_clients),
        local_epochs=settings.local_epochs,
        best_round=hooks.best_round,
        selected_on=f"dev {hooks.metric}" if dev_loader is not None else "last round",
        round_losses=[h["train_loss"] for h in history],
        history=[{k: h[k] for k in ("round", "train_loss", "dev", "best_round") if k in h} for h in history],
        num_train=num_train_utterances(settings, num_clients),
        num_dev=len(data.dev) if dev_loader is not None else 0,
        num_eval=len(data.test),
        steps=hooks.total_steps,
        trainable_parameters=sum(p.numel() for p in model.parameters() if p.requires_grad),
        train_seconds=round(train_seconds, 2),
        seed=settings.seed,
        out_dir=str(out),
        checkpoint=str(best),
        partition=settings.partition,
        partition_scheme=partition.scheme,
    )
    if settings.task == "asr":
        result["vocab"] = classes
    (out / RESULT_FILE).write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    return result


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, FinetuneSettings.from_run_config(context.run_config))
