"""The early-exit ``ServerApp``. Start: query every client once for its depth plan, turn
the plans into training depths by ``mode`` (:func:`~fedspeech.apps.earlyexit.plan.training_depths`)
and write ``plan.json``. Rounds (the shared :mod:`~fedspeech.federated.round_loop`): each
sampled node gets its depth with the arrays it runs; the server aggregates depth-aware
(:class:`~fedspeech.federated.strategies.DepthAwarePartial`), measures every exit on held-out
speakers, writes an HF checkpoint (backbone; heads in ``extra.safetensors``) and one JSON
line: per-client depth, FLOPs, upload bytes and device time, totals per device tier, and the
simulated round wall-clock (the slowest sampled client's predicted device time)."""

from __future__ import annotations

import json
import logging
import math
from collections import defaultdict
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from flwr.serverapp import Grid, ServerApp
from safetensors.torch import load_file

from fedspeech.apps.earlyexit.evaluation import evaluate_exits_of_run
from fedspeech.apps.earlyexit.plan import (
    ClientPlan,
    inclusive_deadline,
    training_depths,
    with_deadline,
)
from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.apps.earlyexit.task import HEAD_PREFIX, build_model, eval_dataset, restore_heads, run_vocab
from fedspeech.data.partition import Partition
from fedspeech.federated import checkpoints, roundlog
from fedspeech.federated.inprocess import message_bytes
from fedspeech.federated.round_loop import (
    ReplySize,
    RoundHooks,
    RoundOutcome,
    receive_replies,
    resume_point,
    round_totals,
    run_rounds,
)
from fedspeech.federated.rules import rule_options
from fedspeech.federated.sampling import wait_for_nodes
from fedspeech.federated.strategies import make_strategy
from fedspeech.models.early_exit import EarlyExitModel
from fedspeech.models.feature_cache import FrozenFeatureCache

log = logging.getLogger(__name__)


server_app = ServerApp()
PLAN_FILE = "plan.json"


def _query_plans(
    grid: Grid, nodes: list[int], reply_timeout: float = 0.0
) -> tuple[dict[int, ClientPlan], dict[int, str]]:
    """Every node's own depth plan; nodes that fail to plan (or do not answer within
    ``reply_timeout`` seconds) are reported, not fatal."""
    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type=MessageType.QUERY) for n in nodes
    ]
    plans, failed = {}, {}
    for reply in receive_replies(grid, messages, reply_timeout):
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            failed[node] = reply.error.reason
            log.warning("node %d could not plan its depth: %s", node, reply.error.reason)
            continue
        plans[node] = ClientPlan.from_dict(json.loads(reply.content["plan"]["plan"]))
    if not plans:
        raise RuntimeError(f"no client could plan its depth: {failed}")
    return plans, failed


def _client_rows(replies: list[Message], client_of: dict[int, int], sizes: dict[int, ReplySize]) -> list[dict]:
    """Per-client rows; ``sizes``: what each reply carried when it arrived (a streamed round
    has dropped its arrays since)."""
    rows = []
    for reply in replies:
        node = int(reply.metadata.src_node_id)
        if reply.has_error():
            rows.append({"client": client_of.get(node, -1), "error": reply.error.reason})
            continue
        m, info = reply.content["metrics"], reply.content["info"]
        rows.append(
            {
                "client": int(m["partition-id"]),
                "device": str(info["device"]),
                "precision": str(info["precision"]),
                "depth": int(m["depth"]),
                "examples": int(m["num-examples"]),
                "train_loss": float(m["train_loss"]),
                "steps": int(m["steps"]),
                "train_flops": float(m["train-flops"]),
                "cnn_cache_flops": float(m.get("cnn-cache-flops", 0.0)),
                "device_seconds": float(m["device-seconds"]) if "device-seconds" in m else None,
                "predicted_peak_bytes": float(m["predicted-peak-bytes"]),
                "fits_memory": bool(m["fits-memory"]),
                "arrays_sent": sizes[node].arrays,
                "bytes_sent": sizes[node].bytes,
                "seconds": float(m["seconds"]),
            }
        )
    return sorted(rows, key=lambda r: r["client"])


