"""Partition invariants on synthetic utterance lists (no audio needed)."""

from __future__ import annotations

import io
import json
import math
import random
from collections import Counter

import pytest

from fedspeech.data.manifest import Utterance
from fedspeech.data.partition import (
    Partition,
    PartitionError,
    client_summary,
    client_utterances,
    make_partition,
    partition_by_speaker,
    partition_dirichlet,
    partition_iid,
    sample_clients,
    summary_table,
)


def make_utts(
    speakers: int = 40,
    per_speaker: int = 6,
    labels: int = 8,
    seed: int = 0,
    duration: tuple[float, float] = (8.0, 12.0),
    splits: bool = True,
) -> list[Utterance]:
    """Speakers with similar total durations; every 5th speaker is dev/test when ``splits``."""
    rng = random.Random(seed)
    utts = []
    for s in range(speakers):
        split = "train"
        if splits and s % 10 == 8:
            split = "dev"
        elif splits and s % 10 == 9:
            split = "test"
        for i in range(per_speaker):
            utts.append(
                Utterance(
                    id=f"spk{s:03d}-{i:02d}",
                    path=f"/nowhere/spk{s:03d}-{i:02d}.wav",
                    duration=rng.uniform(*duration),
                    sample_rate=16000,
                    speaker=f"spk{s:03d}",
                    label=f"word{rng.randrange(labels)}" if labels else "",
                    split=split,
                )
            )
    return utts


def train_ids(utts: list[Utterance]) -> list[str]:
    return [u.id for u in utts if u.split == "train"]


def assert_exact_cover(partition: Partition, expected_ids: list[str]) -> None:
    flat = [utt_id for client in partition.clients for utt_id in client]
    assert len(flat) == len(set(flat)), "an utterance is on two clients"
    assert sorted(flat) == sorted(expected_ids)
    assert all(partition.clients), "a client has no utterances"


def client_seconds(partition: Partition, utts: list[Utterance]) -> list[float]:
    return [row["seconds"] for row in client_summary(partition, utts)]


