"""Corpus readers on tiny copies of each corpus's native layout."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from fedspeech.data.manifest import ManifestError, read_manifest, write_manifest
from fedspeech.data.readers import READERS, read_common_voice, read_librispeech, read_speech_commands


def tone(path: Path, seconds: float, sr: int) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    t = np.arange(int(seconds * sr)) / sr
    sf.write(str(path), (0.3 * np.sin(2 * np.pi * 300 * t)).astype(np.float32), sr)
    return path


def by_id(utterances):
    return {u.id: u for u in utterances}


# --- Common Voice -------------------------------------------------------------------

# Columns of a recent Common Voice release; the reader must ignore all but three.
CV_HEADER = "\t".join(
    [
        "client_id",
        "path",
        "sentence_id",
        "sentence",
        "sentence_domain",
        "up_votes",
        "down_votes",
        "age",
        "gender",
        "accents",
        "locale",
    ]
)


def cv_row(client: str, clip: str, sentence: str) -> str:
    return f"{client}\t{clip}\tsid\t{sentence}\t\t2\t0\t\t\t\ten"


@pytest.fixture
def common_voice(tmp_path: Path) -> Path:
    root = tmp_path / "cv-corpus" / "en"
    tone(root / "clips" / "common_voice_en_1.mp3", 1.0, 48000)
    tone(root / "clips" / "common_voice_en_2.mp3", 2.0, 48000)
    tone(root / "clips" / "common_voice_en_3.mp3", 1.5, 32000)
    (root / "train.tsv").write_text(
        "\n".join(
            [
                CV_HEADER,
                cv_row("spkA", "common_voice_en_1.mp3", 'He said "hi".'),
                cv_row("spkB", "common_voice_en_2.mp3", "Second one"),
                cv_row("spkB", "common_voice_en_404.mp3", "missing clip"),
            ]
        )
        + "\n",
        encoding="utf-8",
    )
    (root / "dev.tsv").write_text("\n".join([CV_HEADER, cv_row("spkC", "common_voice_en_3.mp3", "Third")]) + "\n")
    (root / "test.tsv").write_text(CV_HEADER + "\n")
    return root


def test_common_voice(common_voice: Path, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING):
        utts = by_id(read_common_voice(common_voice))
    assert set(utts) == {"common_voice_en_1", "common_voice_en_2", "common_voice_en_3"}
    first = utts["common_voice_en_1"]
    assert first.speaker == "spkA" and first.transcript == 'He said "hi".' and first.split == "train"
    assert Path(first.path).is_absolute() and Path(first.path).is_file()
    assert first.sample_rate == 48000 and first.duration == pytest.approx(1.0, abs=0.05)
    third = utts["common_voice_en_3"]
    assert third.split == "dev" and third.sample_rate == 32000 and third.duration == pytest.approx(1.5, abs=0.05)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "common_voice_en_404.mp3" in warnings[0] and "not found" in warnings[0]


def test_common_voice_validated_only_is_train(common_voice: Path) -> None:
    for name in ("train", "dev", "test"):
        (common_voice / f"{name}.tsv").unlink()
    (common_voice / "validated.tsv").write_text(CV_HEADER + "\n" + cv_row("spkA", "common_voice_en_1.mp3", "x") + "\n")
    [only] = read_common_voice(common_voice)
    assert only.id == "common_voice_en_1" and only.split == "train"


def test_common_voice_missing_column_names_file_and_column(common_voice: Path) -> None:
    (common_voice / "dev.tsv").write_text("client_id\tpath\ttext\nspkC\tcommon_voice_en_3.mp3\tThird\n")
    with pytest.raises(ManifestError, match=r"dev\.tsv.*sentence"):
        read_common_voice(common_voice)


def test_common_voice_without_tsv(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="tsv"):
        read_common_voice(tmp_path)


# --- LibriSpeech --------------------------------------------------------------------


def make_librispeech_split(split_dir: Path, speaker: str, chapter: str, seconds: list[float]) -> None:
    chapter_dir = split_dir / speaker / chapter
    lines = []
    for i, length in enumerate(seconds):
        utt_id = f"{speaker}-{chapter}-{i:04d}"
        tone(chapter_dir / f"{utt_id}.flac", length, 16000)
        lines.append(f"{utt_id} WORDS OF UTTERANCE {i}")
    (chapter_dir / f"{speaker}-{chapter}.trans.txt").write_text("\n".join(lines) + "\n")


@pytest.fixture
def librispeech(tmp_path: Path) -> Path:
    root = tmp_path / "LibriSpeech"
    make_librispeech_split(root / "train-clean-100", "19", "198", [1.0, 0.5])
    make_librispeech_split(root / "train-clean-100", "26", "495", [0.75])
    make_librispeech_split(root / "dev-clean", "84", "121123", [0.25])
    make_librispeech_split(root / "test-clean", "61", "70968", [0.5])
    return root


def test_librispeech_split_folder(librispeech: Path) -> None:
    utts = by_id(read_librispeech(librispeech / "train-clean-100"))
    assert set(utts) == {"19-198-0000", "19-198-0001", "26-495-0000"}
    first = utts["19-198-0001"]
    assert first.speaker == "19" and first.split == "train" and first.transcript == "WORDS OF UTTERANCE 1"
    assert first.duration == pytest.approx(0.5) and first.sample_rate == 16000 and Path(first.path).is_file()
    assert {u.split for u in read_librispeech(librispeech / "dev-clean", split_name="test")} == {"test"}


def test_librispeech_parent_folder_maps_splits(librispeech: Path) -> None:
    utts = by_id(read_librispeech(librispeech))
    assert len(utts) == 5
    assert utts["84-121123-0000"].split == "dev" and utts["61-70968-0000"].split == "test"
    assert utts["26-495-0000"].split == "train" and utts["26-495-0000"].speaker == "26"


def test_librispeech_skips_unreadable_with_one_warning(librispeech: Path, caplog: pytest.LogCaptureFixture) -> None:
    broken = librispeech / "dev-clean" / "84" / "121123" / "84-121123-0000.flac"
    broken.write_bytes(b"not flac at all" * 10)
    (librispeech / "train-clean-100" / "19" / "198" / "19-198-0000.flac").unlink()
    with caplog.at_level(logging.WARNING):
        utts = read_librispeech(librispeech)
    assert len(utts) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "skipped 2" in warnings[0] and str(broken) in warnings[0]


# --- Speech Commands ----------------------------------------------------------------


@pytest.fixture
def speech_commands(tmp_path: Path) -> Path:
    root = tmp_path / "speech_commands_v0.02"
    for word, name in [
        ("yes", "0a7c2a8d_nohash_0"),
        ("yes", "0a7c2a8d_nohash_1"),
        ("yes", "bbb_nohash_0"),
        ("no", "0a7c2a8d_nohash_0"),
        ("no", "ccc_nohash_0"),
    ]:
        tone(root / word / f"{name}.wav", 1.0, 16000)
    tone(root / "_background_noise_" / "white_noise.wav", 2.0, 16000)
    (root / "validation_list.txt").write_text("yes/bbb_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/ccc_nohash_0.wav\n")
    return root


def test_speech_commands(speech_commands: Path) -> None:
    utts = by_id(read_speech_commands(speech_commands))
    assert len(utts) == 5 and not any("noise" in u.path for u in utts.values())
    assert len({u.id for u in utts.values()}) == 5  # same file name under two words stays distinct
    yes = utts["yes_0a7c2a8d_nohash_1"]
    assert yes.label == "yes" and yes.speaker == "0a7c2a8d" and yes.split == "train" and yes.transcript == ""
    assert yes.duration == pytest.approx(1.0) and yes.sample_rate == 16000
    assert utts["yes_bbb_nohash_0"].split == "dev" and utts["no_ccc_nohash_0"].split == "test"
    assert utts["no_0a7c2a8d_nohash_0"].label == "no"


def test_readers_table_and_manifest_round_trip(speech_commands: Path, tmp_path: Path) -> None:
    assert READERS["speech_commands"] is read_speech_commands
    assert set(READERS) == {"common_voice", "librispeech", "speech_commands"}
    utts = read_speech_commands(speech_commands)
    assert read_manifest(write_manifest(utts, tmp_path / "m.tsv")) == utts
