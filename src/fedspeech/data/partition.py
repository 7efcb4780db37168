"""Split a corpus across federated clients and choose who trains each round.

A partition is made once, written to a small JSON file, and read by every later job
(pretraining, fine-tuning, Flower SuperNodes started with ``--node-config
'partition=... client-id=...'``), so all of them agree on which utterances each client
holds. Only utterance ids are stored; the manifest stays the one source of paths and
labels.

Schemes (see docs docs/methods.md §5):

- ``speaker``: speaker-disjoint clients with roughly equal speech duration, the natural
  split of crowd-sourced speech.
- ``iid``: a random equal-size split of utterances, the easy reference.
- ``dirichlet``: label skew, each label's utterances spread over clients with
  proportions drawn from Dir(α); small α gives clients few labels each.

Only utterances of one split (default ``train``) are partitioned; dev/test stay
held-out sets shared by all.
"""

from __future__ import annotations

import heapq
import json
import math
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedspeech.data.manifest import SPLITS, Utterance

if TYPE_CHECKING:  # rich is only needed to render, not to partition
    from rich.table import Table

SCHEMES = ("speaker", "iid", "dirichlet")
SCHEMA_VERSION = 1
_SCHEMA_NAME = "fedspeech.partition"


class PartitionError(ValueError):
    """A partition that cannot be made, read or applied; the message says why."""