def _speaker_seconds(utts: list[Utterance]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for u in utts:
        seconds[u.speaker] = seconds.get(u.speaker, 0.0) + u.duration
    return seconds


def mean_label_entropy(partition: Partition, utts: list[Utterance]) -> float:
    entropies = []
    for row in client_summary(partition, utts):
        counts = list(row["labels"].values())
        total = sum(counts)
        entropies.append(-sum(c / total * math.log(c / total) for c in counts))
    return sum(entropies) / len(entropies)


# ------------------------------------------------------------------ speaker


def test_speaker_partition_is_disjoint_complete_and_balanced():
    utts = make_utts(speakers=100)  # 80 train speakers of about 60 s each
    partition = partition_by_speaker(utts, 4, seed=1)
    assert partition.scheme == "speaker" and partition.alpha is None and partition.split == "train"
    assert_exact_cover(partition, train_ids(utts))
    speaker_of = {u.id: u.speaker for u in utts}
    owners: dict[str, set[int]] = {}
    for client, ids in enumerate(partition.clients):
        for utt_id in ids:
            owners.setdefault(speaker_of[utt_id], set()).add(client)
    assert all(len(clients) == 1 for clients in owners.values()), "a speaker is on two clients"
    seconds = client_seconds(partition, utts)
    longest_speaker = max(_speaker_seconds(utts).values())
    assert max(seconds) - min(seconds) <= longest_speaker  # LPT: the last speaker placed closes the gap
    assert max(seconds) / min(seconds) < 1.01, seconds  # a round-robin deal gives ~1.03 here


def test_speaker_partition_follows_lpt_on_a_known_case():
    # Speaker durations 7, 5, 4, 3, 1 on 2 clients: LPT gives {7, 3} and {5, 4, 1}.
    utts = [Utterance(f"u{d}", f"/x/{d}.wav", float(d), 16000, speaker=f"s{d}") for d in (1, 3, 4, 5, 7)]
    partition = partition_by_speaker(utts, 2, seed=0)
    assert [sorted(client) for client in partition.clients] == [["u3", "u7"], ["u1", "u4", "u5"]]


def test_speaker_partition_is_deterministic_and_seed_breaks_ties():
    utts = make_utts(speakers=12, per_speaker=2, duration=(5.0, 5.0), splits=False)  # all speakers tie
    first = partition_by_speaker(utts, 4, seed=3)
    assert partition_by_speaker(utts, 4, seed=3).clients == first.clients
    reordered = partition_by_speaker(list(reversed(utts)), 4, seed=3)  # manifest row order does not matter
    assert [set(c) for c in reordered.clients] == [set(c) for c in first.clients]
    others = [partition_by_speaker(utts, 4, seed=s).clients for s in range(4, 8)]
    assert any(other != first.clients for other in others)
    assert max(client_seconds(first, utts)) == min(client_seconds(first, utts))


def test_speaker_partition_needs_enough_speakers():
    utts = make_utts(speakers=3, splits=False)
    with pytest.raises(PartitionError, match=r"3 speakers for 5 clients"):
        partition_by_speaker(utts, 5, seed=0)


def test_speaker_partition_rejects_missing_speaker():
    utts = [Utterance("a", "/a.wav", 1.0, 16000, speaker=""), Utterance("b", "/b.wav", 1.0, 16000, speaker="x")]
    with pytest.raises(PartitionError, match="needs a speaker.*'a'"):
        partition_by_speaker(utts, 1, seed=0)


# ------------------------------------------------------------------ iid


def test_iid_partition_equal_sizes_deterministic_and_seeded():
    utts = make_utts()
    partition = partition_iid(utts, 7, seed=0)
    assert_exact_cover(partition, train_ids(utts))
    sizes = [len(client) for client in partition.clients]
    assert max(sizes) - min(sizes) <= 1
    assert partition_iid(utts, 7, seed=0).clients == partition.clients
    assert partition_iid(utts, 7, seed=1).clients != partition.clients


def test_iid_needs_an_utterance_per_client():
    utts = make_utts(speakers=1, per_speaker=3, splits=False)
    with pytest.raises(PartitionError, match="only 3 utterances"):
        partition_iid(utts, 4, seed=0)


# ------------------------------------------------------------------ dirichlet


def test_dirichlet_cover_determinism_and_seed():
    utts = make_utts()
    partition = partition_dirichlet(utts, 6, alpha=0.5, seed=0)
    assert partition.alpha == 0.5 and partition.scheme == "dirichlet"
    assert_exact_cover(partition, train_ids(utts))
    assert partition_dirichlet(utts, 6, alpha=0.5, seed=0).clients == partition.clients
    assert partition_dirichlet(utts, 6, alpha=0.5, seed=1).clients != partition.clients


def test_dirichlet_small_alpha_skews_labels_more():
    utts = make_utts(speakers=100, per_speaker=10, labels=10, splits=False)
    skewed = [mean_label_entropy(partition_dirichlet(utts, 10, 0.1, seed=s), utts) for s in range(3)]
    uniform = [mean_label_entropy(partition_dirichlet(utts, 10, 100.0, seed=s), utts) for s in range(3)]
    assert max(skewed) < min(uniform)
    assert min(uniform) > 0.9 * math.log(10)  # large alpha: nearly every label everywhere


def test_dirichlet_gives_every_client_an_utterance():
    utts = make_utts(speakers=10, per_speaker=6, labels=3, splits=False)
    for seed in range(5):
        partition = partition_dirichlet(utts, 30, alpha=0.01, seed=seed)
        assert_exact_cover(partition, [u.id for u in utts])
    exactly = partition_dirichlet(utts[:30], 30, alpha=0.01, seed=0)
    assert sorted(len(c) for c in exactly.clients) == [1] * 30


def test_dirichlet_needs_labels_and_positive_alpha():
    utts = make_utts(speakers=4, labels=0, splits=False)
    with pytest.raises(PartitionError, match="needs labels, but none of the 24 utterances"):
        partition_dirichlet(utts, 2, alpha=1.0, seed=0)
    with pytest.raises(PartitionError, match="alpha must be a positive number"):
        partition_dirichlet(make_utts(speakers=4), 2, alpha=0.0, seed=0)


def test_dirichlet_spreads_unlabelled_utterances_of_a_mixed_corpus():
    labelled = make_utts(speakers=10, labels=4, splits=False)
    sentences = [
        Utterance(f"sent{i}", f"/x/sent{i}.wav", 3.0, 16000, speaker=f"spk{i % 10:03d}", transcript="hello there")
        for i in range(40)
    ]
    utts = labelled + sentences
    partition = partition_dirichlet(utts, 4, alpha=1.0, seed=0)
    assert_exact_cover(partition, [u.id for u in utts])
    rows = client_summary(partition, utts)
    assert sum(row["unlabelled"] for row in rows) == 40
    assert sum(sum(row["labels"].values()) for row in rows) == len(labelled)


# ------------------------------------------------------------------ splits and dispatch


def test_only_the_chosen_split_is_partitioned():
    utts = make_utts()
    held_out = {u.id for u in utts if u.split != "train"}
    assert held_out
    for scheme, alpha in (("speaker", None), ("iid", None), ("dirichlet", 1.0)):
        partition = make_partition(utts, scheme, 4, seed=0, alpha=alpha)
        assert not held_out & {i for c in partition.clients for i in c}
    dev = make_partition(utts, "iid", 2, split="dev")
    assert_exact_cover(dev, [u.id for u in utts if u.split == "dev"])
    everything = make_partition(utts, "iid", 2, split=None)
    assert_exact_cover(everything, [u.id for u in utts])
    with pytest.raises(PartitionError, match="no utterances in split 'test'"):
        make_partition([u for u in utts if u.split == "train"], "iid", 2, split="test")


def test_make_partition_checks_scheme_and_alpha():
    utts = make_utts(speakers=4)
    with pytest.raises(PartitionError, match="scheme must be one of"):
        make_partition(utts, "random", 2)
    with pytest.raises(PartitionError, match="needs alpha"):
        make_partition(utts, "dirichlet", 2)
    with pytest.raises(PartitionError, match="alpha only applies"):
        make_partition(utts, "iid", 2, alpha=0.3)
    with pytest.raises(PartitionError, match="positive integer"):
        make_partition(utts, "iid", 0)
    with pytest.raises(PartitionError, match="seed must be a non-negative integer"):
        make_partition(utts, "speaker", 2, seed=-1)


# ------------------------------------------------------------------ file format


def test_save_load_round_trip_with_relative_manifest(tmp_path):
    utts = make_utts()
    manifest = tmp_path / "corpus" / "manifest.tsv"
    partition = partition_dirichlet(utts, 5, alpha=0.3, seed=9, manifest=str(manifest))
    path = partition.save(tmp_path / "corpus" / "p.json")
    stored = json.loads(path.read_text())
    assert stored["version"] == 1 and stored["manifest"] == "manifest.tsv"
    loaded = Partition.load(path)
    assert loaded.clients == partition.clients
    assert (loaded.scheme, loaded.seed, loaded.alpha, loaded.split) == ("dirichlet", 9, 0.3, "train")
    # Relative paths are stored against the partition's folder, so moving the whole tree works.
    moved = tmp_path / "moved"
    (tmp_path / "corpus").rename(moved)
    assert Partition.load(moved / "p.json").manifest == str(moved / "manifest.tsv")


def test_manifest_outside_the_partition_folder_is_stored_absolute(tmp_path):
    partition = partition_iid(make_utts(speakers=4), 2, seed=0, manifest=str(tmp_path / "elsewhere" / "m.tsv"))
    path = partition.save(tmp_path / "parts" / "p.json")
    assert json.loads(path.read_text())["manifest"] == str((tmp_path / "elsewhere" / "m.tsv").resolve())


def _valid_document() -> dict:
    return {
        "schema": "fedspeech.partition",
        "version": 1,
        "scheme": "iid",
        "seed": 0,
        "alpha": None,
        "split": "train",
        "manifest": "/m.tsv",
        "num_clients": 2,
        "clients": [["a"], ["b"]],
    }


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"version": 2}, "field 'version' is 2"),
        ({"scheme": "random"}, "field 'scheme' must be one of"),
        ({"seed": "zero"}, "field 'seed' must be an integer"),
        ({"scheme": "dirichlet"}, "field 'alpha' is required"),
        ({"alpha": -1}, "field 'alpha' must be a positive number"),
        ({"clients": []}, "field 'clients' must be a non-empty list"),
        ({"clients": [["a"], "b"]}, r"field 'clients\[1\]' must be a list"),
        ({"clients": [["a"], [3]]}, r"field 'clients\[1\]\[0\]' must be a string"),
        ({"clients": [["a"], ["a"]]}, r"field 'clients\[1\]' repeats utterance 'a', already in client 0"),
        ({"num_clients": 3}, "field 'num_clients' is 3"),
        ({"split": "val"}, "field 'split' must be one of"),
        ({"manifest": None}, "field 'manifest' must be a path string"),
    ],
)
def test_load_rejects_bad_fields_naming_file_and_field(tmp_path, change, message):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(_valid_document() | change))
    with pytest.raises(PartitionError, match=message) as error:
        Partition.load(path)
    assert str(path) in str(error.value)


