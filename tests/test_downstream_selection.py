"""BestRoundTracker bookkeeping and the task data splits."""

from __future__ import annotations

import json
import math

import pytest
from rich.console import Console

from fedspeech.data.manifest import Utterance
from fedspeech.downstream.selection import HIGHER, LOWER, BestRoundTracker, best_checkpoint_dir, is_better
from fedspeech.downstream.tasks import asr_utterances, probe_sets, speaker_id_split, task_data


def test_is_better_directions_ties_and_nan():
    assert is_better(HIGHER, 0.6, 0.5) and not is_better(HIGHER, 0.5, 0.5)
    assert is_better(LOWER, 0.4, 0.5) and not is_better(LOWER, 0.5, 0.5)
    assert is_better(LOWER, 9.0, None)
    assert not is_better(HIGHER, math.nan, None)
    with pytest.raises(ValueError):
        is_better("up", 1.0, 0.0)


def test_tracker_keeps_best_round_per_task():
    tracker = BestRoundTracker({"kws": HIGHER, "asr": LOWER})
    assert tracker.update(1, {"kws": 0.50, "asr": 0.80}) == ["kws", "asr"]
    assert tracker.update(2, {"kws": 0.50, "asr": 0.90}) == []  # tie keeps round 1; CER got worse
    assert tracker.update(3, {"kws": 0.40, "asr": 0.70}) == ["asr"]
    assert tracker.update(4, {"kws": 0.65}) == ["kws"]  # a round may score a subset of tasks
    assert tracker.update(5, {"kws": math.nan, "asr": math.nan}) == []
    assert tracker.best == {"kws": (4, 0.65), "asr": (3, 0.70)}
    rows = {row["task"]: row for row in tracker.summary()}
    assert rows["asr"]["best_round"] == 3 and rows["asr"]["last_score"] != rows["asr"]["last_score"]  # NaN last
    with pytest.raises(ValueError, match="not after the last recorded round 5"):
        tracker.update(5, {"kws": 0.9})
    with pytest.raises(ValueError, match="unknown task"):
        tracker.update(6, {"speaker": 0.9})


def test_tracker_resume_from_json(tmp_path):
    tracker = BestRoundTracker({"kws": HIGHER, "asr": LOWER})
    tracker.update(1, {"kws": 0.5, "asr": 0.8})
    tracker.update(2, {"kws": 0.7, "asr": 0.9})
    path = tracker.save(tmp_path / "sub" / "best_rounds.json")
    assert json.loads(path.read_text())["best"]["kws"] == {"round": 2, "score": 0.7}
    resumed = BestRoundTracker.load(path)
    assert resumed.best == tracker.best and resumed.last_round == 2
    assert resumed.update(3, {"kws": 0.6, "asr": 0.75}) == ["asr"]
    # Resuming from round 1's checkpoint forgets what rounds 2-3 recorded.
    resumed.discard_after(1)
    assert resumed.best == {"kws": (1, 0.5), "asr": (1, 0.8)} and resumed.last_round == 1
    assert resumed.update(2, {"kws": 0.55}) == ["kws"]


def test_tracker_load_errors_and_table(tmp_path):
    with pytest.raises(FileNotFoundError, match="best-round file not found"):
        BestRoundTracker.load(tmp_path / "none.json")
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(ValueError, match="not a best-round file"):
        BestRoundTracker.load(tmp_path / "bad.json")
    tracker = BestRoundTracker({"speaker": HIGHER})
    tracker.update(7, {"speaker": 0.25})
    console = Console(record=True, width=100)
    console.print(tracker.summary_table())
    text = console.export_text()
    assert "speaker" in text and "0.2500" in text and "higher" in text
    assert best_checkpoint_dir(tmp_path, "kws") == tmp_path / "best" / "kws"


def u(i: int, speaker: str, split: str = "train", transcript: str = "", label: str = "") -> Utterance:
    return Utterance(f"{speaker}_{i}", f"/x/{speaker}_{i}.wav", 1.0, 16000, speaker, transcript, label, split)


def test_speaker_id_split_shares_speakers_and_is_seeded():
    utts = [u(i, s) for s in ("a", "b", "c") for i in range(10)] + [u(0, "lonely")]
    train, test = speaker_id_split(utts, test_fraction=0.2, seed=3)
    assert {x.speaker for x in train} == {x.speaker for x in test} == {"a", "b", "c"}
    assert len(test) == 6 and len(train) == 24 and not {x.id for x in train} & {x.id for x in test}
    again, _ = speaker_id_split(list(reversed(utts)), test_fraction=0.2, seed=3)
    assert [x.id for x in again] == [x.id for x in train]  # independent of input order


def test_task_data_uses_manifest_splits_and_sentences_for_asr():
    utts = [
        u(0, "a", "train", "yes", "yes"),
        u(1, "a", "train", "the cat sat"),
        u(2, "b", "test", "go", "go"),
        u(3, "b", "test", "a dog"),
        u(4, "c", "dev", "a bird"),
    ]
    assert [x.id for x in asr_utterances(utts)] == ["a_1", "b_3", "c_4"]  # keyword clips are not ASR data
    asr = task_data(utts, "asr")
    assert ([x.id for x in asr.train], [x.id for x in asr.test], [x.id for x in asr.dev]) == (["a_1"], ["b_3"], ["c_4"])
    kws = task_data(utts, "kws")
    assert [x.id for x in kws.train] == ["a_0"] and [x.id for x in kws.test] == ["b_2"] and kws.dev == []
    with pytest.raises(ValueError, match="no keyword-labelled utterances for train"):
        task_data([u(2, "b", "test", "go", "go")], "kws")


def test_probe_sets_never_use_test_split():
    utts = [
        u(i, s, split, "word", lab)
        for split, speakers in (("train", "abcd"), ("dev", "e"), ("test", "f"))
        for s in speakers
        for i, lab in enumerate(["yes", "no", "yes", "no", "", "", ""])
    ]
    utts = [x if x.label else Utterance(x.id, x.path, 1.0, 16000, x.speaker, "a sentence", "", x.split) for x in utts]
    sets = probe_sets(utts, kws_per_label=(1, 1), speakers=3, speaker_per_speaker=(2, 1), asr_counts=(2, 2))
    assert set(sets) == {"kws", "speaker", "asr"}
    for train, evaluation in sets.values():
        assert all(x.split != "test" for x in [*train, *evaluation])
    kws_train, kws_eval = sets["kws"]
    assert sorted(x.label for x in kws_train) == ["no", "yes"] and {x.split for x in kws_eval} == {"dev"}
    spk_train, spk_eval = sets["speaker"]
    assert len({x.speaker for x in spk_train}) == 3 and len(spk_train) == 6 and len(spk_eval) == 3
    assert {x.speaker for x in spk_eval} == {x.speaker for x in spk_train}
