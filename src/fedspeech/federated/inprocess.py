"""In-process runner: drive a Flower ``ServerApp`` and ``ClientApp`` inside one process.

Why our own ``Grid``: Flower's Simulation Engine always goes through Ray (about 1.5 GB and
~25 s of start-up on a 2-core machine, see ``docs/flower.md``), which is too heavy
for a laptop demo and for tests. ``Grid`` is the interface a ServerApp talks to, so a Grid
that hands each message straight to the ClientApp runs *the same* ServerApp and ClientApp
code with no serialisation, sockets or actors. Clients run one after another, which is
also what a 2-core machine can afford.

Each node keeps its own ``Context`` (node config with ``partition-id``/``num-partitions``
exactly as the Simulation Engine sets them, and a persistent ``state``), so client-local
state such as FedU predictors or local heads survives between rounds as it would under
Flower's engines.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID
from flwr.serverapp import Grid, ServerApp
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

log = logging.getLogger(__name__)

# Flower node ids are random 64-bit ints; ours are offset so they never look like indexes.
_FIRST_NODE_ID = 1000


def message_bytes(message: Message) -> int:
    """Bytes of a message's records, as Flower counts them (``count_bytes``)."""
    if not message.has_content():
        return 0
    return sum(_record_bytes(record) for record in message.content.values())


def _record_bytes(record: Any) -> int:
    """``record.count_bytes()``; Flower's fails on an empty list value (it looks at the first
    item), as SecAgg+ sends them, so those values count as their key only."""
    if isinstance(record, ConfigRecord) and any(isinstance(v, list) and not v for v in record.values()):
        empty = [k for k, v in record.items() if isinstance(v, list) and not v]
        rest = ConfigRecord({k: v for k, v in record.items() if k not in empty})
        return rest.count_bytes() + sum(len(k) for k in empty)
    return int(record.count_bytes())


def client_rows(
    replies: list[Message], extra_metrics: tuple[str, ...] = (), bytes_sent: dict[int, int] | None = None
) -> list[dict]:
    """The round log's per-client rows of a training round: client, loss, examples, steps,
    seconds and bytes sent, plus float metrics whose names start with ``extra_metrics``;
    a failed reply becomes a row with its node and error. ``bytes_sent`` by node: the sizes
    as received (a streamed round has dropped the arrays since; default: count them now)."""
    rows = []
    for reply in replies:
        if reply.has_error():
            rows.append({"node": reply.metadata.src_node_id, "error": reply.error.reason})
            continue
        m = reply.content["metrics"]
        rows.append(
            {
                "client": int(m["partition-id"]),
                "train_loss": float(m["train_loss"]),
                "examples": int(m["num-examples"]),
                "steps": int(m["steps"]),
                "seconds": round(float(m["seconds"]), 3),
                "bytes_sent": _sent(reply, bytes_sent),
                **{k: float(v) for k, v in m.items() if extra_metrics and k.startswith(extra_metrics)},
            }
        )
    return sorted(rows, key=lambda r: r.get("client", -1))


def _sent(reply: Message, bytes_sent: dict[int, int] | None) -> int:
    node = int(reply.metadata.src_node_id)
    return bytes_sent[node] if bytes_sent is not None and node in bytes_sent else message_bytes(reply)


def _own_copy(message: Message) -> Message:
    """The message as this node alone receives it. Flower's engines deserialise a copy per
    node; here the same objects would be shared, and a client that edits its records (as
    Flower's ``secaggplus_mod`` pops its config keys) would change every other node's. The
    records are copied, their arrays (immutable bytes) shared."""
    own = copy.copy(message)
    if message.has_content():
        own.content = RecordDict({name: type(record)(dict(record)) for name, record in message.content.items()})
    return own


@dataclass
class ClientCall:
    """Accounting of one ClientApp call, kept for the round log."""

    node_id: int
    partition_id: int
    message_type: str
    group_id: str
    seconds: float
    bytes_received: int  # by the client (server → client)
    bytes_sent: int  # by the client (client → server)
    error: str | None = None


