"""Audio decoding, bad-file detection, cropping, batching and the checked dataset."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf
import torch

from fedspeech.data.audio import (
    TARGET_SAMPLE_RATE,
    AudioDataset,
    AudioError,
    audio_duration,
    center_crop,
    collate,
    load_audio,
    make_loader,
    random_crop,
)
from fedspeech.data.manifest import Utterance


def sine(seconds: float, sr: int, freq: float = 440.0) -> np.ndarray:
    t = np.arange(int(seconds * sr)) / sr
    return (0.3 * np.sin(2 * np.pi * freq * t)).astype(np.float32)


def write(path: Path, wave: np.ndarray, sr: int = TARGET_SAMPLE_RATE, **kwargs) -> Path:
    sf.write(str(path), wave, sr, **kwargs)
    return path


def utt(path: Path, utt_id: str | None = None) -> Utterance:
    return Utterance(id=utt_id or path.stem, path=str(path), duration=1.0, sample_rate=16000, speaker="s")


@pytest.fixture
def bad_files(tmp_path: Path) -> dict[str, Path]:
    """One file per way real corpora go wrong, keyed by the words the error must contain."""
    garbage = tmp_path / "garbage.wav"
    garbage.write_bytes(b"definitely not audio " * 20)
    empty = tmp_path / "empty.wav"
    empty.write_bytes(b"")
    zero = write(tmp_path / "zero.wav", np.zeros(0, np.float32))
    nan_wave = sine(0.5, 16000)
    nan_wave[100] = np.nan
    nan = write(tmp_path / "nan.wav", nan_wave, subtype="FLOAT")
    valid = write(tmp_path / "valid.wav", sine(1.0, 16000), subtype="PCM_16").read_bytes()
    truncated = tmp_path / "truncated.wav"
    truncated.write_bytes(valid[: len(valid) // 2])
    valid_flac = write(tmp_path / "valid.flac", sine(1.0, 16000)).read_bytes()
    truncated_flac = tmp_path / "truncated.flac"
    truncated_flac.write_bytes(valid_flac[: len(valid_flac) // 2])
    return {
        "cannot read audio header": garbage,
        "empty file": empty,
        "zero-length": zero,
        "non-finite": nan,
        "truncated": truncated,
        "cannot decode": truncated_flac,
        "not found": tmp_path / "missing.wav",
    }


def test_load_wav_at_target_rate_round_trips(tmp_path: Path) -> None:
    wave = sine(0.5, 16000)
    loaded = load_audio(write(tmp_path / "a.wav", wave, subtype="FLOAT"))
    assert loaded.dtype == np.float32 and loaded.ndim == 1
    np.testing.assert_allclose(loaded, wave, atol=1e-6)


@pytest.mark.parametrize("sr", [8000, 44100])
def test_resamples_to_16k(tmp_path: Path, sr: int) -> None:
    loaded = load_audio(write(tmp_path / "a.flac", sine(1.5, sr), sr))
    assert abs(len(loaded) - int(1.5 * TARGET_SAMPLE_RATE)) <= 1
    # a 440 Hz tone stays a 440 Hz tone
    spectrum = np.abs(np.fft.rfft(loaded))
    assert abs(np.argmax(spectrum) * TARGET_SAMPLE_RATE / len(loaded) - 440) < 2


def test_stereo_is_averaged_to_mono(tmp_path: Path) -> None:
    left, right = sine(0.5, 16000), np.full(8000, 0.2, np.float32)
    loaded = load_audio(write(tmp_path / "st.wav", np.stack([left, right], axis=1), subtype="FLOAT"))
    assert loaded.shape == (8000,)
    np.testing.assert_allclose(loaded, (left + right) / 2, atol=1e-6)


def test_mp3_and_ogg_decode(tmp_path: Path) -> None:
    for name in ("a.mp3", "a.ogg"):
        loaded = load_audio(write(tmp_path / name, sine(1.0, 48000), 48000))
        assert abs(len(loaded) - 16000) < 200, name  # codecs add a little padding
        assert np.isfinite(loaded).all()


def test_audio_duration_from_header(tmp_path: Path) -> None:
    assert audio_duration(write(tmp_path / "a.flac", sine(1.25, 8000), 8000)) == (1.25, 8000)


def test_each_bad_file_raises_named_error(bad_files: dict[str, Path]) -> None:
    for reason, path in bad_files.items():
        with pytest.raises(AudioError) as info:
            load_audio(path)
        assert str(path) in str(info.value), reason
        assert reason in str(info.value), (reason, str(info.value))


def test_truncated_wav_caught_from_header_alone(bad_files: dict[str, Path]) -> None:
    with pytest.raises(AudioError, match="truncated"):
        audio_duration(bad_files["truncated"])


def test_truncated_mp3_is_caught_by_short_decode(tmp_path: Path) -> None:
    valid = write(tmp_path / "a.mp3", sine(1.0, 16000)).read_bytes()
    cut = tmp_path / "cut.mp3"
    cut.write_bytes(valid[: len(valid) // 2])
    with pytest.raises(AudioError, match="truncated"):
        load_audio(cut)


def test_crops() -> None:
    wave = np.arange(1000, dtype=np.float32)
    assert len(random_crop(wave[:50], 100, np.random.default_rng(0))) == 50
    a = random_crop(wave, 100, np.random.default_rng(7))
    b = random_crop(wave, 100, np.random.default_rng(7))
    assert len(a) == 100 and np.array_equal(a, b)
    assert np.all(np.diff(a) == 1)  # a contiguous window
    np.testing.assert_array_equal(center_crop(wave, 100), wave[450:550])
    assert len(center_crop(wave[:10], 100)) == 10


def test_collate_pads_and_masks() -> None:
    batch = collate([np.ones(3, np.float32), np.full(5, 2.0, np.float32)])
    assert batch["input_values"].shape == (2, 5) and batch["input_values"].dtype == torch.float32
    assert batch["attention_mask"].dtype == torch.long
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]
    assert batch["input_values"][0].tolist() == [1, 1, 1, 0, 0]


def test_collate_normalize_ignores_padding() -> None:
    rng = np.random.default_rng(0)
    short, long = rng.normal(3, 2, 400).astype(np.float32), rng.normal(-1, 5, 1000).astype(np.float32)
    batch = collate([short, long], normalize=True)
    real = batch["input_values"][0, :400]
    assert abs(real.mean().item()) < 1e-4 and abs(real.std(unbiased=False).item() - 1) < 1e-3
    assert torch.all(batch["input_values"][0, 400:] == 0)


def test_dataset_skips_bad_files_with_one_warning(
    tmp_path: Path, bad_files: dict[str, Path], caplog: pytest.LogCaptureFixture
) -> None:
    good = [write(tmp_path / f"good{i}.wav", sine(1.0, 16000, 300 + 100 * i)) for i in range(2)]
    utterances = [utt(good[0])] + [utt(p, f"bad{i}") for i, p in enumerate(bad_files.values())] + [utt(good[1])]
    with caplog.at_level(logging.WARNING, logger="fedspeech.data.audio"):
        dataset = AudioDataset(utterances, max_seconds=None)
    assert [u.path for u in dataset.utterances] == [str(p) for p in good]
    assert len(dataset) == 2 and len(dataset.skipped) == len(bad_files)
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1
    for reason, path in bad_files.items():
        assert str(path) in warnings[0].getMessage() and reason in warnings[0].getMessage()
    wave, item = dataset[1]
    assert item.path == str(good[1]) and len(wave) == 16000


def test_dataset_without_preload_checks_headers(tmp_path: Path, bad_files: dict[str, Path]) -> None:
    good = write(tmp_path / "good.wav", sine(1.0, 16000))
    dataset = AudioDataset([utt(good), utt(bad_files["truncated"]), utt(bad_files["empty file"])], preload=False)
    assert len(dataset) == 1 and len(dataset.skipped) == 2
    assert len(dataset[0][0]) == 16000


def test_dataset_all_bad_raises(bad_files: dict[str, Path]) -> None:
    with pytest.raises(AudioError, match=f"all {len(bad_files)} audio files"):
        AudioDataset([utt(p, f"bad{i}") for i, p in enumerate(bad_files.values())])


def test_dataset_crops_reproducible_per_seed_epoch_index(tmp_path: Path) -> None:
    noise = np.random.default_rng(0).uniform(-0.5, 0.5, 32000).astype(np.float32)
    utterances = [utt(write(tmp_path / f"n{i}.wav", noise, subtype="FLOAT")) for i in range(2)]
    first = AudioDataset(utterances, max_seconds=0.25, seed=3)
    again = AudioDataset(utterances, max_seconds=0.25, seed=3)
    assert len(first[0][0]) == 4000
    assert np.array_equal(first[0][0], again[0][0]) and np.array_equal(first[0][0], first[0][0])
    assert not np.array_equal(first[0][0], first[1][0])  # different index, different window
    before = first[0][0]
    first.set_epoch(1)
    assert not np.array_equal(before, first[0][0])
    center = AudioDataset(utterances, max_seconds=0.25, crop="center")
    np.testing.assert_array_equal(center[0][0], noise[14000:18000])


def test_loader_batches(tmp_path: Path) -> None:
    utterances = [utt(write(tmp_path / f"w{i}.wav", sine(0.1 * (i + 1), 16000))) for i in range(3)]
    loader = make_loader(AudioDataset(utterances), batch_size=2, shuffle=True, seed=0)
    batches = list(loader)
    assert [len(b["utterances"]) for b in batches] == [2, 1]
    expected = {"w0": 1600, "w1": 3200, "w2": 4800}
    for batch in batches:
        assert batch["attention_mask"].sum(dim=1).tolist() == [expected[u.id] for u in batch["utterances"]]
    order = [u.id for b in batches for u in b["utterances"]]
    again = [u.id for b in make_loader(AudioDataset(utterances), 2, True, 0) for u in b["utterances"]]
    assert order == again
