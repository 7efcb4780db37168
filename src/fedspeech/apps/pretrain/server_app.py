"""The pretraining ``ServerApp``: builds the aggregation rule for the SSL method, runs the
shared round loop (:mod:`fedspeech.federated.round_loop`) and, after each round, measures the
held-out-speaker validation loss, writes an HF checkpoint (with what the server needs to
resume exactly), runs the per-round probes and returns the round's log record."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import Array, ArrayRecord, Context, Message
from flwr.serverapp import Grid, ServerApp

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.apps.pretrain.task import OPTIMIZER_RECORD, validation_loader
from fedspeech.data.partition import Partition
from fedspeech.federated import checkpoints
from fedspeech.federated.inprocess import client_rows, message_bytes
from fedspeech.federated.round_loop import RoundHooks, RoundOutcome, resume_point, round_totals, run_rounds
from fedspeech.federated.rules import rule_options
from fedspeech.federated.sampling import wait_for_nodes
from fedspeech.federated.strategies import RobustFedAvg, make_strategy
from fedspeech.ssl.feature_matching import FeatureMatchingModel
from fedspeech.ssl.methods import SSLMethod, get_method
from fedspeech.ssl.train import evaluate_loss

log = logging.getLogger(__name__)

server_app = ServerApp()

SERVER_OPT_PREFIX, CLIENT_OPT_PREFIX = "server-optimizer.", "client-optimizer."


def _server_arrays(strategy: RobustFedAvg, optimizer_record: ArrayRecord | None) -> dict[str, np.ndarray]:
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
    return ArrayRecord(
        {k: Array(np.ascontiguousarray(sum(w / total * s[k] for w, s in states).astype(keys[k].dtype))) for k in keys}
    )


def build_server_optimizer(settings: PretrainSettings):
    """Flower's FedAvgM/FedAdam/FedYogi/FedAdagrad step after the rule, or ``None``."""
    if settings.server_optimizer == "none":
        return None
    from fedspeech.federated.server_optimizers import ServerOptimizer

    return ServerOptimizer(
        settings.server_optimizer,
        lr=settings.server_lr,
        momentum=settings.server_momentum,
        tau=settings.server_tau,
        scope=tuple(settings.server_optimizer_scope.replace(",", " ").split()),
    )


def build_strategy(settings: PretrainSettings, method: SSLMethod) -> RobustFedAvg:
    """The aggregation rule (options from the rule registry), exchanging exactly what the
    method transmits."""
    options = rule_options(settings.strategy, settings)
    if settings.strategy == "fedu":  # which arrays FedU compares and keeps are the method's
        options.update(
            encoder_prefixes=FeatureMatchingModel.online_encoder_keys(),
            predictor_prefixes=FeatureMatchingModel.predictor_keys(),
        )
    # Sampling is the round loop's (SampledGrid): the strategy addresses every node it is shown.
    return make_strategy(
        settings.strategy,
        backbone_prefixes=method.transmitted_prefixes(),
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        server_optimizer=build_server_optimizer(settings),
        **options,
    )


