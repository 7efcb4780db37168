"""Audio in, tensors out: decoding, checking, cropping and batching of speech files.

Everything downstream sees 16 kHz mono float32, because that is what wav2vec 2.0's
feature encoder was designed for. Real corpora contain broken files (empty downloads,
cut-off copies, NaN-filled float WAVs); they are found here, once, and reported in one
warning instead of crashing a training run hours in.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr
import torch
from torch.utils.data import DataLoader, Dataset

from fedspeech.data.manifest import Utterance

log = logging.getLogger(__name__)

TARGET_SAMPLE_RATE = 16000
# libsndfile logs "<chunk> : <declared> (should be <actual>)" when a header promises more
# bytes than the file holds; it then silently shortens the audio, so we look for that.
_SIZE_MISMATCH = re.compile(r":\s*(\d+)\s*\(should be (\d+)\)")
_STREAMING_SIZE = 0xFFFFFFFF  # "size unknown" placeholder written by streaming encoders
# MP3 frame counts from the header can be estimates (no Xing/LAME tag), so a decode a
# little shorter than announced is normal there; lossless formats must match exactly.
_MP3_SHORTFALL_TOLERANCE = 0.05
#: Sample rates a speech file can plausibly have; outside them the header is garbage (and
#: resampling a "1 GHz" file would allocate for nothing).
SAMPLE_RATE_RANGE = (1000, 384_000)
#: Decoded samples are in [-1, 1] for integer formats; float files may overshoot a little.
#: A peak beyond this is not speech but a broken or hostile file, and would swamp training.
MAX_PEAK = 10.0


class AudioError(ValueError):
    """An audio file that cannot be used; the message names the file and the reason."""

    def __init__(self, path: str | Path | None, reason: str):
        super().__init__(reason if path is None else f"{path}: {reason}")
        self.path = None if path is None else str(path)
        self.reason = reason


def _info(path: Path):
    """soundfile's header info, with missing, empty and unknown files as AudioError."""
    if not path.is_file():
        raise AudioError(path, "file not found")
    if path.stat().st_size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    try:
        return sf.info(str(path))
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(path, f"cannot read audio header ({err})") from None


def _check_header(path: Path, info) -> None:
    """Reject files whose header announces more data than the file holds (cut-off copies)."""
    for declared, actual in _SIZE_MISMATCH.findall(info.extra_info):
        if int(declared) > int(actual) and int(declared) != _STREAMING_SIZE:
            raise AudioError(path, f"truncated file: header declares {declared} bytes, only {actual} present")
    if info.frames == 0:
        raise AudioError(path, "zero-length audio (0 frames)")
    low, high = SAMPLE_RATE_RANGE
    if not low <= info.samplerate <= high:
        raise AudioError(path, f"sample rate {info.samplerate} Hz outside {low}-{high} Hz")


def audio_duration(path: str | Path) -> tuple[float, int]:
    """(seconds, native sample rate) from the header alone, so readers stay fast."""
    path = Path(path)
    info = _info(path)
    _check_header(path, info)
    return info.frames / info.samplerate, int(info.samplerate)


def check_audio(path: str | Path) -> None:
    """Cheap header-level check (no decoding); ``load_audio`` does the full one."""
    audio_duration(path)


def load_audio(path: str | Path, target_sr: int = TARGET_SAMPLE_RATE) -> np.ndarray:
    """Decode ``path`` to mono float32 at ``target_sr``; raise AudioError for unusable files."""
    path = Path(path)
    info = _info(path)
    _check_header(path, info)
    try:
        with sf.SoundFile(str(path)) as f:
            data = f.read(dtype="float32", always_2d=True)
    except (sf.SoundFileError, RuntimeError) as err:
        raise AudioError(path, f"cannot decode audio ({err})") from None
    tolerance = _MP3_SHORTFALL_TOLERANCE if info.format == "MP3" else 0.0
    if len(data) < info.frames * (1.0 - tolerance):
        raise AudioError(path, f"truncated file: header says {info.frames} frames, decoded {len(data)}")
    if len(data) == 0:
        raise AudioError(path, "zero-length audio (0 frames)")
    if not np.isfinite(data).all():
        raise AudioError(path, "contains non-finite samples (NaN or inf)")
    peak = float(np.abs(data).max())
    if peak > MAX_PEAK:
        raise AudioError(path, f"sample peak {peak:.3g} far beyond full scale (max {MAX_PEAK:g})")
    wave = data.mean(axis=1, dtype=np.float32)  # down-mix before resampling: cheaper
    if info.samplerate != target_sr:
        wave = soxr.resample(wave, info.samplerate, target_sr, quality="HQ").astype(np.float32, copy=False)
    return wave


