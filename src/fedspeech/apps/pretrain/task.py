"""The science of federated SSL pretraining, free of Flower: a client's data, its local
round (apply the global model, train on its own partition, report) and the held-out
validation set. ``client_app`` and ``server_app`` wrap it in Flower messages."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
import torch

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.profiling.savers import apply_model_savers
from fedspeech.ssl.methods import get_method
from fedspeech.ssl.train import LRSchedule, train_local

log = logging.getLogger(__name__)

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


@dataclass
class ClientUpdate:
    """What one client's local round produces, before it is put in a Flower message."""

    sent: dict[str, torch.Tensor]  # transmitted to the server
    kept: dict[str, torch.Tensor]  # stays on the client for its next round
    metrics: dict[str, float | int]
    optimizer_state: dict[str, torch.Tensor] | None = None  # AdamW moments, unless reset every round


def local_round(
    settings: PretrainSettings,
    node_config: dict,
    global_state: dict[str, torch.Tensor],
    kept: dict[str, torch.Tensor],
    server_round: int,
    lr: float,
    global_step: int,
    optimizer_state: dict[str, torch.Tensor] | None = None,
    fedu_mu: float | None = None,
) -> ClientUpdate:
    """One client's round: apply the global model, train on its partition, report.
    ``fedu_mu``: FedU's threshold, when the strategy's train config carries one.

    Plain tensors in and out, so the ClientApp is a thin Flower wrapper and the
    runner-overhead benchmark can time the same work without Flower.
    """
    client_id = int(node_config["partition-id"])
    # A SuperNode may point at its own files (--node-config "manifest=... partition=...").
    manifest = str(node_config.get("manifest", settings.manifest))
    partition = str(node_config.get("partition", settings.partition))
    start = time.perf_counter()
    method = get_method(settings, fedu_mu)
    model = method.fresh_model()
    load_info = method.load_global(model, global_state, kept)
    apply_model_savers(model, settings.model_savers())

    torch.manual_seed(hash((settings.seed, server_round, client_id)) % 2**63)  # dropout, Gumbel noise
    dataset = _client_dataset(manifest, partition, client_id, settings.max_seconds, settings.seed)
    dataset.set_epoch(server_round)
    loader = make_loader(dataset, settings.batch_size, shuffle=True, seed=settings.seed * 100_003 + server_round)
    base_lr, schedule = round_lr_schedule(settings, server_round, lr, len(loader) * settings.local_epochs, global_step)
    keep_moments = settings.optimizer_state != "reset"
    result = train_local(
        model,
        method.objective,
        loader,
        epochs=settings.local_epochs,
        lr=base_lr,
        lr_schedule=schedule,
        start_step=global_step,
        max_grad_norm=settings.max_grad_norm,
        rng=np.random.default_rng([settings.seed, server_round, client_id]),
        optimizer_state=optimizer_state if keep_moments else None,
        return_optimizer_state=keep_moments,
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