@dataclass
class Partition:
    """Which utterance ids each client holds; client index = position in ``clients``."""

    scheme: str
    seed: int
    alpha: float | None
    manifest: str
    clients: list[list[str]] = field(default_factory=list)
    split: str | None = "train"  # None: all splits were partitioned

    @property
    def num_clients(self) -> int:
        return len(self.clients)

    def save(self, path: str | Path) -> Path:
        """Write as JSON; the manifest path is stored relative to the file when it lies below it."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        manifest = self.manifest
        if manifest:
            try:
                manifest = str(Path(manifest).resolve().relative_to(path.parent.resolve()))
            except ValueError:
                manifest = str(Path(manifest).resolve())
        document = {
            "schema": _SCHEMA_NAME,
            "version": SCHEMA_VERSION,
            "scheme": self.scheme,
            "seed": self.seed,
            "alpha": self.alpha,
            "split": self.split,
            "manifest": manifest,
            "num_clients": self.num_clients,
            "clients": self.clients,
        }
        path.write_text(json.dumps(document, indent=1) + "\n", encoding="utf-8")
        return path

    @classmethod
    def load(cls, path: str | Path) -> Partition:
        """Read a file written by :meth:`save`; errors name the file and the field."""
        path = Path(path)
        if not path.is_file():
            raise PartitionError(f"{path}: partition file not found")
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise PartitionError(f"{path}: not a JSON partition file ({error})") from None
        if not isinstance(document, dict):
            raise PartitionError(f"{path}: expected a JSON object, got {type(document).__name__}")
        return _from_document(document, path)


def _from_document(document: dict[str, Any], path: Path) -> Partition:
    def fail(name: str, problem: str) -> PartitionError:
        return PartitionError(f"{path}: field '{name}' {problem}")

    for name in ("version", "scheme", "seed", "alpha", "manifest", "clients"):
        if name not in document:
            raise fail(name, "is missing")
    if document.get("schema", _SCHEMA_NAME) != _SCHEMA_NAME:
        raise fail("schema", f"must be {_SCHEMA_NAME!r}, got {document['schema']!r}")
    if document["version"] != SCHEMA_VERSION:
        raise fail("version", f"is {document['version']!r}; this fedspeech reads version {SCHEMA_VERSION}")
    scheme = document["scheme"]
    if scheme not in SCHEMES:
        raise fail("scheme", f"must be one of {SCHEMES}, got {scheme!r}")
    seed = document["seed"]
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise fail("seed", f"must be an integer, got {seed!r}")
    alpha = document["alpha"]
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or alpha <= 0):
        raise fail("alpha", f"must be a positive number or null, got {alpha!r}")
    if scheme == "dirichlet" and alpha is None:
        raise fail("alpha", "is required for scheme 'dirichlet'")
    split = document.get("split", "train")
    if split is not None and split not in SPLITS:
        raise fail("split", f"must be one of {SPLITS} or null, got {split!r}")
    manifest = document["manifest"]
    if not isinstance(manifest, str):
        raise fail("manifest", f"must be a path string, got {manifest!r}")
    if manifest and not Path(manifest).is_absolute():
        manifest = str(path.parent / manifest)
    clients = document["clients"]
    if not isinstance(clients, list) or not clients:
        raise fail("clients", "must be a non-empty list of lists of utterance ids")
    owner: dict[str, int] = {}
    for index, ids in enumerate(clients):
        if not isinstance(ids, list):
            raise fail(f"clients[{index}]", f"must be a list of utterance ids, got {type(ids).__name__}")
        for position, utt_id in enumerate(ids):
            if not isinstance(utt_id, str):
                raise fail(f"clients[{index}][{position}]", f"must be a string, got {utt_id!r}")
            if utt_id in owner:
                raise fail(f"clients[{index}]", f"repeats utterance {utt_id!r}, already in client {owner[utt_id]}")
            owner[utt_id] = index
    if "num_clients" in document and document["num_clients"] != len(clients):
        raise fail("num_clients", f"is {document['num_clients']!r} but 'clients' has {len(clients)} entries")
    return Partition(
        scheme=scheme,
        seed=seed,
        alpha=None if alpha is None else float(alpha),
        manifest=manifest,
        clients=[list(ids) for ids in clients],
        split=split,
    )


# --------------------------------------------------------------------------- selection


def _select(utts: Sequence[Utterance], num_clients: int, split: str | None, seed: int) -> list[Utterance]:
    """The utterances to partition, checked: the split exists, ids are unique, enough of them."""
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise PartitionError(f"seed must be a non-negative integer, got {seed!r}")  # numpy's requirement
    if isinstance(num_clients, bool) or not isinstance(num_clients, int) or num_clients < 1:
        raise PartitionError(f"number of clients must be a positive integer, got {num_clients!r}")
    if split is not None and split not in SPLITS:
        raise PartitionError(f"split must be one of {SPLITS} or None, got {split!r}")
    chosen = [u for u in utts if split is None or u.split == split]
    if not chosen:
        where = f"in split {split!r}" if split is not None else "given"
        raise PartitionError(f"no utterances {where} ({len(utts)} utterances in total)")
    duplicates = [utt_id for utt_id, n in Counter(u.id for u in chosen).items() if n > 1]
    if duplicates:
        raise PartitionError(f"utterance ids must be unique; {len(duplicates)} repeat, e.g. {duplicates[0]!r}")
    if len(chosen) < num_clients:
        raise PartitionError(
            f"cannot give {num_clients} clients at least one utterance each: only {len(chosen)} utterances"
            + (f" in split {split!r}" if split is not None else "")
        )
    return chosen


def _in_manifest_order(groups: list[list[str]], chosen: Sequence[Utterance]) -> list[list[str]]:
    """Each client's ids in manifest order, so files are readable and diff cleanly."""
    rank = {u.id: i for i, u in enumerate(chosen)}
    return [sorted(group, key=rank.__getitem__) for group in groups]


# --------------------------------------------------------------------------- schemes


def partition_by_speaker(
    utts: Sequence[Utterance], num_clients: int, seed: int, *, split: str | None = "train", manifest: str = ""
) -> Partition:
    """Speaker-disjoint clients with roughly equal speech duration.

    Greedy longest-processing-time: speakers are shuffled by ``seed``, stably sorted by
    total duration (longest first) and each goes to the client with the least duration so
    far (lowest index on ties). LPT keeps the longest client within 4/3 of the optimum.
    The seed only orders speakers of *equal* duration, so with distinct durations every
    seed gives the same split; that is intended: speaker partitions are the natural one.
    """
    chosen = _select(utts, num_clients, split, seed)
    unnamed = [u.id for u in chosen if not u.speaker]
    if unnamed:
        raise PartitionError(
            f"speaker partition needs a speaker on every utterance; {len(unnamed)} have none, e.g. {unnamed[0]!r}"
        )
    duration: dict[str, float] = {}
    for u in chosen:
        duration[u.speaker] = duration.get(u.speaker, 0.0) + u.duration
    if len(duration) < num_clients:
        raise PartitionError(
            f"speaker partition needs at least one speaker per client: {len(duration)} speakers for "
            f"{num_clients} clients"
        )
    rng = np.random.default_rng(seed)
    names = sorted(duration)  # independent of manifest row order
    shuffled = [names[i] for i in rng.permutation(len(names))]
    by_length = sorted(shuffled, key=lambda s: -duration[s])  # stable: ties keep the shuffle
    load = [(0.0, index) for index in range(num_clients)]  # (seconds so far, client) min-heap
    owner: dict[str, int] = {}
    for speaker in by_length:
        seconds, index = heapq.heappop(load)
        owner[speaker] = index
        heapq.heappush(load, (seconds + duration[speaker], index))
    groups: list[list[str]] = [[] for _ in range(num_clients)]
    for u in chosen:
        groups[owner[u.speaker]].append(u.id)
    return Partition("speaker", seed, None, manifest, groups, split)


