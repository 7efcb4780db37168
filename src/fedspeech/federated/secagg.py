"""Secure aggregation (SecAgg+) for FedAvg rounds, with Flower's own protocol code.

Flower implements SecAgg+ (Bell et al., CCS 2020) as ``SecAggPlusWorkflow`` on the server
and ``secaggplus_mod`` on the client. Both still speak the legacy ``FitIns``/``FitRes``
records and drive a legacy ``Strategy``, while our apps use the Message API. This module
is only the bridge, so the cryptography stays Flower's:

- server (:func:`secure_replies`): one SecAgg+ round per call, for our train messages; the
  workflow hands its legacy strategy the unmasked weighted mean, which we turn back into
  one reply per surviving client whose arrays all equal that mean (as Flower's workflow does
  for its legacy strategies), so the round loop and FedAvg aggregate it unchanged;
- client (:func:`secagg_mod`): when the run asks for secure aggregation, the message goes
  through ``secaggplus_mod``, whose training step is our ClientApp behind a converter.

Clients mask their *update* ``w_k - w`` (not the weights): it is small, so the fixed-point
quantisation SecAgg+ needs (values clipped to ``±clipping_range``) loses little, and the
quantisation range is the widest the 32-bit modulus allows for the round's client count.

What cannot run under it: the server sees only the sum, so no rule that weighs, screens,
clips or ranks individual updates (loss-weighted, L-DAWA, median, norm guards, server-side
clipping and DP) and no per-client extra content (server-held optimizer state, per-depth
partial updates). :func:`check_secagg` refuses those, naming the field. DP does work with
clipping on the clients (``dp_clipping="client"``): they clip before masking, report equal
weights, and the server noises the unmasked mean.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from typing import Any

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Error, Message, MetricRecord, RecordDict

from fedspeech.federated.clipping import CLIP_NORM_KEY

log = logging.getLogger(__name__)

#: The config key that carries the array names, JSON-encoded (legacy ``Parameters`` are a
#: bare list, and legacy config values are scalars only).
KEYS_CONFIG = "secagg-array-keys"
#: The run-config key that switches the client mod on.
RUN_CONFIG_KEY = "secure-aggregation"
MODULUS_RANGE = 2**32  # Flower's maximum: masked sums are kept modulo 2**32
SECURE_RULES = ("fedavg",)
# settings fields that need individual updates, with the value that means "off"
_NEEDS_INDIVIDUAL_UPDATES = {
    "update_norm_bound": 0.0,
    "update_norm_ratio": 0.0,
    "clip_norm": 0.0,
    "dp_noise": 0.0,
}


_CLIENT_SIDE = ("clip_norm", "dp_noise")
_CLIENT_CLIPPING_HINT = " or let the clients clip (dp_clipping='client')"


def check_secagg(strategy: str, settings: Any) -> None:
    """Refuse settings that need to see individual updates; the error names the field."""
    if strategy not in SECURE_RULES:
        raise ValueError(
            f"secure_aggregation: works with strategy {' or '.join(SECURE_RULES)} only (the server sees just "
            f"the sum of the updates), got strategy {strategy!r}"
        )
    client_clipping = getattr(settings, "dp_clipping", "server") == "client"
    for field_name, off in _NEEDS_INDIVIDUAL_UPDATES.items():
        if client_clipping and field_name in _CLIENT_SIDE:
            continue  # clients clip before masking; the server noises the sum
        if getattr(settings, field_name, off) != off:
            raise ValueError(
                f"secure_aggregation: {field_name} needs individual updates, which the server never sees "
                f"under SecAgg+; leave it at {off}{_CLIENT_CLIPPING_HINT if field_name in _CLIENT_SIDE else ''}"
            )
    if getattr(settings, "update_dtype", "float32") != "float32":
        raise ValueError("secure_aggregation: update_dtype must stay float32 (SecAgg+ quantises the update itself)")
    if getattr(settings, "optimizer_state", "reset") == "server":
        raise ValueError("secure_aggregation: optimizer_state='server' sends per-client moments; use reset or client")


def quantization_range(num_clients: int) -> int:
    """The widest power-of-two quantisation range whose sum over ``num_clients`` stays below
    the modulus (no wrap-around), i.e. the finest fixed-point grid SecAgg+ can use."""
    return MODULUS_RANGE >> max(1, math.ceil(math.log2(max(2, num_clients))))


def secure_replies(
    grid: Any,
    messages: list[Message],
    server_round: int,
    *,
    clipping_range: float = 1.0,
    max_weight: float = 10_000.0,
    timeout: float = 0.0,
) -> list[Message]:
    """Run one SecAgg+ round for the train ``messages`` (same arrays for every node) and
    return, per node, a reply: the securely aggregated weighted mean of the clients' models
    with that client's own metrics, or an error for a client that dropped out."""
    from flwr.common import FitIns, ndarrays_to_parameters
    from flwr.server import ServerConfig
    from flwr.server.compat.grid_client_proxy import GridClientProxy
    from flwr.server.compat.legacy_context import LegacyContext
    from flwr.server.workflow import SecAggPlusWorkflow
    from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key

    if len(messages) < 3:
        raise ValueError(f"secure_aggregation: SecAgg+ needs at least 3 clients per round, got {len(messages)}")
    global_arrays: ArrayRecord = messages[0].content["arrays"]
    keys = list(global_arrays.keys())
    start = [global_arrays[k].numpy() for k in keys]
    by_node = {int(m.metadata.dst_node_id): m for m in messages}

    fit_ins = {}
    for node, message in by_node.items():
        config = dict(message.content["config"])
        config[KEYS_CONFIG] = json.dumps(keys)
        fit_ins[node] = FitIns(ndarrays_to_parameters(start), config)
    strategy = _CollectingStrategy(
        [(GridClientProxy(node, grid, grid.run.run_id), ins) for node, ins in fit_ins.items()]
    )
    context = LegacyContext(
        Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    context.state.config_records[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: server_round})
    context.state.array_records[MAIN_PARAMS_RECORD] = global_arrays
    workflow = SecAggPlusWorkflow(
        num_shares=1.0,  # every client shares its keys with all others: the most dropouts survived
        reconstruction_threshold=0.5,
        max_weight=max_weight,
        clipping_range=clipping_range,
        quantization_range=quantization_range(len(messages)),
        modulus_range=MODULUS_RANGE,
        timeout=timeout or None,
    )
    workflow(grid, context)

    replies = []
    for node, message in by_node.items():
        result = strategy.results.get(node)
        if result is None or strategy.mean_update is None:
            reason = "dropped out of the SecAgg+ round" if strategy.mean_update is not None else strategy.halted
            replies.append(Message(Error(code=0, reason=f"secure aggregation: {reason}"), reply_to=message))
            continue
        mean = {
            k: Array(np.ascontiguousarray((s.astype(np.float64) + d).astype(s.dtype)))
            for k, s, d in zip(keys, start, strategy.mean_update, strict=True)
        }
        metrics = MetricRecord({k: v for k, v in result.metrics.items() if isinstance(v, int | float)})
        replies.append(Message(RecordDict({"arrays": ArrayRecord(mean), "metrics": metrics}), reply_to=message))
    return sorted(replies, key=lambda m: int(m.metadata.src_node_id))


