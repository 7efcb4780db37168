"""The early-exit ``ClientApp``. Query: plan this client's depth from its device (fleet or
``device`` node config), its data and the round deadline. Train: receive only the arrays the
depth runs (frozen CNN, shared trunk, layers and heads <= depth), train them on the loss of
all its exits and send back only what it trained, with the FLOPs spent and their predicted
time on its device. Cost lines and CNN features are kept in the node's state."""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspeech.apps.earlyexit.plan import (
    client_device,
    device_seconds,
    plan_client,
)
from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.apps.earlyexit.task import (
    CONSTANT_LR,
    EarlyExitObjective,
    client_costs,
    client_model,
    client_workload,
    run_vocab,
    task_dataset,
)
from fedspeech.data.audio import make_loader
from fedspeech.data.partition import Partition
from fedspeech.federated.clipping import clipping_mod
from fedspeech.federated.compression import compression_mod
from fedspeech.federated.faults import faults_mod
from fedspeech.federated.secagg import secagg_mod
from fedspeech.models.feature_cache import FrozenFeatureCache
from fedspeech.profiling.catalogue import Device
from fedspeech.profiling.depth_planner import DepthCostModel
from fedspeech.ssl.train import train_local

log = logging.getLogger(__name__)


# no-ops unless the run asks for them. secagg_mod first: the rest is the training step it
# masks; compression encodes what leaves the device; faults after clipping: an injected
# attacker sends what an unclipped client would
client_app = ClientApp(mods=[secagg_mod, compression_mod, faults_mod, clipping_mod])

# What a client keeps in its node's ``context.state`` for the rest of the run. Under the
# Deployment Engine every message runs in a fresh ClientApp process, so in-memory caches
# would start empty each round; the node state survives, under every runner.
COST_LINES_STATE = "early-exit-cost-lines"
FEATURES_STATE = "early-exit-cnn-features"
FEATURE_DIGESTS_STATE = "early-exit-cnn-feature-digests"


def node_costs(
    settings: EarlyExitSettings, context: Context, client_id: int, manifest: str, partition: str, precision: str
) -> dict[int, DepthCostModel]:
    """:func:`client_costs`, measured once per run and node and kept in its ``context.state``."""
    kept = context.state.get(COST_LINES_STATE)
    if kept is not None and precision in kept:
        return {line["depth"]: DepthCostModel(**line) for line in json.loads(str(kept[precision]))}
    costs = client_costs(settings, client_id, manifest, partition, precision)
    kept = kept if kept is not None else ConfigRecord()
    kept[precision] = json.dumps([asdict(line) for line in costs.values()])
    context.state[COST_LINES_STATE] = kept
    return costs


def node_feature_cache(settings: EarlyExitSettings, context: Context) -> FrozenFeatureCache | None:
    """The client's CNN feature cache from its node state (None when the CNN is trained or
    caching is off): each client pays for computing an utterance's features once per run."""
    if not settings.cached_cnn:
        return None
    features, digests = context.state.get(FEATURES_STATE), context.state.get(FEATURE_DIGESTS_STATE)
    if features is None or digests is None:
        return FrozenFeatureCache()
    return FrozenFeatureCache.restore(features.to_torch_state_dict(), {k: str(v) for k, v in digests.items()})


def keep_feature_cache(context: Context, cache: FrozenFeatureCache | None) -> None:
    if cache is not None:
        features, digests = cache.export()
        context.state[FEATURES_STATE] = ArrayRecord(features)
        context.state[FEATURE_DIGESTS_STATE] = ConfigRecord(digests)


def _node_paths(settings: EarlyExitSettings, context: Context) -> tuple[int, str, str]:
    """(client id, manifest, partition); a SuperNode may point at its own files."""
    node = context.node_config
    return (
        int(node["partition-id"]),
        str(node.get("manifest", settings.manifest)),
        str(node.get("partition", settings.partition)),
    )


def _client_device(settings: EarlyExitSettings, context: Context) -> Device:
    """The client's device: its ``device`` node config, else its place in the fleet."""
    node = context.node_config
    client_id = int(node["partition-id"])
    num_clients = int(node.get("num-partitions", 0)) or Partition.load(settings.partition).num_clients
    override = node.get("device")
    return client_device(
        settings.fleet,
        settings.fleet_seed,
        settings.catalogue,
        client_id,
        num_clients,
        str(override) if override else None,
    )


