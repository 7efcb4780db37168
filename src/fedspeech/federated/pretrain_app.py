"""The Flower app for federated self-supervised pretraining: one ``ServerApp`` and one
``ClientApp``, run unchanged by the in-process runner, Flower's Simulation Engine
(``flwr run .``) and the Deployment Engine (SuperLink + SuperNodes).

Client: loads the global arrays, restores what it keeps locally (heads under backbone-only
transmission, the FedU predictor, the BYOL target), trains ``local-epochs`` on its own
partition and replies with the transmitted arrays and its metrics.

Server: samples clients deterministically per (seed, round), lets the chosen strategy
aggregate, measures the held-out-speaker validation loss, writes an HF checkpoint and one
JSON line per round, and resumes from the last complete round.
"""

from __future__ import annotations

import logging
import sys
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.federated import checkpoints, roundlog
from fedspeech.federated.inprocess import client_rows, message_bytes
from fedspeech.federated.sampling import SampledGrid, sampled_nodes, wait_for_nodes
from fedspeech.federated.settings import PretrainSettings
from fedspeech.federated.strategies import make_strategy
from fedspeech.ssl.feature_matching import FeatureMatchingModel
from fedspeech.ssl.methods import SSLMethod, get_method
from fedspeech.ssl.train import LRSchedule, evaluate_loss, train_local

log = logging.getLogger(__name__)

client_app = ClientApp()
server_app = ServerApp()

LOCAL_STATE_KEY = "local-arrays"
#: Node-state key of a client's own AdamW moments (``optimizer_state="client"``).
OPTIMIZER_STATE_KEY = "optimizer-state"
#: Message record carrying AdamW moments both ways (``optimizer_state="server"``).
OPTIMIZER_RECORD = "optimizer"
CONSTANT_LR = LRSchedule(decay="constant")


def round_lr_schedule(settings: PretrainSettings, server_round: int, round_lr: float, steps: int, start_step: int):
    """``(lr, multiplier)`` for ``train_local`` in a round of ``steps`` local steps from
    global step ``start_step``: the round's single rate (``lr_schedule="round"``) or the
    per-step curve ("step")."""
    if settings.lr_schedule == "step":
        return settings.lr, settings.step_lr(server_round, steps, start_step)
    return round_lr, CONSTANT_LR


# ----------------------------------------------------------------------------- data


@lru_cache(maxsize=256)
def _client_dataset(manifest: str, partition: str, client_id: int, max_seconds: float, seed: int) -> AudioDataset:
    """A client's audio, decoded once per process (clients are called every round)."""
    utterances = client_utterances(Partition.load(partition), read_manifest(manifest), client_id)
    return AudioDataset(utterances, max_seconds=max_seconds, seed=seed + client_id)


#: Validation batches have this size whatever the training batch: masks, distractors, the
#: codebook perplexity and the padding all depend on how utterances are batched, so runs with
#: other client batches are only comparable on one batching (a batch-1 model scored in
#: batches of 1 looked 0.19 better than in batches of 8; docs/pretraining.md).
VAL_BATCH_SIZE = 8


def validation_loader(settings: PretrainSettings):
    """The held-out speakers' fixed validation batches, or None without a dev split."""
    val_set = _validation_dataset(settings.manifest, settings.val_max_utterances, settings.max_seconds)
    return make_loader(val_set, VAL_BATCH_SIZE, shuffle=False, seed=0) if val_set else None


@lru_cache(maxsize=4)
def _validation_dataset(manifest: str, max_utterances: int, max_seconds: float) -> AudioDataset | None:
    """Held-out speakers (the manifest's dev split), a fixed subset so rounds compare."""
    if max_utterances <= 0:
        return None
    dev = [u for u in read_manifest(manifest) if u.split == "dev"]
    if not dev:
        log.warning("%s: no dev split, so no validation loss", manifest)
        return None
    dev = sorted(dev, key=lambda u: u.id)[:max_utterances]
    return AudioDataset(dev, max_seconds=max_seconds, seed=0, crop="center")


# ----------------------------------------------------------------------------- client