def partition_iid(
    utts: Sequence[Utterance], num_clients: int, seed: int, *, split: str | None = "train", manifest: str = ""
) -> Partition:
    """A random split of utterances into sizes that differ by at most one."""
    chosen = _select(utts, num_clients, split, seed)
    order = np.random.default_rng(seed).permutation(len(chosen))
    groups = [[chosen[i].id for i in part] for part in np.array_split(order, num_clients)]
    return Partition("iid", seed, None, manifest, _in_manifest_order(groups, chosen), split)


def partition_dirichlet(
    utts: Sequence[Utterance],
    num_clients: int,
    alpha: float,
    seed: int,
    *,
    split: str | None = "train",
    manifest: str = "",
) -> Partition:
    """Label skew: each label's utterances go to clients in proportions drawn from Dir(α).

    Unlabelled utterances (e.g. the sentences of a mixed keyword/sentence corpus) are
    spread the same way as one more group, so a mixed corpus can still be partitioned;
    it is an error only when no utterance has a label.
    Labels are visited in sorted order so the draw depends only on the seed. Clients left
    empty by the draw (likely for small α) are then repaired deterministically: each, in
    index order, takes one utterance from the currently largest client. Repair rather than
    redraw-until-non-empty so that tiny α always terminates.
    """
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha <= 0:
        raise PartitionError(f"dirichlet alpha must be a positive number, got {alpha!r}")
    chosen = _select(utts, num_clients, split, seed)
    if not any(u.label for u in chosen):
        raise PartitionError(
            f"dirichlet partition needs labels, but none of the {len(chosen)} utterances"
            + (f" in split {split!r}" if split is not None else "")
            + " has one; use scheme 'speaker' or 'iid' for unlabelled audio"
        )
    rng = np.random.default_rng(seed)
    by_label: dict[str, list[str]] = {}
    for u in chosen:
        by_label.setdefault(u.label, []).append(u.id)
    groups: list[list[str]] = [[] for _ in range(num_clients)]
    for label in sorted(by_label):  # "" (unlabelled), if present, is just one more group
        ids = by_label[label]
        shuffled = [ids[i] for i in rng.permutation(len(ids))]
        proportions = rng.dirichlet(np.full(num_clients, float(alpha)))
        cuts = np.floor(np.cumsum(proportions)[:-1] * len(ids)).astype(int)
        for index, part in enumerate(np.split(np.arange(len(ids)), cuts)):
            groups[index].extend(shuffled[i] for i in part)
    for index in range(num_clients):
        if not groups[index]:
            donor = max(range(num_clients), key=lambda c: (len(groups[c]), -c))
            groups[index].append(groups[donor].pop())
    return Partition("dirichlet", seed, float(alpha), manifest, _in_manifest_order(groups, chosen), split)


def make_partition(
    utts: Sequence[Utterance],
    scheme: str,
    num_clients: int,
    seed: int = 0,
    *,
    alpha: float | None = None,
    split: str | None = "train",
    manifest: str = "",
) -> Partition:
    """Dispatch on ``scheme``; ``alpha`` is required for, and only for, ``dirichlet``."""
    if scheme not in SCHEMES:
        raise PartitionError(f"scheme must be one of {SCHEMES}, got {scheme!r}")
    if scheme == "dirichlet":
        if alpha is None:
            raise PartitionError("scheme 'dirichlet' needs alpha (the Dirichlet concentration, e.g. 0.5)")
        return partition_dirichlet(utts, num_clients, alpha, seed, split=split, manifest=manifest)
    if alpha is not None:
        raise PartitionError(f"alpha only applies to scheme 'dirichlet', not {scheme!r}")
    build = partition_by_speaker if scheme == "speaker" else partition_iid
    return build(utts, num_clients, seed, split=split, manifest=manifest)


