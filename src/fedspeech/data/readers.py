"""Readers that turn public corpora, in the layout they are downloaded in, into utterances.

Users point fedspeech at an unpacked Common Voice, LibriSpeech or Speech Commands folder
and get a manifest without reshuffling files. Durations and sample rates come from the
audio headers (cheap), so broken or missing files are found here, skipped, and reported
in one warning per corpus rather than one line each.
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Callable, Iterable
from pathlib import Path

from fedspeech.data.audio import AudioError, audio_duration
from fedspeech.data.manifest import SPLITS, ManifestError, Utterance

log = logging.getLogger(__name__)

_COMMON_VOICE_COLUMNS = ("client_id", "path", "sentence")
_MAX_LISTED = 20  # a partial download can miss thousands of clips; list a few, count all


class _Collector:
    """Builds utterances from candidate files, remembering the ones that must be skipped."""

    def __init__(self, corpus: str):
        self.corpus = corpus
        self.utterances: list[Utterance] = []
        self.skipped: list[tuple[Path, str]] = []
        self._ids: set[str] = set()

    def add(self, utt_id: str, path: Path, speaker: str, split: str, transcript: str = "", label: str = "") -> None:
        if utt_id in self._ids:
            self.skipped.append((path, f"duplicate id {utt_id!r}"))
            return
        try:
            duration, sample_rate = audio_duration(path)
        except AudioError as err:
            self.skipped.append((path, err.reason))
            return
        self._ids.add(utt_id)
        self.utterances.append(
            Utterance(
                id=utt_id,
                path=str(path.resolve()),
                duration=duration,
                sample_rate=sample_rate,
                speaker=speaker,
                transcript=" ".join(transcript.split()),
                label=label,
                split=split,
            )
        )

    def finish(self) -> list[Utterance]:
        if self.skipped:
            listed = "\n".join(f"  {path}: {reason}" for path, reason in self.skipped[:_MAX_LISTED])
            more = len(self.skipped) - _MAX_LISTED
            tail = f"\n  ... and {more} more" if more > 0 else ""
            log.warning("%s: skipped %d file(s):\n%s%s", self.corpus, len(self.skipped), listed, tail)
        return self.utterances


def _split_from_name(name: str) -> str | None:
    """Map a folder or file name such as ``train-clean-100`` or ``dev`` to a manifest split."""
    lowered = name.lower()
    return next((split for split in SPLITS if split in lowered), None)


def read_common_voice(root: str | Path, tsvs: Iterable[str] = ("train", "dev", "test")) -> list[Utterance]:
    """Common Voice: ``root/<tsv>.tsv`` listing clips in ``root/clips``.

    The split is the tsv name; if none of ``tsvs`` exists but ``validated.tsv`` does, all
    validated clips become train data (older or trimmed releases ship only that file).
    """
    root = Path(root)
    tables = [(root / f"{name}.tsv", _split_from_name(name) or "train") for name in tsvs]
    tables = [(path, split) for path, split in tables if path.is_file()]
    if not tables and (root / "validated.tsv").is_file():
        tables = [(root / "validated.tsv", "train")]
    if not tables:
        raise FileNotFoundError(f"{root}: no Common Voice tsv found (looked for {', '.join(tsvs)}, validated)")
    collector = _Collector(f"Common Voice {root}")
    for table, split in tables:
        # Common Voice writes sentences unquoted; quotes inside them are literal.
        with table.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE)
            missing = [c for c in _COMMON_VOICE_COLUMNS if c not in (reader.fieldnames or [])]
            if missing:
                raise ManifestError(f"{table}: missing required column(s) {', '.join(missing)}")
            for row in reader:
                clip = root / "clips" / row["path"]
                collector.add(clip.stem, clip, speaker=row["client_id"], split=split, transcript=row["sentence"] or "")
    return collector.finish()


def _librispeech_split_folders(root: Path) -> list[Path]:
    """``root`` itself when it holds speakers, else its subfolders that do (split folders)."""
    if any(root.glob("*/*/*.trans.txt")):
        return [root]
    folders = sorted(p for p in root.iterdir() if p.is_dir() and any(p.glob("*/*/*.trans.txt")))
    if not folders:
        raise FileNotFoundError(f"{root}: no LibriSpeech transcripts (SPEAKER/CHAPTER/*.trans.txt) found")
    return folders


def read_librispeech(root: str | Path, split_name: str | None = None) -> list[Utterance]:
    """LibriSpeech: ``SPEAKER/CHAPTER/SPEAKER-CHAPTER-UTT.flac`` with ``*.trans.txt``.

    ``root`` is a split folder (``train-clean-100``) or the folder holding several. The
    split comes from each split folder's name (train/dev/test, else train) unless
    ``split_name`` forces one. Transcripts keep the corpus's upper case.
    """
    root = Path(root)
    if split_name is not None and split_name not in SPLITS:
        raise ValueError(f"split_name must be one of {SPLITS}, got {split_name!r}")
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: LibriSpeech folder not found")
    collector = _Collector(f"LibriSpeech {root}")
    for folder in _librispeech_split_folders(root):
        split = split_name or _split_from_name(folder.name) or "train"
        for trans in sorted(folder.glob("*/*/*.trans.txt")):
            for line in trans.read_text(encoding="utf-8").splitlines():
                utt_id, _, transcript = line.strip().partition(" ")
                if utt_id:
                    speaker = utt_id.split("-")[0]
                    collector.add(utt_id, trans.parent / f"{utt_id}.flac", speaker, split, transcript=transcript)
    return collector.finish()


def _read_list(path: Path) -> set[str]:
    if not path.is_file():
        return set()
    return {line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()}


def read_speech_commands(root: str | Path) -> list[Utterance]:
    """Speech Commands: ``root/WORD/SPEAKER_nohash_N.wav``; dev/test from the corpus lists.

    Folders starting with ``_`` (``_background_noise_``) hold no keywords and are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: Speech Commands folder not found")
    dev = _read_list(root / "validation_list.txt")
    test = _read_list(root / "testing_list.txt")
    words = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("_"))
    if not words:
        raise FileNotFoundError(f"{root}: no keyword folders (WORD/*.wav) found")
    collector = _Collector(f"Speech Commands {root}")
    for word in words:
        for wav in sorted(word.glob("*.wav")):
            relative = f"{word.name}/{wav.name}"
            split = "test" if relative in test else "dev" if relative in dev else "train"
            speaker = wav.stem.split("_nohash_")[0]
            collector.add(f"{word.name}_{wav.stem}", wav, speaker, split, label=word.name)
    return collector.finish()


READERS: dict[str, Callable[..., list[Utterance]]] = {
    "common_voice": read_common_voice,
    "librispeech": read_librispeech,
    "speech_commands": read_speech_commands,
}