@dataclass
class ClientUpdate:
    """What one client's local round produces, before it is put in a Flower message."""

    sent: dict[str, torch.Tensor]  # transmitted to the server
    kept: dict[str, torch.Tensor]  # stays on the client for its next round
    metrics: dict[str, float | int]
    optimizer_state: dict[str, torch.Tensor] | None = None  # AdamW moments, unless reset every round


def local_round(settings: PretrainSettings, node_config: dict, global_state: dict[str, torch.Tensor],
                kept: dict[str, torch.Tensor], server_round: int, lr: float, global_step: int,
                optimizer_state: dict[str, torch.Tensor] | None = None) -> ClientUpdate:
    """One client's round: apply the global model, train on its partition, report.

    Plain tensors in and out, so the ClientApp below is a thin Flower wrapper and the
    runner-overhead benchmark can time the same work without Flower.
    """
    client_id = int(node_config["partition-id"])
    # A SuperNode may point at its own files (--node-config "manifest=... partition=...").
    manifest = str(node_config.get("manifest", settings.manifest))
    partition = str(node_config.get("partition", settings.partition))
    start = time.perf_counter()
    method = get_method(settings)
    model = method.fresh_model()
    load_info = method.load_global(model, global_state, kept)

    torch.manual_seed(hash((settings.seed, server_round, client_id)) % 2**63)  # dropout, Gumbel noise
    dataset = _client_dataset(manifest, partition, client_id, settings.max_seconds, settings.seed)
    dataset.set_epoch(server_round)
    loader = make_loader(dataset, settings.batch_size, shuffle=True, seed=settings.seed * 100_003 + server_round)
    base_lr, schedule = round_lr_schedule(settings, server_round, lr, len(loader) * settings.local_epochs, global_step)
    keep_moments = settings.optimizer_state != "reset"
    result = train_local(
        model, method.objective, loader, epochs=settings.local_epochs, lr=base_lr, lr_schedule=schedule,
        start_step=global_step, max_grad_norm=settings.max_grad_norm,
        rng=np.random.default_rng([settings.seed, server_round, client_id]),
        optimizer_state=optimizer_state if keep_moments else None, return_optimizer_state=keep_moments,
    )
    metrics = {
        "num-examples": result.num_examples,
        "train_loss": result.mean_loss_last_epoch,
        "partition-id": client_id,
        "steps": result.steps,
        "skipped-batches": result.skipped_batches,
        "seconds": time.perf_counter() - start,
        **load_info,
    }
    return ClientUpdate(method.transmitted_state(model), method.local_state(model), metrics, result.optimizer_state)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    settings = PretrainSettings.from_run_config(context.run_config)
    kept = context.state.get(LOCAL_STATE_KEY)
    moments = None  # where the AdamW moments come from, by settings.optimizer_state
    if settings.optimizer_state == "client" and OPTIMIZER_STATE_KEY in context.state:
        moments = context.state[OPTIMIZER_STATE_KEY].to_torch_state_dict()
    elif settings.optimizer_state == "server" and OPTIMIZER_RECORD in msg.content.array_records:
        moments = msg.content[OPTIMIZER_RECORD].to_torch_state_dict()
    update = local_round(
        settings, dict(context.node_config),
        msg.content["arrays"].to_torch_state_dict(), kept.to_torch_state_dict() if kept is not None else {},
        server_round=int(config["server-round"]), lr=float(config["lr"]), global_step=int(config["global-step"]),
        optimizer_state=moments,
    )
    context.state[LOCAL_STATE_KEY] = ArrayRecord(update.kept)
    content = RecordDict({"arrays": ArrayRecord(update.sent), "metrics": MetricRecord(update.metrics)})
    if update.optimizer_state is not None:
        if settings.optimizer_state == "client":
            context.state[OPTIMIZER_STATE_KEY] = ArrayRecord(update.optimizer_state)
        else:
            content[OPTIMIZER_RECORD] = ArrayRecord(update.optimizer_state)
    return Message(content, reply_to=msg)


# ----------------------------------------------------------------------------- server


