"""Per-round probes of the global model and best-round-per-task bookkeeping (FASSL,
docs/methods.md §4): after every round the server scores the global backbone on each downstream
task with a cheap frozen-feature probe and keeps, per task, the best round's checkpoint in
``out/best/TASK/``."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from fedspeech.federated.checkpoints import round_dir

log = logging.getLogger(__name__)
TRACKER_FILE = "best_rounds.json"


class RoundProber:
    """Probe suite + best-round tracker for one run folder; resumable."""

    def __init__(
        self, manifest: str, tasks: list[str], out_dir: Path, method: str, seed: int, resume_after: int | None
    ) -> None:
        from fedspeech.data.manifest import read_manifest
        from fedspeech.downstream.probes import ProbeSuite
        from fedspeech.downstream.selection import BestRoundTracker
        from fedspeech.downstream.tasks import probe_sets

        sets = {task: data for task, data in probe_sets(read_manifest(manifest), seed=seed).items() if task in tasks}
        missing = sorted(set(tasks) - set(sets))
        if missing:
            log.warning("%s: no labelled data for probe task(s) %s; skipped", manifest, missing)
        self.suite = ProbeSuite.from_utterances(sets, method=method)
        self.out_dir = Path(out_dir)
        tracker_path = self.out_dir / TRACKER_FILE
        if resume_after is not None and tracker_path.is_file():
            self.tracker = BestRoundTracker.load(tracker_path)
            self.tracker.discard_after(resume_after)
        else:
            self.tracker = BestRoundTracker(self.suite.directions)

    def __call__(self, server_round: int, backbone: torch.nn.Module) -> dict[str, float]:
        """Score the round's global model; copy its checkpoint to ``best/TASK`` where it is
        the best so far. Call after the round's checkpoint is written."""
        scores = self.suite(backbone)
        for task in self.tracker.update(server_round, scores):
            best = self.out_dir / "best" / task
            shutil.rmtree(best, ignore_errors=True)
            shutil.copytree(round_dir(self.out_dir, server_round), best)
        self.tracker.save(self.out_dir / TRACKER_FILE)
        return scores


def run_prober(settings, out_dir: Path, resume_after: int | None) -> RoundProber | None:
    """The run's prober (``settings.probes``), or None when the run probes nothing."""
    if not settings.probe_tasks:
        return None
    return RoundProber(
        settings.manifest, settings.probe_tasks, out_dir, settings.probe_method, settings.seed, resume_after
    )
