"""Which utterances each downstream task uses, and how they are split.

- ``asr``: sentence utterances: a (non-empty after normalisation) transcript and no
  keyword label. Keyword clips carry their word as transcript too, but mixing hundreds of
  one-word clips into ASR would turn it into isolated-word recognition.
- ``kws``: utterances with a keyword ``label`` (the synthetic corpus labels non-keywords
  ``_unknown_``, which is just one more class).
- ``speaker``: identification needs the *same* speakers in training and test, while the
  manifest's splits are speaker-disjoint; so every speaker's own utterances are divided
  between train and test instead.

All choices are seeded and independent of input order, so a run can be repeated.
"""

from __future__ import annotations

import hashlib
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from fedspeech.data.manifest import Utterance
from fedspeech.downstream.text import normalize_transcript

TASKS = ("asr", "kws", "speaker")


def asr_utterances(utterances: Sequence[Utterance]) -> list[Utterance]:
    return [u for u in utterances if not u.label and normalize_transcript(u.transcript)]


def kws_utterances(utterances: Sequence[Utterance]) -> list[Utterance]:
    return [u for u in utterances if u.label]


def in_split(utterances: Sequence[Utterance], split: str) -> list[Utterance]:
    return [u for u in utterances if u.split == split]


def _ordered(utterances: Sequence[Utterance], seed: int | Sequence[int]) -> list[Utterance]:
    """Seeded shuffle that does not depend on the input order (sort by id first)."""
    items = sorted(utterances, key=lambda u: u.id)
    order = np.random.default_rng(seed).permutation(len(items))
    return [items[i] for i in order]


def _group(utterances: Sequence[Utterance], field: str) -> dict[str, list[Utterance]]:
    groups: dict[str, list[Utterance]] = defaultdict(list)
    for utt in utterances:
        groups[getattr(utt, field)].append(utt)
    return dict(sorted(groups.items()))


def _group_seed(seed: int, name: str) -> list[int]:
    return [seed, int.from_bytes(hashlib.sha256(name.encode()).digest()[:4], "little")]


def take_per_class(utterances: Sequence[Utterance], field: str, count: int, seed: int) -> list[Utterance]:
    """At most ``count`` utterances of every value of ``field`` (seeded choice)."""
    chosen = []
    for name, group in _group(utterances, field).items():
        chosen.extend(_ordered(group, _group_seed(seed, name))[:count])
    return chosen


def speaker_id_split(
    utterances: Sequence[Utterance], test_fraction: float = 0.2, seed: int = 0
) -> tuple[list[Utterance], list[Utterance]]:
    """Per speaker, ``test_fraction`` of their utterances (at least one) go to test and
    the rest (at least one) to train; speakers with a single utterance are left out."""
    if not 0 < test_fraction < 1:
        raise ValueError(f"test_fraction must be between 0 and 1, got {test_fraction}")
    train, test = [], []
    for name, group in _group(utterances, "speaker").items():
        if len(group) < 2:
            continue
        group = _ordered(group, _group_seed(seed, name))
        n_test = min(len(group) - 1, max(1, round(len(group) * test_fraction)))
        test.extend(group[:n_test])
        train.extend(group[n_test:])
    return train, test


@dataclass
class TaskData:
    train: list[Utterance]
    test: list[Utterance]
    dev: list[Utterance]


def task_data(
    utterances: Sequence[Utterance], task: str, *, seed: int = 0, speaker_test_fraction: float = 0.2
) -> TaskData:
    """Centralised fine-tuning data: manifest train split → train, test split → test,
    dev split → dev (may be empty). ``speaker`` pools all splits (see module docstring)."""
    if task == "speaker":
        train, test = speaker_id_split(utterances, speaker_test_fraction, seed)
        data = TaskData(train, test, [])
    else:
        pick = asr_utterances if task == "asr" else kws_utterances if task == "kws" else None
        if pick is None:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        usable = pick(utterances)
        data = TaskData(in_split(usable, "train"), in_split(usable, "test"), in_split(usable, "dev"))
    what = {"asr": "transcribed", "kws": "keyword-labelled", "speaker": "speaker-labelled"}[task]
    for name in ("train", "test"):
        if not getattr(data, name):
            raise ValueError(f"task {task}: no {what} utterances for {name} in the manifest")
    return data


def probe_sets(
    utterances: Sequence[Utterance],
    *,
    seed: int = 0,
    eval_split: str = "dev",
    kws_per_label: tuple[int, int] = (8, 4),
    speakers: int = 16,
    speaker_per_speaker: tuple[int, int] = (6, 3),
    asr_counts: tuple[int, int] = (32, 16),
) -> dict[str, tuple[list[Utterance], list[Utterance]]]:
    """Small labelled (train, eval) sets per task for per-round probes (docs/methods.md §4).

    Model selection must not look at test data, so kws and asr evaluate on ``eval_split``
    (dev by default) and train on the train split; speaker ID uses ``speakers`` speakers
    of the train split, with disjoint utterances for probe-train and probe-eval. Tasks
    the manifest has no data for are left out.
    """
    sets: dict[str, tuple[list[Utterance], list[Utterance]]] = {}
    kws = kws_utterances(utterances)
    kws_train = take_per_class(in_split(kws, "train"), "label", kws_per_label[0], seed)
    kws_eval = take_per_class(in_split(kws, eval_split), "label", kws_per_label[1], seed)
    if kws_train and kws_eval:
        sets["kws"] = (kws_train, kws_eval)

    by_speaker = _group(in_split(utterances, "train"), "speaker")
    n_train, n_eval = speaker_per_speaker
    eligible = [name for name, group in by_speaker.items() if len(group) >= 2]
    chosen = sorted(eligible[i] for i in np.random.default_rng([seed, 7]).permutation(len(eligible))[:speakers])
    spk_train, spk_eval = [], []
    for name in chosen:
        group = _ordered(by_speaker[name], _group_seed(seed, name))
        n_test = min(n_eval, len(group) // 2)
        spk_eval.extend(group[:n_test])
        spk_train.extend(group[n_test : n_test + n_train])
    if len(chosen) >= 2:
        sets["speaker"] = (spk_train, spk_eval)

    asr = asr_utterances(utterances)
    asr_train = _ordered(in_split(asr, "train"), seed)[: asr_counts[0]]
    asr_eval = _ordered(in_split(asr, eval_split), seed)[: asr_counts[1]]
    if asr_train and asr_eval:
        sets["asr"] = (asr_train, asr_eval)
    return sets