def _resume_or_start(settings: PretrainSettings, method: SSLMethod, model: torch.nn.Module
                     ) -> tuple[int, float, dict[str, np.ndarray]]:
    """Restore the last complete round when resuming; return (next round, global step,
    the server's saved non-model arrays)."""
    out = Path(settings.out_dir)
    latest = checkpoints.latest_checkpoint(out) if settings.resume else None
    if latest is None:
        if roundlog.log_path(out).exists() and not settings.resume:
            raise ValueError(f"{out}: holds an earlier run; pass --resume to continue it or choose another --out")
        return 1, 0.0, {}
    method.restore(model, latest)
    state = checkpoints.load_state(latest)
    roundlog.truncate_after(out, state["round"])
    log.info("resuming after round %d from %s", state["round"], latest)
    return int(state["round"]) + 1, float(state["global_step"]), checkpoints.load_server_arrays(latest)


SERVER_OPT_PREFIX, CLIENT_OPT_PREFIX = "server-optimizer.", "client-optimizer."


def _server_arrays(strategy, optimizer_record: ArrayRecord | None) -> dict[str, np.ndarray]:
    """What the server must keep beside the model to resume exactly."""
    arrays: dict[str, np.ndarray] = {}
    if strategy.server_optimizer is not None:
        arrays.update({SERVER_OPT_PREFIX + k: v for k, v in strategy.server_optimizer.state().items()})
    if optimizer_record is not None:
        arrays.update({CLIENT_OPT_PREFIX + k: v.numpy() for k, v in optimizer_record.items()})
    return arrays


def average_optimizer_states(replies: list[Message], weights: dict[int, float]) -> ArrayRecord | None:
    """The accepted clients' AdamW moments averaged with the rule's client weights
    (normalised to sum 1), for ``optimizer_state="server"``; clients without a state, or
    whose entries differ from the first one's, are left out. ``None`` if nobody sent one."""
    states: list[tuple[float, dict[str, np.ndarray]]] = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error() or node not in weights or OPTIMIZER_RECORD not in reply.content.array_records:
            continue
        state = {k: v.numpy() for k, v in reply.content[OPTIMIZER_RECORD].items()}
        if states and {k: v.shape for k, v in state.items()} != {k: v.shape for k, v in states[0][1].items()}:
            log.warning("node %d: optimizer state does not match the other clients'; left out", node)
            continue
        if not all(np.isfinite(v).all() for v in state.values()):
            log.warning("node %d: non-finite optimizer state; left out", node)
            continue
        states.append((weights[node], state))
    total = sum(w for w, _ in states)
    if not states or total <= 0:
        return None
    keys = states[0][1]
    return ArrayRecord({k: Array(np.ascontiguousarray(sum(w / total * s[k] for w, s in states).astype(keys[k].dtype)))
                        for k in keys})


def build_server_optimizer(settings: PretrainSettings):
    """Flower's FedAvgM/FedAdam/FedYogi/FedAdagrad step after the rule, or ``None``."""
    if settings.server_optimizer == "none":
        return None
    from fedspeech.federated.server_optimizers import ServerOptimizer

    return ServerOptimizer(settings.server_optimizer, lr=settings.server_lr, momentum=settings.server_momentum,
                           tau=settings.server_tau)


def build_strategy(settings: PretrainSettings, method: SSLMethod):
    """The aggregation rule, exchanging exactly what the method transmits."""
    rule_options = {
        "fedavg": {},
        "loss": {"temperature": settings.loss_temperature},
        "mixed": {"beta": settings.mixed_beta, "temperature": settings.loss_temperature},
        "ldawa": {"warmup_rounds": settings.ldawa_warmup},
        "fedu": {"encoder_prefixes": FeatureMatchingModel.online_encoder_keys(),
                 "predictor_prefixes": FeatureMatchingModel.predictor_keys(), "mu": settings.fedu_mu},
    }[settings.strategy]
    # Sampling is ours (SampledGrid): the strategy addresses every node it is shown.
    return make_strategy(settings.strategy, backbone_prefixes=method.transmitted_prefixes(), fraction_train=1.0,
                         fraction_evaluate=0.0, min_train_nodes=1, min_available_nodes=1,
                         server_optimizer=build_server_optimizer(settings), **rule_options)


