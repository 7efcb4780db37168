"""One manifest format for every corpus.

A manifest is a UTF-8 TSV file with a header row and one utterance per row. Every reader
(built-in corpus, Common Voice, LibriSpeech, Speech Commands) produces it, and every later
job (partitioning, pretraining, fine-tuning, probes) reads only it, so corpora stay
interchangeable. TSV rather than JSON lines because users open it in a spreadsheet and
``cut``/``awk`` it; transcripts never contain tabs (readers replace them).

Audio paths are stored relative to the manifest's folder when the audio lies below it,
absolute otherwise, so a corpus folder can be moved as a whole.
"""

from __future__ import annotations

import csv
import dataclasses
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REQUIRED_COLUMNS = ("id", "path", "duration", "sample_rate", "speaker", "transcript", "label", "split")
SPLITS = ("train", "dev", "test")
# Plain TSV: no quoting, so a transcript with quotes round-trips unchanged.
_TSV: dict[str, Any] = {"delimiter": "\t", "quoting": csv.QUOTE_NONE, "quotechar": None}


class ManifestError(ValueError):
    """A manifest that cannot be read; the message names the file and the field."""


@dataclass(frozen=True)
class Utterance:
    """One audio file and what is known about it.

    ``transcript`` is empty for unlabelled or keyword audio; ``label`` is empty for
    sentence audio. ``path`` is absolute once read from a manifest.
    """

    id: str
    path: str
    duration: float
    sample_rate: int
    speaker: str
    transcript: str = ""
    label: str = ""
    split: str = "train"


def _to_row(utt: Utterance, root: Path) -> dict[str, str]:
    path = Path(utt.path)
    try:
        stored = str(path.resolve().relative_to(root.resolve()))
    except ValueError:
        stored = str(path.resolve())
    row = {f.name: str(getattr(utt, f.name)) for f in dataclasses.fields(Utterance)}
    row["path"] = stored
    row["duration"] = f"{utt.duration:.4f}"
    row["transcript"] = " ".join(utt.transcript.split())  # no tabs or newlines in TSV
    return row


def write_manifest(utterances: Iterable[Utterance], path: str | Path) -> Path:
    """Write ``utterances`` to ``path`` (TSV), creating parent folders."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=REQUIRED_COLUMNS, **_TSV, lineterminator="\n")
        writer.writeheader()
        for utt in utterances:
            writer.writerow(_to_row(utt, path.parent))
    return path


def _parse(row: dict[str, str], path: Path, line: int) -> Utterance:
    def number(column: str, kind: type) -> float | int:
        try:
            return kind(row[column])
        except (TypeError, ValueError):
            raise ManifestError(f"{path}:{line}: column '{column}' must be a number, got {row[column]!r}") from None

    audio = Path(row["path"])
    if not audio.is_absolute():
        audio = path.parent / audio
    split = row["split"] or "train"
    if split not in SPLITS:
        raise ManifestError(f"{path}:{line}: column 'split' must be one of {SPLITS}, got {split!r}")
    if not row["id"]:
        raise ManifestError(f"{path}:{line}: column 'id' is empty")
    return Utterance(
        id=row["id"],
        path=str(audio),
        duration=float(number("duration", float)),
        sample_rate=int(number("sample_rate", int)),
        speaker=row["speaker"],
        transcript=row["transcript"] or "",
        label=row["label"] or "",
        split=split,
    )


def read_manifest(path: str | Path) -> list[Utterance]:
    """Read a manifest; fail with the file and column named if a column is missing."""
    path = Path(path)
    if not path.is_file():
        raise ManifestError(f"{path}: manifest not found")
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, **_TSV)
        header = reader.fieldnames or []
        missing = [c for c in REQUIRED_COLUMNS if c not in header]
        if missing:
            raise ManifestError(f"{path}: missing required column(s) {', '.join(missing)} (header: {header})")
        utterances = [_parse(row, path, i) for i, row in enumerate(reader, start=2)]
    seen: set[str] = set()
    for utt in utterances:
        if utt.id in seen:
            raise ManifestError(f"{path}: duplicate id {utt.id!r}")
        seen.add(utt.id)
    return utterances