def _by_device(rows: list[dict], field: str) -> dict[str, float]:
    totals: dict[str, float] = defaultdict(float)
    for row in rows:
        totals[row["device"]] += row[field]
    return dict(sorted(totals.items()))


def _layers_not_trained(model: EarlyExitModel, rows: list[dict]) -> list[int]:
    deepest = max((r["depth"] for r in rows), default=0)
    return list(range(deepest + 1, model.num_layers + 1))


def _write_plan(
    out: Path,
    settings: EarlyExitSettings,
    deadline: float,
    plans: dict[int, ClientPlan],
    failed: dict[int, str],
    depths: dict[int, int],
) -> None:
    clients = []
    for node, plan in sorted(plans.items(), key=lambda item: item[1].client):
        clients.append({**plan.to_dict(), "training_depth": depths.get(node, 0), "takes_part": node in depths})
    document = {
        "mode": settings.mode,
        "deadline": deadline,
        "auto_deadline": not settings.deadline,
        "clients": clients,
        "failed_nodes": {str(k): v for k, v in failed.items()},
    }
    (out / PLAN_FILE).write_text(json.dumps(document, indent=2) + "\n")


class EarlyExitRounds(RoundHooks):
    """Early exits' part of each round: every node's depth goes with its sub-model; after
    aggregation, every exit is evaluated, the checkpoint written and the FLOPs, bytes and
    simulated device time of the round recorded (totals per device tier)."""

    def __init__(
        self,
        settings: EarlyExitSettings,
        model: EarlyExitModel,
        depths: dict[int, int],
        client_of: dict[int, int],
        deadline: float,
        cumulative_flops: float,
    ):
        self.settings, self.model, self.depths, self.client_of = settings, model, depths, client_of
        self.deadline, self.cumulative_flops = deadline, cumulative_flops
        self.out = Path(settings.out_dir)
        self.keep_checkpoints = settings.keep_checkpoints
        self.eval_set = eval_dataset(
            settings.manifest, settings.split_names, settings.eval_max_utterances, settings.max_seconds, settings.task
        )
        # the server's own cache of the held-out set's CNN features (not client compute)
        self.eval_cache = FrozenFeatureCache() if settings.cached_cnn else None

    def train_config(self, server_round: int) -> dict[str, Any]:
        return {"lr": self.settings.lr_at_round(server_round)}

    def prepare_messages(self, server_round: int, messages: list[Message]) -> None:
        for message in messages:  # one sub-model per node: its depth goes with it
            own = dict(message.content["config"])
            message.content["config"] = ConfigRecord({**own, "depth": self.depths[message.metadata.dst_node_id]})

    def after_round(self, outcome: RoundOutcome) -> dict[str, Any]:
        settings, model, server_round = self.settings, self.model, outcome.server_round
        model.load_state_dict(outcome.arrays.to_torch_state_dict())
        clients = _client_rows(outcome.replies, self.client_of, outcome.reply_sizes)
        ok = [c for c in clients if "error" not in c]
        evaluation = evaluate_exits_of_run(settings, model, self.eval_set, self.eval_cache)
        checkpoints.save_checkpoint(
            self.out,
            server_round,
            model.backbone,
            {k: v for k, v in model.state_dict().items() if k.startswith(HEAD_PREFIX)},
            state={
                "settings": settings.to_run_config(),
                "exits": list(model.exits),
                **(
                    {"vocab": run_vocab(settings).tokens}
                    if settings.task == "asr"
                    else {"labels": list(settings.label_names)}
                ),
            },
        )
        timed = [c["device_seconds"] for c in ok if c["device_seconds"] is not None]
        round_flops = sum(c["train_flops"] for c in ok)
        self.cumulative_flops += round_flops
        report, totals = outcome.report, round_totals(ok)
        record = {
            "round": server_round,
            "mode": settings.mode,
            "task": settings.task,
            "sampled": totals["sampled"],
            "failed": [c for c in clients if "error" in c],
            "refused": {str(self.client_of.get(k, k)): v for k, v in (report.refused if report else {}).items()},
            "clients": ok,
            "train_loss": totals["train_loss"],
            **evaluation,
            "layers_not_trained": _layers_not_trained(model, ok),
            "client_flops": round_flops,
            "client_flops_by_device": _by_device(ok, "train_flops"),
            "cumulative_client_flops": self.cumulative_flops,
            "upload_bytes": sum(c["bytes_sent"] for c in ok),
            "upload_bytes_by_device": _by_device(ok, "bytes_sent"),
            "bytes_to_clients": sum(message_bytes(m) for m in outcome.messages),
            "simulated_round_seconds": max(timed) if timed else None,
            "deadline": self.deadline,
            "lr": outcome.config["lr"],
        }
        score = "wer" if settings.task == "asr" else "accuracy"
        log.info(
            "round %d (%s): train loss %.4f, %s by exit %s, simulated %.3g s",
            server_round,
            settings.mode,
            record["train_loss"],
            score,
            {k: round(v, 3) for k, v in record[score].items()},
            record["simulated_round_seconds"] or math.nan,
        )
        return record


