"""The per-round JSON-lines log of a federated run.

One line per completed round, appended after the round's checkpoint is on disk: a round is
complete once its line is written. A run killed at any point resumes from the newest
checkpoint of a logged round (``round_loop.resume_point``; pruning never deletes it), so
no completed round is lost and a half-finished one is simply run again.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

LOG_NAME = "rounds.jsonl"

log = logging.getLogger(__name__)


def log_path(out_dir: str | Path) -> Path:
    return Path(out_dir) / LOG_NAME


def append_round(out_dir: str | Path, record: dict[str, Any]) -> None:
    path = log_path(out_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, sort_keys=True) + "\n")
        f.flush()


def read_rounds(path: str | Path) -> list[dict[str, Any]]:
    """Read a round log (a file, or a run folder holding ``rounds.jsonl``).

    A torn last line (the process was killed while appending it) is not a completed round:
    it is skipped with a warning; a bad line anywhere else is an error naming the line."""
    path = Path(path)
    if path.is_dir():
        path = log_path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no round log")
    text = path.read_text(encoding="utf-8")
    lines = text.splitlines()
    rows = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as error:
            if number == len(lines) and not text.endswith("\n"):
                log.warning("%s:%d: torn last line (interrupted write) ignored", path, number)
                continue
            raise ValueError(f"{path}:{number}: not a JSON line ({error.msg})") from None
    return rows


def last_round(out_dir: str | Path) -> int:
    """The last round the log records as completed (0 without a log)."""
    path = log_path(out_dir)
    rows = read_rounds(path) if path.is_file() else []
    return max((int(r["round"]) for r in rows), default=0)


def truncate_after(out_dir: str | Path, last_round: int) -> None:
    """Keep only the lines of rounds ≤ ``last_round``."""
    path = log_path(out_dir)
    if not path.is_file():
        return
    kept = [r for r in read_rounds(path) if int(r["round"]) <= last_round]
    tmp = path.with_name(path.name + ".tmp")  # write then rename: a kill leaves the old log or the new one
    tmp.write_text("".join(json.dumps(r, sort_keys=True) + "\n" for r in kept), encoding="utf-8")
    os.replace(tmp, path)
