"""Shared fixtures: a small built-in corpus (espeak-ng), made once per test session."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory) -> Path:
    """Manifest of a 6-speaker corpus (4 train, 1 dev, 1 test speakers)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed (scripts/setup.sh installs it)")
    from fedspeech.data.synth import build_corpus

    return build_corpus(
        tmp_path_factory.mktemp("corpus"), speakers=6, seed=0, keywords_per_speaker=12, sentences_per_speaker=3
    )


@pytest.fixture(autouse=True, scope="session")
def _one_torch_thread():
    """Tiny models gain nothing from a second thread, and OpenMP spinning makes them many
    times slower when the two cores are shared (CI machines, parallel jobs)."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture(scope="session")
def speaker_partition(small_corpus, tmp_path_factory):
    """``speaker_partition(n)``: path of a saved speaker partition of ``small_corpus`` into
    ``n`` clients (made once per ``n``)."""
    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import make_partition

    made: dict[int, Path] = {}

    def partition(num_clients: int) -> Path:
        if num_clients not in made:
            part = make_partition(
                read_manifest(small_corpus), "speaker", num_clients, seed=0, manifest=str(small_corpus)
            )
            made[num_clients] = part.save(tmp_path_factory.mktemp(f"partition{num_clients}") / "partition.json")
        return made[num_clients]

    return partition