def test_load_rejects_missing_field_bad_json_and_missing_file(tmp_path):
    path = tmp_path / "p.json"
    document = _valid_document()
    del document["clients"]
    path.write_text(json.dumps(document))
    with pytest.raises(PartitionError, match="field 'clients' is missing"):
        Partition.load(path)
    path.write_text("{not json")
    with pytest.raises(PartitionError, match="not a JSON partition file"):
        Partition.load(path)
    path.write_text("[1, 2]")
    with pytest.raises(PartitionError, match="expected a JSON object"):
        Partition.load(path)
    with pytest.raises(PartitionError, match="partition file not found"):
        Partition.load(tmp_path / "absent.json")


# ------------------------------------------------------------------ using a partition


def test_client_utterances_returns_rows_and_checks_ids():
    utts = make_utts()
    partition = partition_by_speaker(utts, 3, seed=0, manifest="/data/m.tsv")
    rows = client_utterances(partition, utts, 1)
    assert [u.id for u in rows] == partition.clients[1]
    assert client_utterances(partition, utts, "2") == client_utterances(partition, utts, 2)  # node-config strings
    with pytest.raises(PartitionError, match=r"client id 3 out of range.*3 clients \(ids 0-2\)"):
        client_utterances(partition, utts, 3)
    with pytest.raises(PartitionError, match="out of range"):
        client_utterances(partition, utts, -1)
    with pytest.raises(PartitionError, match="must be an integer"):
        client_utterances(partition, utts, "first")
    missing_one = [u for u in utts if u.id != partition.clients[0][0]]
    with pytest.raises(PartitionError, match=r"1 of client 0's .* not in the manifest.*/data/m.tsv"):
        client_utterances(partition, missing_one, 0)