class PretrainRounds(RoundHooks):
    """Pretraining's part of each round: the learning rate and global step sent out, the
    averaged AdamW moments (``optimizer_state="server"``), then validation, checkpoint and
    probes of the new global model."""

    def __init__(
        self,
        settings: PretrainSettings,
        method: SSLMethod,
        model: torch.nn.Module,
        strategy: RobustFedAvg,
        global_step: float,
        optimizer_record: ArrayRecord | None,
        prober=None,
    ):
        self.settings, self.method, self.model, self.strategy = settings, method, model, strategy
        self.global_step, self.optimizer_record, self.prober = global_step, optimizer_record, prober
        self.out = Path(settings.out_dir)
        self.keep_checkpoints = settings.keep_checkpoints
        self.val_loader = validation_loader(settings)

    def _privacy(self) -> dict[str, Any]:
        """The privacy accountant's state, so a resumed run keeps counting epsilon."""
        state = self.strategy.privacy_state()
        return {} if state is None else {"privacy": state}

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"lr": self.settings.lr_at_round(server_round), "global-step": int(self.global_step)}

    def prepare_messages(self, server_round: int, messages: list[Message]) -> None:
        if self.optimizer_record is not None:
            for message in messages:
                message.content[OPTIMIZER_RECORD] = self.optimizer_record

    def after_round(self, outcome: RoundOutcome) -> dict[str, Any]:
        settings, method, model = self.settings, self.method, self.model
        report = outcome.report
        if settings.optimizer_state == "server" and report is not None:
            self.optimizer_record = average_optimizer_states(outcome.replies, report.weights) or self.optimizer_record
        method.load_global(model, outcome.arrays.to_torch_state_dict(), {})
        clients = client_rows(outcome.replies, extra_metrics=("fedu-",), bytes_sent=outcome.bytes_by_node())
        ok = [c for c in clients if "error" not in c]
        self.global_step += sum(c["steps"] for c in ok) / max(1, len(ok))
        val_loss = evaluate_loss(model, method.objective, self.val_loader) if self.val_loader else None
        checkpoints.save_checkpoint(
            self.out,
            outcome.server_round,
            *method.checkpoint_parts(model),
            state={"global_step": self.global_step, "settings": settings.to_run_config(), **self._privacy()},
            server_arrays=_server_arrays(self.strategy, self.optimizer_record),
        )
        probes = self.prober(outcome.server_round, method.checkpoint_parts(model)[0]) if self.prober else {}
        totals = round_totals(ok)
        log.info(
            "round %d: train loss %.4f, val loss %s",
            outcome.server_round,
            totals["train_loss"],
            f"{val_loss:.4f}" if val_loss is not None else "n/a",
        )
        return {
            "round": outcome.server_round,
            "sampled": totals["sampled"],
            "failed": [c for c in clients if "error" in c],
            "aggregation": report.log_record() if report else {},
            "clients": ok,
            "train_loss": totals["train_loss"],
            "val_loss": val_loss,
            "probes": probes,
            "lr": outcome.config["lr"],
            "bytes_to_clients": sum(message_bytes(m) for m in outcome.messages),
            "bytes_from_clients": sum(outcome.bytes_by_node().values()),
        }


def run_server(grid: Grid, settings: PretrainSettings) -> list[dict]:
    """Run (or resume) the federated pretraining; returns the round records written."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    method = get_method(settings)
    model = method.fresh_model()
    latest, state = resume_point(out, settings.resume)
    saved: dict[str, np.ndarray] = {}
    if latest is not None:
        method.restore(model, latest)
        saved = checkpoints.load_server_arrays(latest)
    first_round, global_step = int(state.get("round", 0)) + 1, float(state.get("global_step", 0.0))
    nodes = wait_for_nodes(grid, len(Partition.load(settings.partition).clients))
    strategy = build_strategy(settings, method)
    strategy.dp_population = len(nodes)
    strategy.load_privacy_state(state.get("privacy"))
    if strategy.server_optimizer is not None:
        strategy.server_optimizer.load_state(
            {k.removeprefix(SERVER_OPT_PREFIX): v for k, v in saved.items() if k.startswith(SERVER_OPT_PREFIX)}
        )
    moments = {k.removeprefix(CLIENT_OPT_PREFIX): Array(v) for k, v in saved.items() if k.startswith(CLIENT_OPT_PREFIX)}
    from fedspeech.apps.pretrain.probing import run_prober

    prober = run_prober(settings, out, resume_after=first_round - 1 if settings.resume else None)
    hooks = PretrainRounds(
        settings, method, model, strategy, global_step, ArrayRecord(moments) if moments else None, prober
    )
    return run_rounds(
        grid,
        strategy,
        hooks,
        ArrayRecord(method.transmitted_state(model)),
        nodes=nodes,
        clients_per_round=settings.clients_per_round,
        seed=settings.seed,
        rounds=settings.rounds,
        out=out,
        first_round=first_round,
        label="federated pretraining",
        reply_timeout=settings.reply_timeout,
        secure_aggregation=settings.secure_aggregation,
    )


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, PretrainSettings.from_run_config(context.run_config))