def random_crop(wave: np.ndarray, max_samples: int, rng: np.random.Generator) -> np.ndarray:
    """A random window of ``max_samples`` (training); shorter waves are returned whole."""
    if len(wave) <= max_samples:
        return wave
    start = int(rng.integers(0, len(wave) - max_samples + 1))
    return wave[start : start + max_samples]


def center_crop(wave: np.ndarray, max_samples: int) -> np.ndarray:
    """The middle ``max_samples`` (evaluation: same input every time)."""
    if len(wave) <= max_samples:
        return wave
    start = (len(wave) - max_samples) // 2
    return wave[start : start + max_samples]


def collate(waves: Sequence[np.ndarray], normalize: bool = False) -> dict[str, torch.Tensor]:
    """Zero-pad to the longest wave; ``attention_mask`` is 1 on real samples.

    ``normalize`` applies per-utterance zero-mean unit-variance over the real samples
    (wav2vec 2.0 large expects it, base does not), leaving padding at zero.
    """
    lengths = [len(w) for w in waves]
    batch = torch.zeros(len(waves), max(lengths, default=0), dtype=torch.float32)
    mask = torch.zeros(batch.shape, dtype=torch.long)
    for row, wave in enumerate(waves):
        values = torch.as_tensor(np.asarray(wave, dtype=np.float32))
        if normalize and len(values):
            values = (values - values.mean()) / torch.sqrt(values.var(unbiased=False) + 1e-7)
        batch[row, : len(values)] = values
        mask[row, : len(values)] = 1
    return {"input_values": batch, "attention_mask": mask}


class AudioDataset(Dataset):
    """Checked utterances yielding ``(cropped wave, utterance)``.

    Bad files are skipped at construction (kept in ``.skipped`` with their reason and
    reported in one warning). With ``preload`` every file is decoded once and kept in
    memory; without it only headers are checked, and decode problems surface as
    AudioError on access. Random crops depend only on (seed, epoch, index), so runs
    repeat exactly; ``crop="center"`` gives fixed crops for evaluation.
    """

    def __init__(
        self,
        utterances: Sequence[Utterance],
        max_seconds: float | None = None,
        seed: int = 0,
        preload: bool = True,
        crop: str = "random",
    ):
        if crop not in ("random", "center"):
            raise ValueError(f"crop must be 'random' or 'center', got {crop!r}")
        self.max_samples = None if max_seconds is None else int(round(max_seconds * TARGET_SAMPLE_RATE))
        self.seed = seed
        self.crop = crop
        self.epoch = 0
        self.preload = preload
        self.utterances: list[Utterance] = []
        self.skipped: list[tuple[Utterance, str]] = []
        self._waves: list[np.ndarray] = []
        for utt in utterances:
            try:
                if preload:
                    self._waves.append(load_audio(utt.path))
                else:
                    check_audio(utt.path)
            except AudioError as err:
                self.skipped.append((utt, err.reason))
                continue
            self.utterances.append(utt)
        if self.skipped:
            lines = "\n".join(f"  {utt.path}: {reason}" for utt, reason in self.skipped)
            log.warning("skipped %d of %d audio file(s):\n%s", len(self.skipped), len(utterances), lines)
        if utterances and not self.utterances:
            first = "; ".join(f"{utt.path}: {reason}" for utt, reason in self.skipped[:3])
            raise AudioError(None, f"all {len(self.skipped)} audio files are unusable (first: {first})")

    def set_epoch(self, epoch: int) -> None:
        """Draw new random crops for a new epoch (call before iterating)."""
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.utterances)

    def __getitem__(self, index: int) -> tuple[np.ndarray, Utterance]:
        utt = self.utterances[index]
        wave = self._waves[index] if self.preload else load_audio(utt.path)
        if self.max_samples is not None:
            if self.crop == "center":
                wave = center_crop(wave, self.max_samples)
            else:
                rng = np.random.default_rng([self.seed, self.epoch, index])
                wave = random_crop(wave, self.max_samples, rng)
        return wave, utt


def make_loader(
    dataset: AudioDataset,
    batch_size: int,
    shuffle: bool = False,
    seed: int = 0,
    normalize: bool = False,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader of ``collate`` dicts plus ``"utterances"``; shuffling is seeded."""

    def collate_items(items: list[tuple[np.ndarray, Utterance]]) -> dict:
        batch: dict = collate([wave for wave, _ in items], normalize=normalize)
        batch["utterances"] = [utt for _, utt in items]
        return batch

    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        collate_fn=collate_items,
        num_workers=num_workers,
    )
