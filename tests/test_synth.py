"""The espeak-ng corpus: layout, labels, speaker-disjoint splits, audio format, determinism."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedspeech.data import synth
from fedspeech.data.manifest import read_manifest

needs_espeak = pytest.mark.skipif(shutil.which("espeak-ng") is None, reason="espeak-ng not installed")

SPEAKERS = 4
SEED = 7
COUNTS = {"keywords_per_speaker": 12, "sentences_per_speaker": 2}  # one keyword round + 2 unknown


def _build(path: Path, seed: int = SEED) -> Path:
    return synth.build_corpus(path, speakers=SPEAKERS, seed=seed, jobs=2, **COUNTS)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build(tmp_path_factory.mktemp("synth") / "corpus").parent


@pytest.fixture(scope="module")
def utterances(corpus: Path):
    return read_manifest(corpus / "manifest.tsv")


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_vocabularies_fit_a_character_alphabet():
    assert len(synth.KEYWORDS) >= 10 and len(set(synth.KEYWORDS)) == len(synth.KEYWORDS)
    assert not set(synth.KEYWORDS) & set(synth.UNKNOWN_WORDS)
    assert 60 <= len(synth.SENTENCES) <= 150 and len(set(synth.SENTENCES)) == len(synth.SENTENCES)
    for text in synth.SENTENCES + synth.KEYWORDS + synth.UNKNOWN_WORDS:
        assert re.fullmatch(r"[a-z']+( [a-z']+)*", text), text
    assert len({w for s in synth.SENTENCES for w in s.split()}) > 300  # varied vocabulary


def test_speaker_voices_distinct_and_deterministic():
    voices = synth.speaker_voices(300, seed=1)  # past the 240 (accent, variant) pairs
    assert len(set(voices)) == 300
    assert len({(v.voice, v.variant) for v in voices[:240]}) == 240
    assert {v.voice for v in voices[:8]} == set(synth.ACCENTS)  # accents dealt evenly
    assert voices == synth.speaker_voices(300, seed=1)
    assert synth.speaker_voices(40, seed=2) != voices[:40]
    for v in voices:
        assert 0 <= v.pitch <= 99 and 80 <= v.speed <= 450 and 0 <= v.amplitude <= 200
        assert v.noise_db is None or v.noise_db < -30
    assert any(v.noise_db is None for v in voices) and any(v.noise_db is not None for v in voices)
    with pytest.raises(ValueError, match="at least 1"):
        synth.speaker_voices(0, seed=1)
    with pytest.raises(ValueError, match="seed"):
        synth.speaker_voices(3, seed=-1)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 10, 40, 41])
def test_speaker_splits_are_speaker_level(n):
    names = [f"s{i}" for i in range(n)]
    splits = synth.speaker_splits(names, seed=3)
    counts = {s: list(splits.values()).count(s) for s in ("train", "dev", "test")}
    if n >= 3:
        assert counts["dev"] >= 1 and counts["test"] >= 1 and counts["train"] >= 1
    else:
        assert counts["train"] == n
    if n == 40:
        assert counts == {"train": 32, "dev": 4, "test": 4}
    assert splits == synth.speaker_splits(names, seed=3)


@needs_espeak
def test_manifest_schema_and_labels(corpus, utterances):
    assert len(utterances) == SPEAKERS * (COUNTS["keywords_per_speaker"] + COUNTS["sentences_per_speaker"])
    assert len({u.speaker for u in utterances}) == SPEAKERS
    keyword_utts = [u for u in utterances if u.label]
    sentence_utts = [u for u in utterances if not u.label]
    assert {u.label for u in keyword_utts} == set(synth.KEYWORDS) | {synth.UNKNOWN_LABEL}
    for u in keyword_utts:
        if u.label == synth.UNKNOWN_LABEL:
            assert u.transcript in synth.UNKNOWN_WORDS
        else:
            assert u.transcript == u.label
    assert len(sentence_utts) == SPEAKERS * COUNTS["sentences_per_speaker"]
    assert all(u.transcript in synth.SENTENCES for u in sentence_utts)
    for u in utterances:
        assert Path(u.path).is_file() and Path(u.path).parent == corpus / "audio" / u.speaker
        assert u.sample_rate == synth.SAMPLE_RATE and u.id in u.path
    # Each speaker says every keyword once (12 = one round of 10 + two unknown words).
    for speaker in {u.speaker for u in utterances}:
        said = {u.label for u in keyword_utts if u.speaker == speaker}
        assert said >= set(synth.KEYWORDS)


@needs_espeak
def test_audio_is_16k_mono_and_speech(utterances):
    for u in utterances:
        audio, rate = sf.read(u.path, dtype="float32")
        info = sf.info(u.path)
        assert rate == 16_000 and audio.ndim == 1 and info.subtype == "PCM_16" and info.format == "WAV"
        assert abs(len(audio) / rate - u.duration) < 1e-3
        assert 0.3 < u.duration < 8.0
        peak = np.abs(audio).max()
        assert 0.8 < peak <= 1.0
        # Padding at the edges is near silence; the middle carries the energy.
        edge = int(0.05 * rate)
        assert np.abs(audio[:edge]).max() < 0.05 and np.abs(audio[-edge:]).max() < 0.05
        assert np.sqrt(np.mean(audio**2)) > 0.02


@needs_espeak
def test_speakers_file_splits_and_voices(corpus, utterances):
    rows = [line.split("\t") for line in (corpus / "speakers.tsv").read_text().splitlines()]
    header, rows = rows[0], rows[1:]
    assert header == ["speaker", "voice", "variant", "pitch", "speed", "amplitude", "noise_db", "split"]
    assert len(rows) == SPEAKERS
    assert len({tuple(r[1:7]) for r in rows}) == SPEAKERS  # distinct voices
    split_of = {r[0]: r[-1] for r in rows}
    assert sorted(split_of.values()).count("dev") >= 1 and sorted(split_of.values()).count("test") >= 1
    per_split: dict[str, set[str]] = {}
    for u in utterances:
        assert u.split == split_of[u.speaker]
        per_split.setdefault(u.split, set()).add(u.speaker)
    assert set(per_split) == {"train", "dev", "test"}
    assert not (per_split["train"] & per_split["dev"] or per_split["train"] & per_split["test"])
    assert not per_split["dev"] & per_split["test"]


@needs_espeak
def test_speakers_sound_different(utterances):
    """The same word from two speakers must differ as audio, not just in speakers.tsv
    (espeak-ng can silently ignore a voice variant)."""
    yes = {u.speaker: sf.read(u.path, dtype="int16")[0] for u in utterances if u.label == "yes"}
    clips = list(yes.values())
    for i in range(len(clips)):
        for j in range(i + 1, len(clips)):
            assert len(clips[i]) != len(clips[j]) or not np.array_equal(clips[i], clips[j])


@needs_espeak
def test_corpus_json(corpus, utterances):
    info = json.loads((corpus / "corpus.json").read_text())
    assert info["seed"] == SEED and info["speakers"] == SPEAKERS
    assert info["utterances"] == len(utterances)
    assert sum(info["utterances_per_split"].values()) == len(utterances)
    assert info["espeak_ng"].startswith("eSpeak NG")


@needs_espeak
def test_same_seed_is_byte_identical_and_other_seed_differs(corpus, tmp_path):
    again = _build(tmp_path / "again").parent
    assert _files(again) == _files(corpus)
    other = _files(_build(tmp_path / "other", seed=SEED + 1).parent)
    assert other["speakers.tsv"] != _files(corpus)["speakers.tsv"]
    reference = _files(corpus)
    reference_audio = {data for name, data in reference.items() if name.endswith(".wav")}
    assert not reference_audio & {data for name, data in other.items() if name.endswith(".wav")}


@needs_espeak
def test_rebuild_replaces_stale_audio_but_refuses_foreign_folders(tmp_path):
    out = tmp_path / "c"
    synth.build_corpus(out, speakers=2, seed=0, keywords_per_speaker=1, sentences_per_speaker=0, jobs=1)
    synth.build_corpus(out, speakers=1, seed=0, keywords_per_speaker=1, sentences_per_speaker=0, jobs=1)
    assert [p.name for p in (out / "audio").iterdir()] == ["spk000"]
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(ValueError, match="not empty"):
        synth.build_corpus(foreign, speakers=1, seed=0, keywords_per_speaker=1, sentences_per_speaker=0)
    assert (foreign / "notes.txt").read_text() == "keep me"


@needs_espeak
def test_bad_counts_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="nothing to synthesise"):
        synth.build_corpus(tmp_path / "x", speakers=1, seed=0, keywords_per_speaker=0, sentences_per_speaker=0)
    with pytest.raises(ValueError, match="jobs"):
        synth.build_corpus(tmp_path / "x", speakers=1, seed=0, jobs=0)


def test_missing_espeak_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no espeak-ng here
    with pytest.raises(FileNotFoundError, match="espeak-ng") as err:
        synth.build_corpus(tmp_path / "out", speakers=2, seed=0)
    assert "apt-get install espeak-ng" in str(err.value)
    assert not (tmp_path / "out").exists()  # fails before writing anything


@needs_espeak
def test_every_accent_and_variant_changes_the_sound():
    """Guards the voice tables: espeak-ng 1.51 silently ignores "+variant" on some names
    (e.g. "en-gb+f2" sounds like "en-gb"), which would collapse speakers into one."""

    def say(name: str) -> bytes:
        cmd = [shutil.which("espeak-ng"), "-v", name, "--stdout"]
        return subprocess.run(cmd, input=b"hello there", capture_output=True, check=True).stdout

    plain = {accent: say(accent) for accent in synth.ACCENTS}
    assert len(set(plain.values())) == len(synth.ACCENTS)
    for accent in synth.ACCENTS:
        assert say(f"{accent}+{synth.VARIANTS[0]}") != plain[accent], accent
    variants = {say(f"en-us+{variant}") for variant in synth.VARIANTS}
    assert len(variants) == len(synth.VARIANTS)


def test_speech_commands_layout_corpus_imports_with_unseen_voices_and_noise(tmp_path):
    """The unseen-voice test corpus: the Speech Commands reader takes it as it is, whole
    speakers are in one split, the voices are none of the built-in corpus's accents, and
    every clip is one second with background noise (no digital silence)."""
    if shutil.which("espeak-ng") is None:
        pytest.skip("espeak-ng is not installed")
    from fedspeech.data.readers import read_speech_commands

    root = synth.build_speech_commands_like(tmp_path / "sc", speakers=10, seed=1, repeats=1, jobs=1)
    utts = read_speech_commands(root)
    assert len(utts) == 10 * (len(synth.KEYWORDS) + len(synth.UNKNOWN_WORDS))
    assert {u.label for u in utts} == set(synth.KEYWORDS) | set(synth.UNKNOWN_WORDS)
    split_of = {}
    for u in utts:
        assert split_of.setdefault(u.speaker, u.split) == u.split
    assert sorted(set(split_of.values())) == ["dev", "test", "train"]
    info = json.loads((root / "corpus.json").read_text())
    assert not set(info["accents"]) & set(synth.ACCENTS)
    audio, rate = sf.read(utts[0].path)
    assert rate == 16000 and len(audio) == 16000
    assert np.min(np.abs(audio[:800])) > 0 or np.std(audio[:800]) > 1e-4  # noise, not zeros, around the word
    again = synth.build_speech_commands_like(tmp_path / "sc2", speakers=10, seed=1, repeats=1, jobs=2)
    assert (again / "testing_list.txt").read_text() == (root / "testing_list.txt").read_text()
    assert sf.read(again / utts[0].path.split("/sc/")[1])[0].tolist() == audio.tolist()  # deterministic
