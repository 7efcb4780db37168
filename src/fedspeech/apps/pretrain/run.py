"""Run federated pretraining with a chosen runner, and the centralised baseline.

``run_pretraining(settings, runner="inprocess")`` is the Python entry point behind
``fedspeech pretrain``. Runners: ``inprocess`` (Flower's Grid driven inside this process),
``simulation`` (Flower's Simulation Engine) and ``deployment`` (Flower's Deployment Engine on
this machine: a SuperLink and one SuperNode per client on loopback, TLS and SuperNode
authentication, each SuperNode given its partition through ``--node-config``). Across real
machines the user starts the same processes by hand (docs/deployment.md); the app is the
same ``client_app``/``server_app`` pair in every case.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.federated import checkpoints, roundlog
from fedspeech.federated.runners import check_runner

if TYPE_CHECKING:
    from fedspeech.federated.engines import DeploymentCluster

log = logging.getLogger(__name__)


def with_absolute_paths(settings: PretrainSettings) -> PretrainSettings:
    """Flower's engines run the apps in other processes and folders: pass absolute paths."""

    def absolute(path: str) -> str:
        return str(Path(path).resolve())

    return dataclasses.replace(
        settings,
        manifest=absolute(settings.manifest),
        partition=absolute(settings.partition),
        out_dir=absolute(settings.out_dir),
    )


def deployment_cluster(settings: PretrainSettings, **options: Any) -> DeploymentCluster:
    """A loopback Deployment Engine for these settings: one SuperNode per client, each
    reading its own partition from its node config as on real machines; TLS and SuperNode
    authentication on (``options`` go to ``DeploymentCluster``)."""
    from fedspeech.federated.engines import DeploymentCluster

    settings = with_absolute_paths(settings)
    num_clients = Partition.load(settings.partition).num_clients
    node_configs = [{"manifest": settings.manifest, "partition": settings.partition} for _ in range(num_clients)]
    options = {"tls": True, "supernode_auth": True, "startup_timeout": 300, **options}
    return DeploymentCluster(Path(settings.out_dir) / "deployment", num_clients, node_configs=node_configs, **options)


def run_pretraining(settings: PretrainSettings, runner: str = "inprocess", timeout: float = 24 * 3600) -> list[dict]:
    """Run the federated pretraining app; returns the round log."""
    check_runner(runner)
    from fedspeech.apps.pretrain.client_app import client_app
    from fedspeech.apps.pretrain.server_app import server_app

    settings = with_absolute_paths(settings)
    num_clients = Partition.load(settings.partition).num_clients
    run_config = settings.to_run_config()
    if runner == "inprocess":
        from fedspeech.federated.inprocess import run_inprocess

        run_inprocess(server_app, client_app, num_clients, run_config)
    elif runner == "simulation":
        from fedspeech.federated.engines import project_app_dir, run_simulation

        run_simulation(
            project_app_dir(), run_config, num_clients, flwr_home=Path(settings.out_dir) / "flwr-home", timeout=timeout
        )
    elif runner == "deployment":
        from fedspeech.federated.engines import project_app_dir

        with deployment_cluster(settings) as cluster:
            cluster.run(project_app_dir(), run_config, timeout=timeout)
    return roundlog.read_rounds(settings.out_dir)


