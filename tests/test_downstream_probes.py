"""Frozen-feature probes: k-NN, logistic regression, linear CTC, and the per-round suite."""

from __future__ import annotations

import math

import numpy as np
import pytest
import soundfile as sf
import torch

from fedspeech.data.manifest import Utterance
from fedspeech.downstream.heads import load_backbone
from fedspeech.downstream.probes import (
    ProbeSuite,
    ctc_probe_cer,
    extract_embeddings,
    frame_features,
    knn_accuracy,
    linear_probe_accuracy,
    prepare_probe_data,
)
from fedspeech.downstream.selection import HIGHER, LOWER
from synthetic import SMALL


def angle(degrees: float, scale: float = 1.0) -> list[float]:
    return [scale * math.cos(math.radians(degrees)), scale * math.sin(math.radians(degrees))]


def test_knn_cosine_majority_vote_and_tie_break():
    # x at 0 and 10 degrees, y at 30 degrees; the query at 22 degrees is nearest to y.
    train = torch.tensor([angle(0), angle(10, scale=5.0), angle(30)])  # scale must not matter
    labels = ["x", "x", "y"]
    query = torch.tensor([angle(22, scale=0.1)])
    assert knn_accuracy(train, labels, query, ["y"], k=1) == 1.0
    assert knn_accuracy(train, labels, query, ["x"], k=3) == 1.0  # 2 votes x vs 1 vote y
    # k=2 over the 10 and 30 degree points: one vote each, the nearer (y) wins the tie.
    assert knn_accuracy(train[1:], labels[1:], query, ["y"], k=2) == 1.0
    # A test label never seen in training always counts as wrong.
    assert knn_accuracy(train, labels, query, ["z"], k=1) == 0.0


def test_knn_on_separable_clusters():
    g = torch.Generator().manual_seed(0)
    centres = torch.eye(4) * 3
    train = torch.cat([c + 0.3 * torch.randn(10, 4, generator=g) for c in centres])
    test = torch.cat([c + 0.3 * torch.randn(5, 4, generator=g) for c in centres])
    names = ["a", "b", "c", "d"]
    assert (
        knn_accuracy(train, [n for n in names for _ in range(10)], test, [n for n in names for _ in range(5)], k=5)
        == 1.0
    )


