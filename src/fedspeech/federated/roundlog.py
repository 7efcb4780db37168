"""The per-round JSON-lines log of a federated run.

One line per completed round, appended after the round's checkpoint is on disk, so the log
and the checkpoints always agree; on resume, lines for rounds past the last checkpoint
(written by a run that crashed between the two) are dropped.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

LOG_NAME = "rounds.jsonl"


def log_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOG_NAME


def append_round(out_dir: str | Path, record: dict[str, Any]) -> None:
    path = log_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_rounds(path: str | Path) -> list[dict[str, Any]]:
    """Read a round log (a file, or a run folder holding ``rounds.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = log_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no round log")
    rows = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return rows


def truncate_after(out_dir: str | Path, last_round: int) -> None:
    """Keep only the lines of rounds ≤ ``last_round``."""
    path = log_path(out_dir)
    if not path.is_file():
        return
    kept = [r for r in read_rounds(path) if int(r["round"]) <= last_round]
    path.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