@dataclass
class InProcessGrid(Grid):
    """A ``Grid`` whose nodes are ClientApp calls in this process."""

    client_app: ClientApp
    node_configs: list[dict]
    run_config: dict
    calls: list[ClientCall] = field(default_factory=list)
    _run: Run | None = None
    _replies: dict[str, Message] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._contexts = {
            _FIRST_NODE_ID + i: Context(
                run_id=0,
                node_id=_FIRST_NODE_ID + i,
                node_config=dict(cfg),
                state=RecordDict(),
                run_config=dict(self.run_config),
            )
            for i, cfg in enumerate(self.node_configs)
        }

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        if self._run is None:
            raise RuntimeError("InProcessGrid.set_run() was not called")
        return self._run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._contexts)

    def partition_id(self, node_id: int) -> int:
        return int(self._contexts[node_id].node_config["partition-id"])

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        ids = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            self._replies[message.metadata.message_id] = self._deliver(message)
            ids.append(message.metadata.message_id)
        return ids

    def _deliver(self, message: Message) -> Message:
        """Run the ClientApp on one message; a failing client becomes an error reply."""
        node_id = message.metadata.dst_node_id
        context = self._contexts.get(node_id)
        if context is None:
            return Message(Error(code=0, reason=f"unknown node {node_id}"), reply_to=message)
        TaskIdentity.node_id = node_id
        start = time.perf_counter()
        error = None
        try:
            reply = self.client_app(_own_copy(message), context)
        except Exception as exc:  # a faulty client must not stop the run
            log.warning("client %s failed: %s", context.node_config.get("partition-id"), exc, exc_info=True)
            error = f"{type(exc).__name__}: {exc}"
            reply = Message(Error(code=1, reason=error), reply_to=message)
        finally:
            TaskIdentity.node_id = SUPERLINK_NODE_ID
        self.calls.append(
            ClientCall(
                node_id=node_id,
                partition_id=self.partition_id(node_id),
                message_type=message.metadata.message_type,
                group_id=message.metadata.group_id,
                seconds=time.perf_counter() - start,
                bytes_received=message_bytes(message),
                bytes_sent=message_bytes(reply),
                error=error,
            )
        )
        return reply

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self._replies.pop(i) for i in list(message_ids) if i in self._replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        """Replies of the clients that finished within ``timeout`` seconds. Clients run one
        after another here but in parallel on Flower's engines, so the timeout applies to each
        client's own time: a slower reply is discarded as it would not have arrived in time
        (a client that never returns blocks this runner; Flower's engines drop it)."""
        return list(self.deliver_one_by_one(messages, timeout=timeout))

    def deliver_one_by_one(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterator[Message]:
        """``send_and_receive`` as a generator: each client runs only when the previous
        reply has been taken, so a server that aggregates replies as they arrive
        (:mod:`fedspeech.federated.reply_stream`) holds one client model at a time here too."""
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            calls_before = len(self.calls)
            reply = self._deliver(message)
            call = self.calls[-1] if len(self.calls) > calls_before else None  # None: unknown node
            if timeout is not None and call is not None and call.seconds > timeout:
                call.error = f"replied after {call.seconds:.1f} s, beyond the {timeout:g} s timeout"
                continue
            yield reply


def run_inprocess(
    server_app: ServerApp,
    client_app: ClientApp,
    num_clients: int,
    run_config: dict,
    node_configs: list[dict] | None = None,
) -> InProcessGrid:
    """Run ``server_app`` against ``num_clients`` in-process ClientApp nodes.

    ``node_configs`` defaults to Flower's simulation convention
    (``partition-id``/``num-partitions``). Returns the grid, whose ``calls`` hold per-call
    timings and bytes.
    """
    if node_configs is None:
        node_configs = [{"partition-id": i, "num-partitions": num_clients} for i in range(num_clients)]
    grid = InProcessGrid(client_app=client_app, node_configs=node_configs, run_config=run_config)
    grid.set_run(Run.create_empty(run_id=0))
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 0, 0, SUPERLINK_NODE_ID
    context = Context(
        run_id=0, node_id=SUPERLINK_NODE_ID, node_config={}, state=RecordDict(), run_config=dict(run_config)
    )
    server_app(grid, context)
    return grid