def blobs(seed: int, per_class: int, dim: int = 16, classes: int = 3, spread: float = 1.0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(classes, dim, generator=torch.Generator().manual_seed(99)) * 2
    x = torch.cat([c + spread * torch.randn(per_class, dim, generator=g) for c in centres])
    y = [f"class{k}" for k in range(classes) for _ in range(per_class)]
    return x, y


def test_linear_probe_beats_chance_and_is_deterministic():
    x_train, y_train = blobs(0, 20)
    x_test, y_test = blobs(1, 10)
    # Features on wildly different scales: standardisation must handle it.
    scale = torch.logspace(-3, 3, x_train.shape[1])
    first = linear_probe_accuracy(x_train * scale, y_train, x_test * scale, y_test)
    assert first >= 0.9  # chance is 1/3
    assert linear_probe_accuracy(x_train * scale, y_train, x_test * scale, y_test) == first
    shuffled = y_test[1:] + y_test[:1]
    assert linear_probe_accuracy(x_train, y_train, x_test, shuffled) < first


def test_linear_probe_needs_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        linear_probe_accuracy(torch.ones(3, 2), ["a"] * 3, torch.ones(1, 2), ["a"])


def char_frames(text: str, alphabet: str, rng: np.random.Generator) -> torch.Tensor:
    """Frames that plainly show each character (2 one-hot frames) with a silence frame
    between characters: a perfect representation for the CTC probe to read out."""
    frames = []
    for ch in text:
        for _ in range(2):
            v = np.zeros(len(alphabet) + 1, dtype=np.float32)
            v[alphabet.index(ch)] = 1.0
            frames.append(v)
        silence = np.zeros(len(alphabet) + 1, dtype=np.float32)
        silence[-1] = 1.0
        frames.append(silence)
    x = np.stack(frames) + 0.05 * rng.standard_normal((len(frames), len(alphabet) + 1)).astype(np.float32)
    return torch.from_numpy(x)


def test_ctc_probe_reads_out_an_explicit_character_code():
    rng = np.random.default_rng(0)
    alphabet = "abcde "

    def texts(n):
        return [
            " ".join("".join(rng.choice(list("abcde"), size=rng.integers(2, 4))) for _ in range(2)) for _ in range(n)
        ]

    train_texts, test_texts = texts(20), texts(8)
    train = [char_frames(t, alphabet, rng) for t in train_texts]
    test = [char_frames(t, alphabet, rng) for t in test_texts]
    good = ctc_probe_cer(train, train_texts, test, test_texts, steps=50, lr=0.1)
    assert good < 0.1
    # Features carrying no information about the text cannot be read out.
    noise = [torch.from_numpy(rng.standard_normal(f.shape).astype(np.float32)) for f in train]
    noise_test = [torch.from_numpy(rng.standard_normal(f.shape).astype(np.float32)) for f in test]
    assert ctc_probe_cer(noise, train_texts, noise_test, test_texts, steps=50, lr=0.1) > 0.5
    assert ctc_probe_cer(train, train_texts, test, test_texts, steps=50, lr=0.1) == good  # deterministic


def tone_utterances(folder, count: int, *, prefix: str, seed: int, split: str = "train") -> list[Utterance]:
    """Low (150-250 Hz) or high (1.8-2.4 kHz) tones of 0.4 s; speaker = pitch class."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    utts = []
    for i in range(count):
        high = i % 2 == 1
        freq = rng.uniform(1800, 2400) if high else rng.uniform(150, 250)
        t = np.arange(6400) / 16000
        wave = (rng.uniform(0.2, 0.5) * np.sin(2 * np.pi * freq * t + rng.uniform(0, 6.28))).astype(np.float32)
        path = folder / f"{prefix}{i}.wav"
        sf.write(str(path), wave, 16000)
        label = "high" if high else "low"
        utts.append(
            Utterance(
                f"{prefix}{i}",
                str(path),
                0.4,
                16000,
                f"spk_{label}",
                transcript="hi" if high else "lo",
                label=label,
                split=split,
            )
        )
    return utts


def test_embeddings_and_probe_suite_on_a_tiny_model(tmp_path):
    train = tone_utterances(tmp_path / "train", 8, prefix="tr", seed=0)
    test = tone_utterances(tmp_path / "test", 6, prefix="te", seed=1)
    torch.manual_seed(0)
    backbone = load_backbone("tiny", **SMALL)
    backbone.train()

    data = prepare_probe_data(train, batch_size=3)
    assert [u.id for u in data.utterances] == [u.id for u in train] and len(data.batches) == 3
    emb = extract_embeddings(backbone, data.batches)
    assert emb.shape == (8, SMALL["hidden_size"]) and torch.isfinite(emb).all()
    assert backbone.training  # the caller's mode is restored
    assert extract_embeddings(backbone, data.batches, layer=0).shape == emb.shape
    frames = frame_features(backbone, data.batches)
    assert [len(f) for f in frames] == [19] * 8  # 0.4 s -> 19 frames
    torch.testing.assert_close(torch.stack([f.mean(0) for f in frames]), emb)

    suite = ProbeSuite.from_utterances(
        {"kws": (train, test), "speaker": (train, test), "asr": (train, test)}, method="knn", k=3, ctc_steps=20
    )
    assert suite.directions == {"kws": HIGHER, "speaker": HIGHER, "asr": LOWER}
    scores = suite(backbone)
    assert set(scores) == {"kws", "speaker", "asr"}
    assert 0.0 <= scores["kws"] <= 1.0 and scores["asr"] >= 0.0
    # Low and high tones are trivially separable even by a random frozen CNN.
    assert scores["kws"] >= 5 / 6
    assert suite(backbone) == scores  # same model, same scores
    linear = ProbeSuite.from_utterances({"kws": (train, test)}, method="linear")
    assert linear(backbone)["kws"] >= 5 / 6
    with pytest.raises(ValueError, match="probe task must be one of"):
        ProbeSuite.from_utterances({"emotion": (train, test)})
