"""Per-task best-round bookkeeping during federated pretraining (docs/methods.md §4).

The tracker only keeps numbers; it never touches model files. ``update`` returns the tasks
whose best round just became this round, and the caller saves its checkpoint for each of
them under ``best_checkpoint_dir(out_dir, task)``. The stored state is the full score
history; the best rounds are recomputed from it, so resuming (or dropping rounds that a
crashed run recorded but never checkpointed) cannot leave a stale "best".
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path

HIGHER = "max"  # accuracy
LOWER = "min"  # error rates (CER, WER), losses
_DIRECTIONS = (HIGHER, LOWER)


def is_better(direction: str, new: float, old: float | None) -> bool:
    """Strictly better (ties keep the earlier result); NaN is never better."""
    if direction not in _DIRECTIONS:
        raise ValueError(f"direction must be {HIGHER!r} or {LOWER!r}, got {direction!r}")
    if new is None or math.isnan(new):
        return False
    if old is None:
        return True
    return new > old if direction == HIGHER else new < old


def best_checkpoint_dir(out_dir: str | Path, task: str) -> Path:
    return Path(out_dir) / "best" / task


class BestRoundTracker:
    def __init__(self, directions: Mapping[str, str]):
        for task, direction in directions.items():
            if direction not in _DIRECTIONS:
                raise ValueError(f"task {task!r}: direction must be {HIGHER!r} or {LOWER!r}, got {direction!r}")
        self.directions = dict(directions)
        self.history: list[tuple[int, dict[str, float]]] = []
        self.best: dict[str, tuple[int, float]] = {}

    @property
    def last_round(self) -> int | None:
        return self.history[-1][0] if self.history else None

    def update(self, server_round: int, scores: Mapping[str, float]) -> list[str]:
        """Record one round's scores; return the tasks for which it is the new best."""
        unknown = sorted(set(scores) - set(self.directions))
        if unknown:
            raise ValueError(
                f"round {server_round}: scores for unknown task(s) {unknown}; known: {sorted(self.directions)}"
            )
        if self.last_round is not None and server_round <= self.last_round:
            raise ValueError(
                f"round {server_round} is not after the last recorded round {self.last_round}"
                " (call discard_after() when resuming from an earlier checkpoint)"
            )
        scores = {task: float(value) for task, value in scores.items()}
        self.history.append((int(server_round), scores))
        improved = []
        for task, value in scores.items():
            old = self.best.get(task)
            if is_better(self.directions[task], value, None if old is None else old[1]):
                self.best[task] = (int(server_round), value)
                improved.append(task)
        return improved

    def discard_after(self, server_round: int) -> None:
        """Forget rounds after ``server_round`` (resume from that round's checkpoint)."""
        history = [(r, s) for r, s in self.history if r <= server_round]
        self.history, self.best = [], {}
        for r, s in history:
            self.update(r, s)

    # -- persistence ------------------------------------------------------------------------

    def to_dict(self) -> dict:
        return {
            "directions": self.directions,
            "history": [{"round": r, "scores": s} for r, s in self.history],
            "best": {task: {"round": r, "score": v} for task, (r, v) in self.best.items()},  # for humans
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> BestRoundTracker:
        tracker = cls(data["directions"])
        for entry in data.get("history", []):
            tracker.update(int(entry["round"]), entry["scores"])
        return tracker

    def save(self, path: str | Path) -> Path:
        """Write JSON atomically (temp file + rename), so a crash never leaves half a file."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text(json.dumps(self.to_dict(), indent=2) + "\n", encoding="utf-8")
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> BestRoundTracker:
        path = Path(path)
        try:
            return cls.from_dict(json.loads(path.read_text(encoding="utf-8")))
        except FileNotFoundError:
            raise FileNotFoundError(f"{path}: best-round file not found") from None
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ValueError(f"{path}: not a best-round file ({err})") from None

    # -- reporting --------------------------------------------------------------------------

    def summary(self) -> list[dict]:
        """One row per task: best round, best score, direction, last score."""
        rows = []
        for task, direction in self.directions.items():
            best = self.best.get(task)
            last = next((s[task] for _, s in reversed(self.history) if task in s), None)
            rows.append(
                {
                    "task": task,
                    "direction": direction,
                    "best_round": best[0] if best else None,
                    "best_score": best[1] if best else None,
                    "last_score": last,
                }
            )
        return rows

    def summary_table(self, title: str = "Best round per task"):
        from rich.table import Table

        table = Table(title=title)
        for column in ("task", "better", "best round", "best score", "last score"):
            table.add_column(column, justify="left" if column == "task" else "right")
        for row in self.summary():

            def fmt(v):
                return "-" if v is None else f"{v:.4f}"

            table.add_row(
                row["task"],
                "higher" if row["direction"] == HIGHER else "lower",
                "-" if row["best_round"] is None else str(row["best_round"]),
                fmt(row["best_score"]),
                fmt(row["last_score"]),
            )
        return table
