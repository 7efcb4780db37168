"""The one server round loop every workload runs.

Each round: sample this round's nodes (seeded, :mod:`sampling`), let the strategy build the
train messages, let the workload add to them, send and receive, let the workload check the
replies, screen and aggregate (the strategy), then hand the outcome to the workload's
``after_round`` (evaluate, checkpoint, probe) and append the record it returns to the round
log. Workloads plug in through the small :class:`RoundHooks` methods and keep the science.

Rules that are weighted sums aggregate each reply as it arrives and drop its model arrays
(:mod:`reply_stream`), so the server holds one client model at a time instead of K; the
others (median, trimmed mean, the median-norm guard, SecAgg+) get every reply at once.

Why not Flower's ``Strategy.start``: it samples nodes unseeded, has no place to attach
per-node content (optimizer moments, depths) or to resume from a checkpoint mid-run, and
keeps its per-round evaluation to a single ``evaluate_fn``. The aggregation itself is
Flower's strategies' (``configure_train``/``aggregate_train``), which this loop calls.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Error, Message
from flwr.serverapp import Grid

from fedspeech.federated import checkpoints, roundlog
from fedspeech.federated.inprocess import InProcessGrid, message_bytes
from fedspeech.federated.sampling import SampledGrid, sampled_nodes
from fedspeech.federated.secagg import secure_replies
from fedspeech.federated.strategies import RobustFedAvg, RoundReport

log = logging.getLogger(__name__)


@dataclass
class RoundOutcome:
    """What one round produced, for the workload's ``after_round``."""

    server_round: int
    config: ConfigRecord  # the train config sent to every client
    messages: list[Message]  # as sent
    replies: list[Message]  # in node order, errors included; streamed rules dropped their model arrays
    arrays: ArrayRecord  # the global model after aggregation
    report: RoundReport | None  # the strategy's screening and weights
    reply_sizes: dict[int, ReplySize] = field(default_factory=dict)  # by node, as received

    def bytes_by_node(self) -> dict[int, int]:
        """Bytes each client sent this round, as received."""
        return {node: size.bytes for node, size in self.reply_sizes.items()}


@dataclass(frozen=True)
class ReplySize:
    """What a reply carried when it arrived (its model arrays may be dropped since)."""

    bytes: int  # all records, as Flower counts them
    arrays: int  # arrays in its model record


class RoundHooks:
    """Per-workload behaviour of the round loop; override what the workload needs.
    ``keep_checkpoints``: round checkpoints kept once a round is logged (0 = all)."""

    keep_checkpoints: int = 0

    def train_config(self, server_round: int) -> dict[str, Any]:
        """The config every client gets this round (learning rate, step, ...)."""
        return {}

    def prepare_messages(self, server_round: int, messages: list[Message]) -> None:
        """Add per-node content to the strategy's messages before they are sent."""

    def check_replies(self, server_round: int, replies: list[Message]) -> None:
        """Raise to stop the run on these replies (default: screening decides)."""

    def after_round(self, outcome: RoundOutcome) -> dict[str, Any]:
        """Evaluate / checkpoint / probe the new global model; return the round record."""
        raise NotImplementedError


