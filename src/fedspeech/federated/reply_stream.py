"""Aggregate a round's replies as they arrive, so the server never holds every client model.

Why: a server that waits for all K replies before averaging holds K models at once (20 ×
380 MB for wav2vec 2.0 base); the rules that are weighted sums (FedAvg, loss-weighted,
mixed, L-DAWA, FedU, depth-aware partial) only need one running float64 sum. A
:class:`ReplyStream` screens each reply the moment it arrives exactly as the held path does
(:meth:`~fedspeech.federated.strategies.RobustFedAvg.screen_replies`, then the norm bound and
clipping of ``guard_norms``), adds it to the rule's running sum, and drops the reply's model
arrays; metrics, configs and other records (e.g. AdamW moments) stay for the workload.
``finish`` ends the round as ``aggregate_train`` would (too few valid replies: the model is
kept; DP noise; the server optimizer's step).

Not streamed (the round loop holds the replies and calls ``aggregate_train``): coordinate
median and trimmed mean, the median-norm guard (``norm_median_ratio``: the round's median
is known only at the end) and SecAgg+ rounds (Flower's workflow aggregates those).

The sums are added in arrival order, so on Flower's engines the last bits of a float64 sum
may depend on which client answered first; the in-process runner delivers in node order,
so its runs repeat bit for bit.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from typing import TYPE_CHECKING

from flwr.app import ArrayRecord, Message, MetricRecord

from fedspeech.federated.aggregation import StateDict

if TYPE_CHECKING:
    from fedspeech.federated.strategies import Aggregate, ClientUpdate, RobustFedAvg

log = logging.getLogger(__name__)


class ReplyStream:
    """One round of one strategy, fed one reply at a time (make it with
    :meth:`RobustFedAvg.reply_stream`)."""

    def __init__(
        self,
        strategy: RobustFedAvg,
        server_round: int,
        reference: StateDict,
        add: Callable[[ClientUpdate], None],
        finish: Callable[[list[ClientUpdate]], Aggregate],
    ) -> None:
        from fedspeech.federated.strategies import RoundReport

        self.strategy = strategy
        self.reference = reference
        self._add, self._finish = add, finish
        self.report = RoundReport(server_round, strategy.rule_name)
        self.updates: list[ClientUpdate] = []
        self.refused: dict[int, list[str]] = {}
        self.ignored: dict[int, int] = {}
        self.replies = 0

    def add(self, reply: Message) -> None:
        """Screen one reply and, if accepted, add it to the running aggregate."""
        self.replies += 1
        accepted, refused, ignored = self.strategy.screen_replies([reply], self.reference)
        self.refused.update(refused)
        self.ignored.update(ignored)
        kept = self.strategy.guard_norms(accepted, self.reference, self.refused, self.report)
        for update in kept:
            self._add(update)
            self.updates.append(dataclasses.replace(update, state={}))  # the arrays are in the sum now
        _drop_arrays(reply, self.strategy.arrayrecord_key)

    def finish(self) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """End the round: the new global record (or the old one if too few were valid)."""
        strategy, report = self.strategy, self.report
        strategy.reports.append(report)
        if not self.replies:
            log.warning("%s: round %d received no replies", strategy.rule_name, report.server_round)
            return None, None
        updates = sorted(self.updates, key=lambda u: u.node_id)
        return strategy.conclude_round(
            report, updates, self.refused, self.ignored, self.replies, lambda: self._finish(updates)
        )


def _drop_arrays(reply: Message, key: str) -> None:
    """Free a reply's model arrays once they are summed (its other records stay)."""
    if reply.has_content() and key in reply.content.array_records:
        del reply.content[key]
