"""Fault injection for simulated runs: a Flower client mod that makes chosen clients crash,
stall, or send NaN, scaled or sign-flipped updates, so users and tests can see what the
screening (``strategies.RobustFedAvg``) and the round loop do with them.

Spec (the ``faults`` setting, ``--faults``): comma-separated ``kind=probability`` or
``kind=amount:probability``, e.g. ``crash=0.1,nan=0.05,scale=100:0.05,flip=0.1,slow=5:0.1``:

- ``crash``: the client raises (an error reply);
- ``nan``: every float array of its update is NaN;
- ``scale=F``: its update is ``w + F * (w_k - w)`` (a model-replacement attack);
- ``flip``: its update is ``w - (w_k - w)`` (sign flipping);
- ``slow=S``: it sleeps ``S`` seconds before training.

Which client misbehaves in which round is drawn from ``(seed, round, client)``, the same
under every runner. ``malicious=0:3`` names clients (partition ids) that show the first
listed kind (in the order above) every round, e.g. ``scale=100:0,malicious=0:3``: clients
0 and 3 send 100x updates, nobody else misbehaves.

Import-light (numpy only; Flower is imported by the mod itself), so settings can validate
a spec without loading Flower.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from flwr.app import ArrayRecord, Context, Message

KINDS = ("crash", "nan", "scale", "flip", "slow")
_DEFAULT_AMOUNT = {"scale": 10.0, "slow": 1.0}


@dataclass(frozen=True)
class FaultPlan:
    """``probabilities[kind]`` per round and client, ``amounts`` for scale and slow, and
    ``malicious`` clients that misbehave every round."""

    probabilities: dict[str, float] = field(default_factory=dict)
    amounts: dict[str, float] = field(default_factory=dict)
    malicious: frozenset[int] = frozenset()

    def draw(self, seed: int, server_round: int, client: int) -> str | None:
        """The fault client ``client`` shows in ``server_round`` (at most one), or None."""
        if not self.probabilities:
            return None
        rng = np.random.default_rng([seed, server_round, client, 0xFA017])
        for kind in KINDS:  # fixed order, one uniform draw each: reproducible
            chance = 1.0 if client in self.malicious else self.probabilities.get(kind, 0.0)
            if kind in self.probabilities and rng.random() < chance:
                return kind
        return None


@functools.lru_cache(maxsize=16)  # the client mod parses the run's spec on every message
def parse_faults(spec: str) -> FaultPlan:
    """A :class:`FaultPlan` from the ``faults`` setting; errors name the entry."""
    probabilities: dict[str, float] = {}
    amounts: dict[str, float] = {}
    malicious: set[int] = set()
    for entry in (e.strip() for e in spec.split(",") if e.strip()):
        kind, _, value = entry.partition("=")
        kind = kind.strip()
        if kind == "malicious":
            try:
                malicious.update(int(v) for v in value.split(":") if v)
            except ValueError:
                raise ValueError(f"faults: {entry!r}: malicious takes client ids, e.g. malicious=0:3") from None
            continue
        if kind not in KINDS:
            raise ValueError(f"faults: {entry!r}: unknown kind {kind!r}; choose from {', '.join(KINDS)} or malicious")
        amount, _, chance = value.rpartition(":")
        try:
            probability = float(chance)
            amounts[kind] = float(amount) if amount else _DEFAULT_AMOUNT.get(kind, 0.0)
        except ValueError:
            raise ValueError(f"faults: {entry!r}: expected {kind}=probability or {kind}=amount:probability") from None
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"faults: {entry!r}: probability must be in [0, 1]")
        probabilities[kind] = probability
    return FaultPlan(probabilities, amounts, frozenset(malicious))


def _tampered(reply: Message, sent: ArrayRecord, kind: str, amount: float) -> Message:
    """The reply with its update replaced as ``kind`` says (float arrays only)."""
    from flwr.app import Array, ArrayRecord

    arrays = reply.content["arrays"]
    changed = {}
    for key, array in arrays.items():
        value = array.numpy()
        if value.dtype.kind != "f":
            changed[key] = array
            continue
        if kind == "nan":
            new = np.full_like(value, np.nan)
        else:
            start = sent[key].numpy() if key in sent else np.zeros_like(value)
            factor = amount if kind == "scale" else -1.0
            new = (start + factor * (value - start)).astype(value.dtype)
        changed[key] = Array(np.ascontiguousarray(new))
    reply.content["arrays"] = ArrayRecord(changed)
    return reply


def faults_mod(msg: Message, context: Context, call_next: Callable[[Message, Context], Message]) -> Message:
    """Client mod applying the run's ``faults`` setting to train messages (no-op without one)."""
    from flwr.app import MessageType

    spec = str(context.run_config.get("faults", ""))
    if not spec or msg.metadata.message_type != MessageType.TRAIN:
        return call_next(msg, context)
    plan = parse_faults(spec)
    client = int(context.node_config.get("partition-id", msg.metadata.dst_node_id))
    server_round = int(msg.content["config"]["server-round"])
    kind = plan.draw(int(context.run_config.get("seed", 0)), server_round, client)
    if kind == "crash":
        raise RuntimeError(f"injected fault: client {client} crashed in round {server_round}")
    if kind == "slow":
        time.sleep(plan.amounts["slow"])
    sent = msg.content["arrays"]
    reply = call_next(msg, context)
    if kind in ("nan", "scale", "flip") and not reply.has_error():
        reply = _tampered(reply, sent, kind, plan.amounts.get(kind, 0.0))
    return reply