class _CollectingStrategy:
    """The legacy strategy ``SecAggPlusWorkflow`` drives: it offers our prepared ``FitIns``
    and keeps what the workflow hands back (the unmasked mean update, per-client metrics)."""

    def __init__(self, instructions: list[tuple[Any, Any]]) -> None:
        self.instructions = instructions
        self.results: dict[int, Any] = {}
        self.mean_update: list[np.ndarray] | None = None
        self.halted = "the SecAgg+ round halted (too few clients completed a stage)"

    def configure_fit(self, server_round: int, parameters: Any, client_manager: Any) -> list[tuple[Any, Any]]:
        return self.instructions

    def aggregate_fit(self, server_round: int, results: list[tuple[Any, Any]], failures: list[Any]) -> tuple:
        from flwr.common import parameters_to_ndarrays

        self.results = {int(proxy.node_id): fit_res for proxy, fit_res in results}
        if results:
            self.mean_update = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}


def secagg_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod: under ``secure-aggregation``, run Flower's ``secaggplus_mod`` with our
    ClientApp (and the mods after this one) as its training step; otherwise a no-op."""
    from flwr.app import MessageType
    from flwr.client.mod import secaggplus_mod

    if not context.run_config.get(RUN_CONFIG_KEY) or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    return secaggplus_mod(msg, context, _legacy_training_step(call_next))


def _legacy_training_step(
    call_next: Callable[[Message, Context], Message],
) -> Callable[[Message, Context], Message]:
    """Our ClientApp seen as a legacy fit: ``FitIns`` in, ``FitRes`` (the update) out."""

    def step(msg: Message, context: Context) -> Message:
        from flwr.common import FitRes, Status, ndarrays_to_parameters, parameters_to_ndarrays
        from flwr.common.typing import Code
        from flwr.compat.common import recorddict_compat as compat

        fit_ins = compat.recorddict_to_fitins(msg.content, keep_input=True)
        config = dict(fit_ins.config)
        keys = json.loads(str(config.pop(KEYS_CONFIG)))
        start = parameters_to_ndarrays(fit_ins.parameters)
        arrays = ArrayRecord({k: Array(v) for k, v in zip(keys, start, strict=True)})
        msg.content = RecordDict({"arrays": arrays, "config": ConfigRecord(config)})
        reply = call_next(msg, context)
        if reply.has_error():
            return reply
        trained = reply.content["arrays"]
        update = [trained[k].numpy().astype(np.float64) - s for k, s in zip(keys, start, strict=True)]
        metrics = dict(reply.content["metrics"])
        # clipped for DP: every client weighs the same, so none moves the mean by more than clip_norm / K
        weight = 1 if float(config.get(CLIP_NORM_KEY, 0.0)) > 0 else int(metrics["num-examples"])
        fit_res = FitRes(Status(Code.OK, "ok"), ndarrays_to_parameters(update), weight, metrics)
        return Message(compat.fitres_to_recorddict(fit_res, keep_input=True), reply_to=msg)

    return step