def run_centralised(settings: PretrainSettings) -> list[dict]:
    """The centralised baseline under the same compute budget.

    Same model, objective, crops, batch size and learning-rate schedule; all clients' data
    pooled on one machine. Each "round" trains on a random draw from the pool of as many
    examples as that round's sampled clients hold (times local epochs), so after R rounds
    it has seen the same number of examples as the federated run. Writes the same round
    log and checkpoints, so the two compare directly.
    """
    from fedspeech.apps.pretrain.task import round_lr_schedule, validation_loader
    from fedspeech.data.partition import sample_clients
    from fedspeech.profiling.savers import apply_model_savers
    from fedspeech.ssl.methods import get_method
    from fedspeech.ssl.train import evaluate_loss, train_local

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if roundlog.log_path(out).exists() and not settings.resume:
        raise ValueError(f"{out}: holds an earlier run; pass --resume to continue it or choose another --out")
    utterances = read_manifest(settings.manifest)
    if settings.partition:
        partition = Partition.load(settings.partition)
        per_client = [client_utterances(partition, utterances, c) for c in range(partition.num_clients)]
    else:  # no partition: one "client" holding the whole training split
        per_client = [[u for u in utterances if u.split == "train"]]
    pool = AudioDataset([u for c in per_client for u in c], max_seconds=settings.max_seconds, seed=settings.seed)
    usable = {u.id for u in pool.utterances}
    sizes = [sum(u.id in usable for u in c) for c in per_client]

    method = get_method(settings)
    model = method.fresh_model()
    first_round, global_step = 1, 0.0
    latest = checkpoints.latest_checkpoint(out, roundlog.last_round(out)) if settings.resume else None
    if latest is not None:
        method.restore(model, latest)
        state = checkpoints.load_state(latest)
        first_round, global_step = state["round"] + 1, float(state["global_step"])
        roundlog.truncate_after(out, state["round"])
    apply_model_savers(model, settings.model_savers())  # as the federated clients do
    val_loader = validation_loader(settings)
    import torch
    import torch.utils.data as tud

    from fedspeech.apps.pretrain.probing import run_prober

    prober = run_prober(settings, out, resume_after=first_round - 1 if latest is not None else None)
    records = []
    moments = None  # AdamW state carried across rounds unless optimizer_state="reset"
    if latest is not None:
        saved = checkpoints.load_server_arrays(latest)
        moments = {k.removeprefix("optimizer."): torch.from_numpy(v) for k, v in saved.items()} or None
    for server_round in range(first_round, settings.rounds + 1):
        started = time.perf_counter()
        k = settings.clients_per_round or len(per_client)
        chosen = sample_clients(len(per_client), min(k, len(per_client)), server_round, settings.seed)
        budget = sum(sizes[c] for c in chosen)
        rng = np.random.default_rng([settings.seed, server_round, 999_983])
        indices = rng.choice(len(pool), size=min(budget, len(pool)), replace=False)
        pool.set_epoch(server_round)
        loader = make_loader(
            tud.Subset(pool, indices.tolist()),
            settings.batch_size,
            shuffle=True,
            seed=settings.seed * 100_003 + server_round,
        )
        base_lr, schedule = round_lr_schedule(
            settings,
            server_round,
            settings.lr_at_round(server_round),
            len(loader) * settings.local_epochs,
            int(global_step),
        )
        keep_moments = settings.optimizer_state != "reset"  # one optimiser across rounds, as a plain run has
        # dropout and Gumbel noise from the round alone (as each client's), so a run, or a
        # resumed one, does not depend on what this process did before
        torch.manual_seed(settings.seed * 1_000_003 + server_round)
        result = train_local(
            model,
            method.objective,
            loader,
            epochs=settings.local_epochs,
            lr=base_lr,
            lr_schedule=schedule,
            start_step=int(global_step),
            max_grad_norm=settings.max_grad_norm,
            rng=rng,
            optimizer_state=moments if keep_moments else None,
            return_optimizer_state=keep_moments,
        )
        moments = result.optimizer_state
        global_step += result.steps
        val_loss = evaluate_loss(model, method.objective, val_loader) if val_loader else None
        checkpoints.save_checkpoint(
            out,
            server_round,
            *method.checkpoint_parts(model),
            state={"global_step": global_step, "settings": settings.to_run_config()},
            server_arrays={f"optimizer.{k}": v.numpy() for k, v in (moments or {}).items()},
        )
        probe_scores = prober(server_round, method.checkpoint_parts(model)[0]) if prober else {}
        record = {
            "round": server_round,
            "centralised": True,
            "train_loss": result.mean_loss_last_epoch,
            "examples": result.num_examples,
            "val_loss": val_loss,
            "probes": probe_scores,
            "lr": settings.lr_at_round(server_round),
            "round_seconds": time.perf_counter() - started,
        }
        roundlog.append_round(out, record)  # the round is complete from here on
        checkpoints.prune_checkpoints(out, settings.keep_checkpoints)
        records.append(record)
        log.info("centralised round %d: train loss %.4f, val loss %s", server_round, record["train_loss"], val_loss)
    return records