def run_rounds(
    grid: Grid,
    strategy: RobustFedAvg,
    hooks: RoundHooks,
    arrays: ArrayRecord,
    *,
    nodes: list[int],
    clients_per_round: int,
    seed: int,
    rounds: int,
    out: Path,
    first_round: int = 1,
    label: str = "federated rounds",
    reply_timeout: float = 0.0,
    secure_aggregation: bool = False,
) -> list[dict[str, Any]]:
    """Run rounds ``first_round``..``rounds``; returns the records appended to the round log
    (each with ``round_seconds`` added). ``reply_timeout`` > 0: a client that has not replied
    that many seconds after the round's messages went out is dropped from the round.
    ``secure_aggregation``: the replies come from a SecAgg+ round (:mod:`secagg`)."""
    from rich.progress import Progress

    records = []
    with Progress(disable=not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task(label, total=rounds, completed=first_round - 1)
        for server_round in range(first_round, rounds + 1):
            started = time.perf_counter()
            chosen = sampled_nodes(nodes, clients_per_round, server_round, seed)
            config = ConfigRecord(hooks.train_config(server_round))
            messages = list(strategy.configure_train(server_round, arrays, config, SampledGrid(grid, chosen)))
            hooks.prepare_messages(server_round, messages)
            replies, new_arrays, sizes = _exchange(
                grid, strategy, hooks, messages, server_round, reply_timeout, secure_aggregation
            )
            if new_arrays is not None:  # our strategies return the full global record
                arrays = new_arrays
            record = hooks.after_round(
                RoundOutcome(server_round, config, messages, replies, arrays, strategy.last_report, sizes)
            )
            report = strategy.last_report
            if report is not None and "failed" in report.details:  # too few valid replies: model unchanged
                record["round_failed"] = report.details["failed"]
            record["round_seconds"] = time.perf_counter() - started
            roundlog.append_round(out, record)  # the round is complete from here on
            checkpoints.prune_checkpoints(out, hooks.keep_checkpoints)
            records.append(record)
            progress.advance(task)
    return records


def _exchange(
    grid: Grid,
    strategy: RobustFedAvg,
    hooks: RoundHooks,
    messages: list[Message],
    server_round: int,
    reply_timeout: float,
    secure_aggregation: bool,
) -> tuple[list[Message], ArrayRecord | None, dict[int, ReplySize]]:
    """Send the round's messages, take the replies (aggregating each as it arrives where the
    rule allows), let the workload check them, and aggregate: (replies, new global record or
    None, sizes as received)."""
    sizes: dict[int, ReplySize] = {}
    stream = None if secure_aggregation else strategy.reply_stream(server_round)

    def arrived(reply: Message) -> None:
        sizes[int(reply.metadata.src_node_id)] = reply_size(reply, strategy.arrayrecord_key)
        if stream is not None:
            stream.add(reply)

    if secure_aggregation:
        replies = secure_replies(grid, messages, server_round, timeout=reply_timeout)
        for reply in replies:
            arrived(reply)
    else:
        replies = receive_replies(grid, messages, reply_timeout, on_reply=arrived)
    hooks.check_replies(server_round, replies)
    new_arrays, _ = stream.finish() if stream is not None else strategy.aggregate_train(server_round, replies)
    return replies, new_arrays, sizes


def receive_replies(
    grid: Grid,
    messages: list[Message],
    reply_timeout: float = 0.0,
    on_reply: Callable[[Message], None] | None = None,
) -> list[Message]:
    """Send ``messages`` and wait for the replies, at most ``reply_timeout`` seconds (0 = no
    limit); in node order. ``on_reply`` sees each reply as soon as it arrives (a streamed
    aggregation adds it and drops its arrays). A node that did not answer in time gets an
    error reply, so it is logged as failed like a client that raised, and the round goes on
    without it."""
    replies: list[Message] = []
    for reply in _arrivals(grid, messages, reply_timeout or None):
        if on_reply is not None:
            on_reply(reply)
        replies.append(reply)
    answered = {int(reply.metadata.src_node_id) for reply in replies}
    for message in messages:
        if int(message.metadata.dst_node_id) not in answered:
            reason = f"no reply within the {reply_timeout:g} s reply timeout"
            log.warning("node %d: %s; dropped from this round", message.metadata.dst_node_id, reason)
            late = Message(Error(code=0, reason=reason), reply_to=message)
            if on_reply is not None:
                on_reply(late)
            replies.append(late)
    return sorted(replies, key=lambda m: int(m.metadata.src_node_id))


#: Seconds between two pulls while waiting for replies on Flower's engines.
PULL_INTERVAL = 0.5


def _arrivals(grid: Grid, messages: list[Message], timeout: float | None) -> Iterator[Message]:
    """Replies one batch at a time as Flower's grid hands them over (``push_messages`` then
    ``pull_messages``, as its ``send_and_receive`` does, but without collecting them all
    first); the in-process grid runs each client only when the previous reply is taken."""
    if isinstance(grid, InProcessGrid):
        yield from grid.deliver_one_by_one(messages, timeout=timeout)
        return
    pending = set(grid.push_messages(messages))
    deadline = None if timeout is None else time.monotonic() + timeout
    while pending and (deadline is None or time.monotonic() < deadline):
        arrived = list(grid.pull_messages(pending))
        for reply in arrived:
            pending.discard(reply.metadata.reply_to_message_id)
            yield reply
        if pending and not arrived:
            time.sleep(PULL_INTERVAL)


def reply_size(reply: Message, key: str) -> ReplySize:
    """Bytes and model arrays of a reply, taken before a streamed round drops its arrays."""
    if not reply.has_content():
        return ReplySize(0, 0)
    model = reply.content.array_records.get(key)
    return ReplySize(message_bytes(reply), len(model) if model is not None else 0)


def resume_point(out: Path, resume: bool, *, resumable: bool = True) -> tuple[Path | None, dict[str, Any]]:
    """Where a run starts: ``(latest complete round's checkpoint, its state)`` when resuming
    (the round log is cut back to that round), ``(None, {})`` for a fresh run. A folder that
    already holds a run is refused unless resuming, so nothing is overwritten."""
    # the newest checkpoint of a *logged* round: a round killed after its checkpoint but before
    # its log line is not complete and runs again
    latest = checkpoints.latest_checkpoint(out, roundlog.last_round(out)) if resume and resumable else None
    if latest is None:
        if roundlog.log_path(out).exists() and not (resume and resumable):
            hint = "pass --resume to continue it" if resumable else "this workload does not resume"
            raise ValueError(f"{out}: holds an earlier run ({hint}); choose another --out")
        roundlog.truncate_after(out, 0)  # resuming a run killed before its first round completed
        return None, {}
    state = checkpoints.load_state(latest)
    roundlog.truncate_after(out, state["round"])
    log.info("resuming after round %d from %s", state["round"], latest)
    return latest, state


def round_totals(clients: list[dict[str, Any]]) -> dict[str, Any]:
    """The fields every workload's record shares, from its accepted client rows."""
    examples = sum(c["examples"] for c in clients)
    return {
        "sampled": sorted(c["client"] for c in clients),
        "train_loss": sum(c["train_loss"] * c["examples"] for c in clients) / max(1, examples),
    }
