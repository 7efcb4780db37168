"""Per-round checkpoints in Hugging Face format, and resuming from the last complete one.

A round's folder is written under a temporary name and renamed when complete, so a crash
mid-write never leaves a checkpoint that looks valid: resume takes the highest complete
round. The folder is a regular HF checkpoint (``config.json`` + ``model.safetensors``) that
``transformers.Wav2Vec2Model.from_pretrained`` loads; anything that is not part of the HF
model (e.g. the feature-matching projector/predictor) goes beside it in
``extra.safetensors``.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Iterator
from collections.abc import Set as AbstractSet
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import save_file

from fedspeech.models.loading import EXTRA_FILE, load_extra  # noqa: F401 (round checkpoints hold it)

_ROUND_DIR = re.compile(r"^round_(\d{4,})$")
STATE_FILE = "fedspeech_state.json"
#: Server-side training state that is not the model (server-optimiser moments, the averaged
#: client optimiser state), so a resumed run continues exactly.
SERVER_FILE = "server_state.safetensors"


def round_dir(out_dir: Path, server_round: int) -> Path:
    return Path(out_dir) / "checkpoints" / f"round_{server_round:04d}"


@contextmanager
def _quiet_transformers() -> Iterator[None]:
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


def save_checkpoint(
    out_dir: Path,
    server_round: int,
    hf_model,
    extra: dict[str, torch.Tensor],
    state: dict,
    server_arrays: dict[str, np.ndarray] | None = None,
) -> Path:
    """Write the round's checkpoint atomically and return its folder."""
    final = round_dir(out_dir, server_round)
    tmp = final.with_name(final.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    with _quiet_transformers():  # no "Writing model shards" bar per round in the user's console
        hf_model.save_pretrained(tmp, safe_serialization=True)
    if extra:
        save_file({k: v.detach().contiguous().cpu() for k, v in extra.items()}, str(tmp / EXTRA_FILE))
    if server_arrays:
        save_numpy({k: np.ascontiguousarray(v) for k, v in server_arrays.items()}, str(tmp / SERVER_FILE))
    (tmp / STATE_FILE).write_text(json.dumps({"round": server_round, **state}, indent=2))
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    return final


def completed_rounds(out_dir: Path) -> list[int]:
    folder = Path(out_dir) / "checkpoints"
    if not folder.is_dir():
        return []
    rounds = []
    for child in folder.iterdir():
        match = _ROUND_DIR.match(child.name)
        if match and (child / STATE_FILE).is_file():
            rounds.append(int(match.group(1)))
    return sorted(rounds)


def latest_checkpoint(out_dir: Path, at_most: int | None = None) -> Path | None:
    """The newest round checkpoint (of a round ≤ ``at_most``, e.g. the last logged round)."""
    rounds = [r for r in completed_rounds(out_dir) if at_most is None or r <= at_most]
    return round_dir(out_dir, rounds[-1]) if rounds else None


def load_state(folder: Path) -> dict:
    return json.loads((Path(folder) / STATE_FILE).read_text())


def load_server_arrays(folder: Path) -> dict[str, np.ndarray]:
    path = Path(folder) / SERVER_FILE
    return load_numpy(str(path)) if path.is_file() else {}


def prune_checkpoints(
    out_dir: Path, keep_last: int, protect: AbstractSet[int] = frozenset(), *, resumable: bool = True
) -> None:
    """Delete all but the newest ``keep_last`` round folders (0 keeps all). In a resumable
    run the checkpoint of the last logged round is kept too: until the current round's log
    line is written, it is where a killed run resumes."""
    if keep_last <= 0:
        return
    from fedspeech.federated import roundlog

    rounds = completed_rounds(out_dir)
    if resumable:
        last_logged = roundlog.last_round(out_dir)
        protect = set(protect) | {max((r for r in rounds if r <= last_logged), default=0)}
    for server_round in rounds[:-keep_last]:
        if server_round not in protect:
            shutil.rmtree(round_dir(out_dir, server_round), ignore_errors=True)
