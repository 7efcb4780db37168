"""Fuzz-style input robustness: random bytes, truncated files, wrong extensions, zero
length, extreme amplitudes, NaN samples, absurd sample rates and odd channel counts, thrown
at the Speech Commands reader and the audio loader. Every bad file is skipped, counted and
named; every good one is kept; nothing crashes."""

from __future__ import annotations

import struct

import numpy as np
import pytest
import soundfile as sf

from fedspeech.data.audio import AudioDataset, load_audio
from fedspeech.data.readers import read_speech_commands

SR = 16000


def tone(seconds: float = 0.5, channels: int = 1) -> np.ndarray:
    t = np.arange(int(seconds * SR)) / SR
    wave = 0.3 * np.sin(2 * np.pi * 220 * t).astype(np.float32)
    return np.repeat(wave[:, None], channels, axis=1) if channels > 1 else wave


def wav_with_rate(path, rate: int) -> None:
    """A PCM16 WAV whose header claims ``rate`` (soundfile refuses to write absurd ones)."""
    data = (tone(0.1) * 32767).astype("<i2").tobytes()
    header = b"RIFF" + struct.pack("<I", 36 + len(data)) + b"WAVEfmt " + struct.pack(
        "<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16
    ) + b"data" + struct.pack("<I", len(data))  # fmt: skip
    path.write_bytes(header + data)


def make_corpus(root, rng: np.random.Generator) -> tuple[set[str], set[str]]:
    """A Speech Commands folder with good files and every kind of bad one; (good, bad) stems."""
    word = root / "yes"
    word.mkdir(parents=True)
    good, bad = set(), set()

    def ok(name, data, **kw):
        sf.write(word / f"{name}.wav", data, kw.pop("rate", SR), **kw)
        good.add(name)

    ok("spk0_nohash_0", tone())
    ok("spk1_nohash_0", tone(channels=2))  # stereo: down-mixed
    ok("spk2_nohash_0", tone(channels=5))  # odd channel count: down-mixed
    ok("spk3_nohash_0", tone(), rate=44100)  # resampled
    ok("spk4_nohash_0", np.clip(tone() * 3, -1, 1), subtype="PCM_16")  # clipped but valid
    for i in range(5):  # random bytes under a .wav name
        (word / f"rand{i}_nohash_0.wav").write_bytes(rng.bytes(int(rng.integers(1, 4096))))
        bad.add(f"rand{i}_nohash_0")
    (word / "empty_nohash_0.wav").write_bytes(b"")
    bad.add("empty_nohash_0")
    sf.write(word / "cut_nohash_0.wav", tone(1.0), SR, subtype="PCM_16")
    whole = (word / "cut_nohash_0.wav").read_bytes()
    (word / "cut_nohash_0.wav").write_bytes(whole[: len(whole) // 2])  # truncated copy
    bad.add("cut_nohash_0")
    sf.write(word / "zero_nohash_0.wav", np.zeros(0, dtype=np.float32), SR)
    bad.add("zero_nohash_0")
    sf.write(word / "nan_nohash_0.wav", np.full(SR // 4, np.nan, dtype=np.float32), SR, subtype="FLOAT")
    bad.add("nan_nohash_0")
    sf.write(word / "loud_nohash_0.wav", tone() * 1e6, SR, subtype="FLOAT")
    bad.add("loud_nohash_0")
    wav_with_rate(word / "fast_nohash_0.wav", 2_000_000_000)
    bad.add("fast_nohash_0")
    sf.write(word / "flac_nohash_0.wav", tone(), SR, format="FLAC")  # wrong extension, readable: kept
    good.add("flac_nohash_0")
    (word / "text_nohash_0.wav").write_text("this is not audio\n")
    bad.add("text_nohash_0")
    return good, bad


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_bad_audio_is_skipped_counted_and_named_good_audio_kept(tmp_path, seed, caplog):
    good, bad = make_corpus(tmp_path / "sc", np.random.default_rng(seed))
    utterances = read_speech_commands(tmp_path / "sc")  # header checks: most bad files go here
    kept_by_reader = {u.id.removeprefix("yes_") for u in utterances}
    assert good <= kept_by_reader
    dataset = AudioDataset(utterances)  # full decode: NaN and extreme samples go here
    kept = {u.id.removeprefix("yes_") for u in dataset.utterances}
    assert kept == good
    skipped_everywhere = (kept_by_reader - kept) | (
        {p.stem for p in (tmp_path / "sc" / "yes").iterdir()} - kept_by_reader
    )
    assert skipped_everywhere == bad
    assert all(reason for _, reason in dataset.skipped)  # each one named with a reason
    for wave, _ in (dataset[i] for i in range(len(dataset))):
        assert wave.dtype == np.float32 and wave.ndim == 1 and np.isfinite(wave).all() and np.abs(wave).max() <= 1.0


def test_the_loader_names_the_file_and_the_reason(tmp_path):
    loud = tmp_path / "loud.wav"
    sf.write(loud, tone() * 1e6, SR, subtype="FLOAT")
    with pytest.raises(ValueError, match=r"loud\.wav: sample peak"):
        load_audio(loud)
    fast = tmp_path / "fast.wav"
    wav_with_rate(fast, 2_000_000_000)
    with pytest.raises(ValueError, match=r"fast\.wav: sample rate 2000000000 Hz outside"):
        load_audio(fast)
