"""Crash-resume under SIGKILL: a real ``fedspeech pretrain`` process is killed in the middle
of a round, restarted with ``--resume``, and must lose no completed round and end with the
same model as an uninterrupted run of the same seed (one thread each: multi-threaded CPU
kernels are not bitwise reproducible)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.numpy import load_file

from fedspeech.federated import roundlog


def command(manifest: Path, partition: Path, out: Path, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "fedspeech.cli", "--threads", "1", "pretrain",
        "--manifest", str(manifest), "--partition", str(partition), "--out", str(out),
        "--rounds", "3", "--max-seconds", "1", "--batch-size", "4", "--lr", "5e-4",
        "--val-max-utterances", "8", "--keep-checkpoints", "1", *extra,
    ]  # fmt: skip


def env() -> dict[str, str]:
    return {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1"}


def final_model(out: Path) -> dict:
    return load_file(str(out / "checkpoints" / "round_0003" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_mid_round_then_resume_loses_nothing_and_matches(small_corpus, speaker_partition, tmp_path):
    partition = speaker_partition(2)
    straight = tmp_path / "straight"
    subprocess.run(command(small_corpus, partition, straight), check=True, env=env(), capture_output=True)

    killed = tmp_path / "killed"
    process = subprocess.Popen(command(small_corpus, partition, killed), env=env(), stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 600
    while roundlog.last_round(killed) < 1:  # round 1 complete: now in round 2
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.monotonic() < deadline
        time.sleep(0.05)
    time.sleep(0.5)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert roundlog.last_round(killed) in (1, 2)  # killed mid-round 2 (or just after it)

    subprocess.run(command(small_corpus, partition, killed, "--resume"), check=True, env=env(), capture_output=True)
    resumed, reference = roundlog.read_rounds(killed), roundlog.read_rounds(straight)
    assert [r["round"] for r in resumed] == [1, 2, 3]
    for got, want in zip(resumed, reference):
        assert got["train_loss"] == want["train_loss"] and got["val_loss"] == want["val_loss"], got["round"]
    a, b = final_model(killed), final_model(straight)
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert sorted(p.name for p in (killed / "checkpoints").iterdir()) == ["round_0003"]  # pruned as asked


def test_a_torn_last_log_line_is_not_a_round_and_a_torn_middle_line_is_an_error(tmp_path):
    good = json.dumps({"round": 1}) + "\n"
    (tmp_path / roundlog.LOG_NAME).write_text(good + '{"round": 2, "val')
    assert roundlog.last_round(tmp_path) == 1
    (tmp_path / roundlog.LOG_NAME).write_text('{"round": 2, "val\n' + good)
    with pytest.raises(ValueError, match="rounds.jsonl:1"):
        roundlog.read_rounds(tmp_path)