def _precision(settings: EarlyExitSettings, device: Device) -> str:
    return "mixed" if settings.precision == "mixed" and device.mixed_precision else "fp32"


@client_app.query()
def client_plan(msg: Message, context: Context) -> Message:
    """Plan this client's depth from its device, its data and the deadline (none when auto:
    the server then decides from the candidates)."""
    settings = EarlyExitSettings.from_run_config(context.run_config)
    client_id, manifest, partition = _node_paths(settings, context)
    device = _client_device(settings, context)
    precision = _precision(settings, device)
    work = client_workload(settings, client_id, manifest, partition)
    cap = context.node_config.get("max-depth")
    plan = plan_client(
        client_id,
        device,
        list(node_costs(settings, context, client_id, manifest, partition, precision).values()),
        deadline=settings.deadline or math.inf,
        steps=work.steps,
        batch=work.batch,
        seconds=work.seconds,
        precision=precision,
        max_depth=int(cap) if cap not in (None, "") else None,
    )
    content = RecordDict(
        {
            "plan": ConfigRecord({"plan": json.dumps(plan.to_dict())}),
            "metrics": MetricRecord({"partition-id": client_id, "depth": plan.depth}),
        }
    )
    return Message(content, reply_to=msg)


@client_app.train()
def client_train(msg: Message, context: Context) -> Message:
    settings = EarlyExitSettings.from_run_config(context.run_config)
    config = msg.content["config"]
    depth, server_round = int(config["depth"]), int(config["server-round"])
    client_id, manifest, partition = _node_paths(settings, context)
    device = _client_device(settings, context)
    precision = _precision(settings, device)
    start = time.perf_counter()

    model = client_model(settings)
    received = msg.content["arrays"].to_torch_state_dict()
    needed = set(model.held_keys(depth))
    if missing := sorted(needed - set(received)):
        raise ValueError(f"depth {depth} needs {len(missing)} arrays the server did not send, e.g. {missing[0]}")
    if unknown := model.load_state_dict(received, strict=False).unexpected_keys:
        raise ValueError(f"the server sent {len(unknown)} arrays this model does not have, e.g. {unknown[0]}")
    model.freeze_beyond(depth)

    dataset = task_dataset(settings, manifest, partition, client_id)
    dataset.set_epoch(server_round)
    loader = make_loader(dataset, settings.batch_size, shuffle=True, seed=settings.seed * 100_003 + server_round)
    cost = node_costs(settings, context, client_id, manifest, partition, precision)[depth]
    cache = node_feature_cache(settings, context)
    objective = EarlyExitObjective(
        depth,
        settings.label_names,
        cost,
        distill_lambda=settings.distill_lambda,
        temperature=settings.distill_temperature,
        mixed=precision == "mixed",
        vocab=run_vocab(settings) if settings.task == "asr" else None,
        cache=cache,
    )
    # Seeded last: measuring cost lines (in a node's first message only) draws random numbers.
    torch.manual_seed(hash((settings.seed, server_round, client_id)) % 2**63)  # dropout
    result = train_local(
        model,
        objective,
        loader,
        epochs=settings.local_epochs,
        lr=float(config["lr"]),
        lr_schedule=CONSTANT_LR,
        max_grad_norm=settings.max_grad_norm,
        rng=np.random.default_rng([settings.seed, server_round, client_id]),
    )
    keep_feature_cache(context, cache)

    peak = cost.at(objective.longest_seconds, objective.largest_batch).peak_bytes
    usable = device.usable_bytes
    assert usable is not None  # client_device() only returns devices with a memory size
    metrics = {
        "num-examples": result.num_examples,
        "train_loss": result.mean_loss_last_epoch,
        "partition-id": client_id,
        "depth": depth,
        "steps": result.steps,
        "skipped-batches": result.skipped_batches,
        "train-flops": objective.flops,
        "cnn-cache-flops": objective.cache_flops,
        "predicted-peak-bytes": peak,
        "fits-memory": int(peak <= usable),
        "seconds": time.perf_counter() - start,
    }
    simulated = device_seconds(objective.flops, device, precision)
    if simulated is not None:
        metrics["device-seconds"] = simulated
    content = RecordDict(
        {
            "arrays": ArrayRecord(model.partial_state_dict(depth)),
            "metrics": MetricRecord(metrics),
            "info": ConfigRecord({"device": device.name, "precision": precision}),
        }
    )
    return Message(content, reply_to=msg)