def test_client_summary_counts_and_table():
    utts = make_utts()
    partition = partition_by_speaker(utts, 4, seed=0)
    rows = client_summary(partition, utts)
    assert [row["client"] for row in rows] == [0, 1, 2, 3]
    train = [u for u in utts if u.split == "train"]
    assert sum(row["utterances"] for row in rows) == len(train)
    assert sum(row["speakers"] for row in rows) == len({u.speaker for u in train})
    assert sum(row["seconds"] for row in rows) == pytest.approx(sum(u.duration for u in train))
    assert all(row["hours"] == pytest.approx(row["seconds"] / 3600) for row in rows)
    assert sum((Counter(row["labels"]) for row in rows), Counter()) == Counter(u.label for u in train)
    first = list(rows[0]["labels"].values())
    assert first == sorted(first, reverse=True)

    from rich.console import Console

    console = Console(file=io.StringIO(), width=200)
    console.print(summary_table(rows, top_labels=2, title="demo"))
    text = console.file.getvalue()
    assert "demo" in text and "speakers" in text and "more)" in text
    top_label, top_count = next(iter(rows[0]["labels"].items()))
    assert f"{top_label}:{top_count}" in text


# ------------------------------------------------------------------ client sampling


def test_sample_clients_properties():
    first = sample_clients(100, 20, server_round=1, seed=0)
    assert len(first) == 20 == len(set(first))
    assert all(0 <= c < 100 for c in first) and first == sorted(first)
    assert sample_clients(100, 20, server_round=1, seed=0) == first
    assert sample_clients(100, 20, server_round=2, seed=0) != first
    assert sample_clients(100, 20, server_round=1, seed=1) != first
    seen = set().union(*(sample_clients(100, 20, r, seed=0) for r in range(1, 60)))
    assert seen == set(range(100))
    assert sample_clients(10, 10, server_round=5, seed=3) == list(range(10))


def test_sample_clients_rejects_bad_counts():
    with pytest.raises(PartitionError, match="between 1 and 10"):
        sample_clients(10, 11, 1, 0)
    with pytest.raises(PartitionError, match="between 1 and 10"):
        sample_clients(10, 0, 1, 0)
    with pytest.raises(PartitionError, match="non-negative"):
        sample_clients(10, 3, 1, -1)