def run_server(grid: Grid, settings: EarlyExitSettings) -> list[dict]:
    """Run (or resume) federated early-exit fine-tuning; returns the round records written."""
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = build_model(settings)
    latest, state = resume_point(out, settings.resume)
    if latest is not None:
        model.backbone.load_state_dict(load_file(str(latest / "model.safetensors")))
        restore_heads(model, latest)
    first_round = int(state.get("round", 0)) + 1
    num_clients = Partition.load(settings.partition).num_clients
    nodes = wait_for_nodes(grid, num_clients)
    plans, failed = _query_plans(grid, nodes, settings.reply_timeout)
    deadline = settings.deadline
    if not deadline:
        deadline = inclusive_deadline(plans.values())
        plans = {n: with_deadline(p, deadline) for n, p in plans.items()}
        log.info("auto deadline: %.4g s of device time per round", deadline)
    depths = training_depths(settings.mode, {n: p.depth for n, p in plans.items()}, model.num_layers)
    client_of = {n: p.client for n, p in plans.items()}
    _write_plan(out, settings, deadline, plans, failed, depths)
    log.info("%s: depths %s", settings.mode, {client_of[n]: d for n, d in sorted(depths.items())})

    held = {d: model.held_keys(d) for d in set(depths.values())}
    strategy = make_strategy(
        "partial",
        keys_for_node=lambda node, keys: held[depths[node]],
        fraction_train=1.0,
        fraction_evaluate=0.0,
        min_train_nodes=1,
        min_available_nodes=1,
        **rule_options("partial", settings),
    )
    cumulative_flops = sum(r["client_flops"] for r in roundlog.read_rounds(out)) if first_round > 1 else 0.0
    hooks = EarlyExitRounds(settings, model, depths, client_of, deadline, cumulative_flops)
    return run_rounds(
        grid,
        strategy,
        hooks,
        ArrayRecord(model.state_dict()),
        nodes=sorted(depths),
        clients_per_round=settings.clients_per_round,
        seed=settings.seed,
        rounds=settings.rounds,
        out=out,
        first_round=first_round,
        label=f"early-exit fine-tuning ({settings.mode})",
        reply_timeout=settings.reply_timeout,
        secure_aggregation=settings.secure_aggregation,
    )


@server_app.main()
def server_main(grid: Grid, context: Context) -> None:
    run_server(grid, EarlyExitSettings.from_run_config(context.run_config))
