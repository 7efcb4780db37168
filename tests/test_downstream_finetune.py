"""End-to-end fine-tuning on toy waveforms, the reusable train/eval steps, and the CLI."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import soundfile as sf
import torch

from fedspeech.apps.finetune import cli
from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import Utterance, write_manifest
from fedspeech.downstream.finetune import (
    evaluate_classifier,
    finetune_asr,
    finetune_classifier,
    train_epochs,
)
from fedspeech.downstream.heads import UtteranceClassifier, make_optimizer
from synthetic import SMALL


def tones(folder, count: int, *, prefix: str, seed: int, split: str = "train", seconds: float = 0.4):
    """Alternating low (150-250 Hz) and high (1.8-2.4 kHz) tones with random amplitude and
    phase; label, transcript and speaker all name the pitch class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(count):
        high = i % 2 == 1
        freq = rng.uniform(1800, 2400) if high else rng.uniform(150, 250)
        t = np.arange(int(seconds * 16000)) / 16000
        wave = (rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28))).astype(np.float32)
        path = folder / f"{prefix}{i}.wav"
        sf.write(str(path), wave, 16000)
        name = "high" if high else "low"
        utts.append(
            Utterance(
                f"{prefix}{i}",
                str(path),
                seconds,
                16000,
                f"spk_{name}",
                transcript="hi" if high else "lo",
                label=name,
                split=split,
            )
        )
    return utts


def test_classifier_finetune_separates_low_and_high_tones(tmp_path):
    train = tones(tmp_path / "a", 24, prefix="tr", seed=0)
    dev = tones(tmp_path / "b", 6, prefix="dv", seed=1, split="dev")
    test = tones(tmp_path / "c", 16, prefix="te", seed=2, split="test")
    result = finetune_classifier(
        "tiny",
        train,
        test,
        task="kws",
        dev_utts=dev,
        epochs=6,
        batch_size=8,
        lr_backbone=1e-4,
        lr_head=3e-2,
        seed=0,
        config_overrides=SMALL,
    )
    assert result["labels"] == ["high", "low"]
    assert result["accuracy"] >= 0.85  # chance is 0.5
    assert np.array(result["confusion_matrix"]).sum() == 16
    assert result["steps"] == 18 and len(result["epoch_losses"]) == 6
    assert result["epoch_losses"][-1] < result["epoch_losses"][0]
    assert result["selected_on"] == "dev accuracy" and 1 <= result["best_epoch"] <= 6
    assert all("dev" in h for h in result["history"])


def test_finetune_is_deterministic_per_seed(tmp_path):
    train = tones(tmp_path / "a", 8, prefix="tr", seed=0)
    test = tones(tmp_path / "b", 4, prefix="te", seed=1)
    runs = [
        finetune_classifier(
            "tiny", train, test, task="speaker", epochs=2, batch_size=4, seed=seed, config_overrides=SMALL
        )
        for seed in (5, 5, 6)
    ]
    assert runs[0]["epoch_losses"] == runs[1]["epoch_losses"]
    assert runs[0]["confusion_matrix"] == runs[1]["confusion_matrix"]
    assert runs[0]["epoch_losses"] != runs[2]["epoch_losses"]
    assert runs[0]["labels"] == ["spk_high", "spk_low"]


def test_asr_finetune_returns_error_rates_and_examples(tmp_path):
    train = tones(tmp_path / "a", 6, prefix="tr", seed=0) + tones(tmp_path / "l", 2, prefix="long", seed=3, seconds=1.0)
    test = tones(tmp_path / "b", 3, prefix="te", seed=1)
    result = finetune_asr(
        "tiny", train, test, epochs=2, max_steps=3, batch_size=4, max_seconds=0.5, seed=0, config_overrides=SMALL
    )
    assert result["num_train"] == 6  # the two 1 s clips exceed max_seconds and are dropped, not cropped
    assert result["steps"] == 3 and len(result["epoch_losses"]) == 2  # 2 batches per epoch, capped at 3
    assert result["wer"] >= 0 and result["cer"] >= 0 and np.isfinite(result["loss"])
    assert [ex["reference"] for ex in result["examples"]] == ["lo", "hi", "lo"]
    assert result["vocab"][:3] == ["<blank>", "|", "'"]


