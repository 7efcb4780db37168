"""Deterministic client sampling on top of any Flower strategy.

Flower strategies sample nodes with an unseeded ``random.sample`` inside
``configure_train``. Our runs must sample the same clients per (seed, round) so that
runs are reproducible and a resumed run continues exactly as the uninterrupted one
would. Rather than re-implement each strategy's ``configure_train``, we hand it a view of
the grid that exposes only the nodes we sampled; with ``fraction_train=1.0`` the
strategy then addresses exactly those, in any runner.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable

from flwr.app import Message, RecordDict
from flwr.serverapp import Grid

from fedspeech.data.partition import sample_clients

log = logging.getLogger(__name__)


class SampledGrid(Grid):
    """A ``Grid`` restricted to ``node_ids``; everything else is delegated."""

    def __init__(self, grid: Grid, node_ids: list[int]) -> None:
        self._grid = grid
        self._node_ids = list(node_ids)

    def set_run(self, run) -> None:
        self._grid.set_run(run)

    @property
    def run(self):
        return self._grid.run

    def create_message(
        self, content: RecordDict, message_type: str, dst_node_id: int, group_id: str, ttl: float | None = None
    ) -> Message:
        return self._grid.create_message(content, message_type, dst_node_id, group_id, ttl)

    def get_node_ids(self) -> Iterable[int]:
        return list(self._node_ids)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


def wait_for_nodes(grid: Grid, expected: int, timeout: float = 600.0) -> list[int]:
    """Node ids, sorted, once ``expected`` nodes are connected (Deployment Engine nodes
    connect one by one); fails after ``timeout`` seconds naming how many came."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= expected:
            return nodes
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {len(nodes)} of {expected} clients connected within {timeout:.0f} s")
        log.info("waiting for clients: %d of %d connected", len(nodes), expected)
        time.sleep(1.0)


def sampled_nodes(nodes: list[int], per_round: int, server_round: int, seed: int) -> list[int]:
    """The nodes taking part in ``server_round``: ``per_round`` of ``nodes`` (0 = all)."""
    k = len(nodes) if per_round <= 0 else min(per_round, len(nodes))
    return [nodes[i] for i in sample_clients(len(nodes), k, server_round, seed)]