def run_server(grid: Grid, settings: PretrainSettings) -> list[dict]:
    """Run (or resume) the federated pretraining; returns the round records written."""
    from rich.progress import Progress

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = get_method(settings)
    model = method.fresh_model()
    first_round, global_step, saved = _resume_or_start(settings, method, model)
    num_clients = len(Partition.load(settings.partition).clients)
    nodes = wait_for_nodes(grid, num_clients)
    strategy = build_strategy(settings, method)
    if strategy.server_optimizer is not None:
        strategy.server_optimizer.load_state({k.removeprefix(SERVER_OPT_PREFIX): v for k, v in saved.items()
                                              if k.startswith(SERVER_OPT_PREFIX)})
    client_moments = {k.removeprefix(CLIENT_OPT_PREFIX): v for k, v in saved.items() if k.startswith(CLIENT_OPT_PREFIX)}
    optimizer_record = ArrayRecord({k: Array(v) for k, v in client_moments.items()}) if client_moments else None  # optimizer_state="server"
    arrays = ArrayRecord(method.transmitted_state(model))
    val_loader = validation_loader(settings)
    prober = None
    if settings.probe_tasks:
        from fedspeech.federated.probing import RoundProber

        prober = RoundProber(settings.manifest, settings.probe_tasks, out, settings.probe_method, settings.seed,
                             resume_after=first_round - 1 if settings.resume else None)
    records = []
    with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task("federated pretraining", total=settings.rounds, completed=first_round - 1)
        for server_round in range(first_round, settings.rounds + 1):
            started = time.perf_counter()
            chosen = sampled_nodes(nodes, settings.clients_per_round, server_round, settings.seed)
            config = ConfigRecord({"lr": settings.lr_at_round(server_round), "global-step": int(global_step)})
            messages = list(strategy.configure_train(server_round, arrays, config, SampledGrid(grid, chosen)))
            if optimizer_record is not None:
                for message in messages:
                    message.content[OPTIMIZER_RECORD] = optimizer_record
            replies = list(grid.send_and_receive(messages))
            new_arrays, _ = strategy.aggregate_train(server_round, replies)
            if new_arrays is not None:  # the strategies return the full global record
                arrays = new_arrays
            if settings.optimizer_state == "server" and strategy.last_report is not None:
                optimizer_record = average_optimizer_states(replies, strategy.last_report.weights) or optimizer_record
            method.load_global(model, arrays.to_torch_state_dict(), {})
            clients = client_rows(replies, extra_metrics=("fedu-",))
            ok = [c for c in clients if "error" not in c]
            global_step += sum(c["steps"] for c in ok) / max(1, len(ok))
            val_loss = evaluate_loss(model, method.objective, val_loader) if val_loader else None
            checkpoints.save_checkpoint(out, server_round, *method.checkpoint_parts(model),
                                        state={"global_step": global_step, "settings": settings.to_run_config()},
                                        server_arrays=_server_arrays(strategy, optimizer_record))
            checkpoints.prune_checkpoints(out, settings.keep_checkpoints)
            probe_scores = prober(server_round, method.checkpoint_parts(model)[0]) if prober else {}
            record = {
                "round": server_round,
                "sampled": sorted(c["client"] for c in ok),
                "failed": [c for c in clients if "error" in c],
                "aggregation": strategy.last_report.log_record() if strategy.last_report else {},
                "clients": ok,
                "train_loss": sum(c["train_loss"] * c["examples"] for c in ok) / max(1, sum(c["examples"] for c in ok)),
                "val_loss": val_loss,
                "probes": probe_scores,
                "lr": config["lr"],
                "bytes_to_clients": sum(message_bytes(m) for m in messages),
                "bytes_from_clients": sum(message_bytes(r) for r in replies),
                "round_seconds": time.perf_counter() - started,
            }
            roundlog.append_round(out, record)
            records.append(record)
            log.info("round %d: train loss %.4f, val loss %s", server_round, record["train_loss"],
                     f"{val_loss:.4f}" if val_loss is not None else "n/a")
            progress.advance(task)
    return records


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, PretrainSettings.from_run_config(context.run_config))