# --------------------------------------------------------------------------- use


def client_utterances(partition: Partition, utterances: Sequence[Utterance], client_id: int | str) -> list[Utterance]:
    """The manifest rows of one client, in partition order.

    ``client_id`` may be a string (Flower ``--node-config`` values can be) holding an integer.
    """
    try:
        index = int(client_id)
    except (TypeError, ValueError):
        raise PartitionError(f"client id must be an integer, got {client_id!r}") from None
    if isinstance(client_id, float) and client_id != index:
        raise PartitionError(f"client id must be an integer, got {client_id!r}")
    if not 0 <= index < partition.num_clients:
        raise PartitionError(
            f"client id {index} out of range: the partition has {partition.num_clients} clients "
            f"(ids 0-{partition.num_clients - 1})"
        )
    by_id = {u.id: u for u in utterances}
    ids = partition.clients[index]
    missing = [utt_id for utt_id in ids if utt_id not in by_id]
    if missing:
        raise PartitionError(
            f"{len(missing)} of client {index}'s {len(ids)} utterance ids are not in the manifest "
            f"(e.g. {missing[0]!r}); was the partition made from another manifest? "
            f"It names {partition.manifest or '(no manifest)'}"
        )
    return [by_id[utt_id] for utt_id in ids]


def sample_clients(num_clients: int, per_round: int, server_round: int, seed: int) -> list[int]:
    """``per_round`` distinct client ids of ``num_clients``, sorted.

    Drawn from a generator seeded by (seed, round), so any process can recompute a round's
    choice without shared state, and rounds differ. All clients when per_round == num_clients.
    """
    if num_clients < 1:
        raise PartitionError(f"num_clients must be positive, got {num_clients}")
    if not 1 <= per_round <= num_clients:
        raise PartitionError(f"clients per round must be between 1 and {num_clients}, got {per_round}")
    if seed < 0 or server_round < 0:
        raise PartitionError(f"seed and round must be non-negative, got seed={seed}, round={server_round}")
    if per_round == num_clients:
        return list(range(num_clients))
    rng = np.random.default_rng([seed, server_round])
    return sorted(int(c) for c in rng.choice(num_clients, size=per_round, replace=False))


# --------------------------------------------------------------------------- reporting


def client_summary(partition: Partition, utts: Sequence[Utterance]) -> list[dict[str, Any]]:
    """One row per client: utterances, speakers, seconds, hours, label counts (most common first)
    and how many utterances have no label."""
    rows = []
    for index in range(partition.num_clients):
        mine = client_utterances(partition, utts, index)
        seconds = sum(u.duration for u in mine)
        labels = Counter(u.label for u in mine if u.label)
        rows.append(
            {
                "client": index,
                "utterances": len(mine),
                "speakers": len({u.speaker for u in mine}),
                "seconds": seconds,
                "hours": seconds / 3600.0,
                "labels": dict(sorted(labels.items(), key=lambda item: (-item[1], item[0]))),
                "unlabelled": sum(1 for u in mine if not u.label),
            }
        )
    return rows


def summary_table(rows: Sequence[dict[str, Any]], *, top_labels: int = 3, title: str | None = None) -> Table:
    """Render :func:`client_summary` rows as a ``rich`` table, with only the top labels shown."""
    from rich.table import Table

    table = Table(title=title)
    for name in ("client", "utts", "speakers", "hours", "seconds"):
        table.add_column(name, justify="right")
    table.add_column("labels (top)", justify="left")
    for row in rows:
        labels = row["labels"]
        shown = ", ".join(f"{label}:{n}" for label, n in list(labels.items())[:top_labels])
        if len(labels) > top_labels:
            shown += f" (+{len(labels) - top_labels} more)"
        if labels and row.get("unlabelled"):
            shown += f"; unlabelled:{row['unlabelled']}"
        table.add_row(
            str(row["client"]),
            str(row["utterances"]),
            str(row["speakers"]),
            f"{row['hours']:.3f}",
            f"{row['seconds']:.1f}",
            shown or "-",
        )
    return table