def test_train_epochs_and_evaluate_for_a_federated_client(tmp_path):
    utts = tones(tmp_path, 8, prefix="u", seed=0)
    torch.manual_seed(0)
    model = UtteranceClassifier.build("tiny", ["high", "low"], **SMALL)
    loader = make_loader(AudioDataset(utts), batch_size=4, shuffle=True, seed=0)
    optimizer = make_optimizer(model, 1e-4, 1e-2)
    before = model.head.weight.detach().clone()
    stats = train_epochs(model, loader, optimizer, epochs=3, max_steps=5)
    assert stats.steps == 5 and stats.examples == 20 and len(stats.epoch_losses) == 3
    assert not torch.equal(before, model.head.weight)
    metrics = evaluate_classifier(model, make_loader(AudioDataset(utts), batch_size=4))
    assert metrics["num_utterances"] == 8 and 0 <= metrics["accuracy"] <= 1 and np.isfinite(metrics["loss"])
    assert not model.training


def test_finetune_rejects_bad_input(tmp_path):
    train = tones(tmp_path, 2, prefix="u", seed=0)
    with pytest.raises(ValueError, match="task must be 'kws' or 'speaker'"):
        finetune_classifier("tiny", train, train, task="emotion")
    unlabelled = [Utterance("x", train[0].path, 0.4, 16000, "s")]
    with pytest.raises(ValueError, match="without a label"):
        finetune_classifier("tiny", train, unlabelled, task="kws")


def run_cli(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="fedspeech")
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.func(args)


def test_cli_finetune_kws_writes_json(tmp_path, capsys):
    utts = tones(tmp_path / "tr", 4, prefix="tr", seed=0) + tones(tmp_path / "te", 2, prefix="te", seed=1, split="test")
    manifest = write_manifest(utts, tmp_path / "manifest.tsv")
    out = tmp_path / "result.json"
    code = run_cli(
        [
            "finetune",
            "kws",
            "--manifest",
            str(manifest),
            "--epochs",
            "1",
            "--batch-size",
            "4",
            "--max-seconds",
            "0.3",
            "--json",
            str(out),
        ]
    )
    assert code == 0
    result = json.loads(out.read_text())
    assert result["task"] == "kws" and result["num_train"] == 4 and result["num_eval"] == 2
    assert result["selected_on"] == "last epoch"  # the manifest has no dev split
    printed = capsys.readouterr().out
    assert "test accuracy" in printed and "confusion matrix" in printed


def test_cli_bad_arguments(tmp_path):
    with pytest.raises(SystemExit):
        run_cli(["finetune", "kws", "--manifest", "m.tsv", "--epochs", "0"])
    with pytest.raises(ValueError, match="--backbone nowhere: not a preset"):
        run_cli(["finetune", "asr", "--manifest", str(tmp_path / "m.tsv"), "--backbone", "nowhere"])


def test_classifier_scores_extra_test_sets_with_the_kept_model(tmp_path):
    """An extra test set (another corpus) is scored by the same final model: the test set
    given twice, once as the main and once as an extra set, gets the same accuracy."""
    train = tones(tmp_path / "a", 16, prefix="tr", seed=0)
    test = tones(tmp_path / "c", 8, prefix="te", seed=2, split="test")
    other = tones(tmp_path / "d", 6, prefix="ot", seed=3, split="test", seconds=0.3)
    result = finetune_classifier(
        "tiny",
        train,
        test,
        task="kws",
        epochs=2,
        batch_size=8,
        seed=0,
        config_overrides=SMALL,
        extra_eval_utts={"same": test, "other": other},
    )
    assert result["extra"]["same"]["accuracy"] == result["accuracy"]
    assert result["extra"]["other"]["num_eval"] == 6
    assert 0.0 <= result["extra"]["other"]["accuracy"] <= 1.0
