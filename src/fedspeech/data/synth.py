"""The built-in multi-speaker corpus, synthesised offline with espeak-ng.

Why synthetic: the project must run end to end on a laptop with no internet, so it ships
a corpus it can generate itself. espeak-ng is small, packaged everywhere and fast
(~20 ms per utterance), and its accents, voice variants, pitch and rate give enough
speaker variety for speaker-disjoint splits and non-IID federated partitions.

Layout written by :func:`build_corpus`::

    out_dir/audio/SPEAKER/*.wav   16 kHz mono PCM_16
    out_dir/manifest.tsv          fedspeech.data.manifest format
    out_dir/speakers.tsv          speaker, voice parameters, split
    out_dir/corpus.json           seed, counts, espeak-ng version

The same seed gives byte-identical files (no timestamps anywhere; every random draw comes
from a generator seeded by (seed, speaker, utterance)), so a corpus can be rebuilt instead
of shipped.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import shutil
import subprocess
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import soundfile as sf
import soxr

from fedspeech.data.manifest import Utterance, write_manifest

SAMPLE_RATE = 16_000
UNKNOWN_LABEL = "_unknown_"

# The ten Speech Commands core words, so keyword models move between corpora unchanged.
KEYWORDS: tuple[str, ...] = ("yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")
# Spoken but labelled UNKNOWN_LABEL: a keyword spotter must learn to reject other words.
UNKNOWN_WORDS: tuple[str, ...] = ("bed", "bird", "cat", "dog", "happy", "house", "tree", "wow", "zero", "five")

# Lowercase letters, spaces and apostrophes only, so a character CTC alphabet covers them.
SENTENCES: tuple[str, ...] = (
    "the quick brown fox jumps over the lazy dog",
    "please turn the lights off before you leave",
    "it's going to rain again this afternoon",
    "my brother bought a new bicycle last week",
    "the coffee in this kitchen is always cold",
    "we walked along the river until sunset",
    "can you open the window a little wider",
    "she keeps her keys in the blue jacket",
    "the train to the city leaves at noon",
    "they planted tomatoes and beans in the garden",
    "don't forget to water the plants tomorrow",
    "a small dog barked at the passing truck",
    "the library closes early on sundays",
    "he painted the fence a bright shade of green",
    "our neighbours are moving to the coast",
    "i can't find the remote control anywhere",
    "the children built a castle out of sand",
    "turn left at the bakery and keep walking",
    "the museum has a famous collection of maps",
    "she sings in a choir every thursday night",
    "the bread smells wonderful straight from the oven",
    "we should leave now if we want good seats",
    "the old bridge was repaired last summer",
    "his phone battery died in the middle of the call",
    "a gentle wind moved through the tall grass",
    "the doctor said i need more sleep",
    "they're watching a documentary about whales",
    "my grandmother makes the best apple pie",
    "the meeting has been moved to friday morning",
    "put the heavy boxes near the back door",
    "the farmer sold fresh eggs at the market",
    "it was too dark to read the street signs",
    "the teacher wrote the answer on the board",
    "we heard thunder far away over the hills",
    "you'll need a warm coat in the mountains",
    "the cat slept all day on the sunny windowsill",
    "the pilot announced a short delay",
    "a thin layer of snow covered the roofs",
    "he forgot his umbrella at the restaurant",
    "the soup needs a little more salt",
    "the band played until well after midnight",
    "she answered every question without hesitation",
    "the printer on the second floor is broken",
    "we're planning a trip to the northern islands",
    "the baby finally fell asleep after lunch",
    "he fixed the leaking tap with a wrench",
    "the orange juice is in the refrigerator",
    "a flock of geese flew over the lake",
    "the shop sells old records and comic books",
    "i'd like a table for two by the window",
    "the bus was crowded with noisy students",
    "she measured the room before buying a carpet",
    "the river flooded the fields in early spring",
    "they argued about the rules of the game",
    "my sister works as a nurse in the hospital",
    "the candle flickered and then went out",
    "please speak slowly and clearly into the microphone",
    "the wooden chair creaked when he sat down",
    "we found an old photograph in the attic",
    "the engine made a strange rattling noise",
    "he jogs around the park every morning",
    "the soldiers marched across the dusty square",
    "a cold glass of water would be lovely",
    "the artist sketched the harbour at dawn",
    "this road leads to a quiet fishing village",
    "the kids are playing football in the yard",
    "she wrapped the present in shiny paper",
    "the plumber will arrive between nine and ten",
    "the clock on the tower stopped years ago",
    "they shared a pizza after the long hike",
    "we couldn't hear anything over the music",
    "the hotel room had a view of the ocean",
    "his jokes made everyone laugh at dinner",
    "the volcano has been quiet for centuries",
    "the recipe calls for butter and brown sugar",
    "a young fox crossed the road at night",
    "the professor explained the theory very patiently",
    "she carried a basket full of ripe peaches",
    "the workers finished the roof before the storm",
    "i'll call you as soon as i get home",
    "the stars were bright above the desert",
    "the computer needs to restart after the update",
    "my uncle tells the same story every year",
    "the waves crashed against the rocky shore",
    "they found a wallet lying on the pavement",
    "the garden gate squeaks when you push it",
    "we ordered noodles and spicy vegetables",
    "the judge listened carefully to both sides",
    "a bright rainbow appeared after the shower",
    "the horse galloped across the open meadow",
    "she's learning to play the violin",
    "the elevator is out of order again",
    "his voice echoed through the empty hall",
    "the lemons on that tree are nearly ripe",
    "the journey took longer than we expected",
    "the owl hooted softly in the old oak",
    "they painted the kitchen walls pale yellow",
    "the puppy chewed through my favourite shoes",
    "the newspaper arrives early every morning",
    "we watched the fireworks from the balcony",
    "the mechanic checked the brakes and the tyres",
    "her laughter filled the whole apartment",
    "the sailors tied the boat to the pier",
    "a quiet voice whispered from the corner",
    "the price of petrol went up again",
    "the students tidied the classroom after the party",
)

# English accents shipped with espeak-ng 1.51 (`espeak-ng --voices=en`), formant voices
# only: the mb/* voices need the separate mbrola program. British English is "en", not
# "en-gb": espeak-ng 1.51 silently drops the "+variant" suffix from "en-gb+f2".
ACCENTS: tuple[str, ...] = (
    "en", "en-us", "en-gb-scotland", "en-gb-x-rp", "en-gb-x-gbclan",
    "en-gb-x-gbcwmd", "en-029", "en-us-nyc",
)  # fmt: skip
# Voice variants (`espeak-ng --voices=variant`) that still sound like a person; robotic,
# whispering and novelty variants are left out because they would dominate what a model
# learns about "speakers".
VARIANTS: tuple[str, ...] = (
    "m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "klatt", "klatt2", "klatt3",
    "Andy", "david", "edward", "john", "max", "paul", "travis", "Gene",
    "f1", "f2", "f3", "f4", "f5", "Annie", "belinda", "linda", "steph", "aunty", "Alicia",
)  # fmt: skip

PITCH_RANGE = (20, 80)  # espeak-ng -p, 0..99 around the variant's own base pitch
SPEED_RANGE = (135, 195)  # espeak-ng -s, words per minute (default 175)
AMPLITUDE_RANGE = (80, 130)  # espeak-ng -a, 0..200; peak normalisation undoes most of it
NOISE_DB_RANGE = (-50.0, -35.0)  # white-noise RMS in dBFS, on about half of the speakers
PEAK = 10 ** (-1 / 20)  # normalise to -1 dBFS so added noise cannot clip
PAD_S = 0.1  # silence kept before and after speech after trimming
TRIM_DB = -40.0  # samples this far below the peak count as silence when trimming
SPLIT_FRACTIONS = (0.8, 0.1, 0.1)  # train / dev / test, by speaker

_INSTALL_HINT = (
    "espeak-ng was not found on PATH; the built-in corpus is synthesised with it. "
    "Install it with `sudo apt-get install espeak-ng` (Debian/Ubuntu), "
    "`sudo dnf install espeak-ng` (Fedora), or `brew install espeak-ng` (macOS)."
)


@dataclass(frozen=True)
class Voice:
    """One synthetic speaker: the espeak-ng voice and prosody it always speaks with.

    ``noise_db`` is the RMS level (dBFS) of white noise added to every utterance, or None
    for clean audio.
    """

    voice: str
    variant: str
    pitch: int
    speed: int
    amplitude: int
    noise_db: float | None = None

    @property
    def espeak_name(self) -> str:
        return f"{self.voice}+{self.variant}"


def speaker_voices(n: int, seed: int) -> list[Voice]:
    """``n`` distinct voices, deterministic for ``seed``.

    Accents are dealt round-robin (in a seeded order) so every accent is used before any
    repeats, and each accent walks its own shuffled variant list, so (accent, variant)
    pairs do not repeat until all len(ACCENTS) * len(VARIANTS) are used; beyond that
    pitch and rate keep voices apart.
    """
    if n < 1:
        raise ValueError(f"speakers must be at least 1, got {n}")
    if seed < 0:  # numpy seed sequences take non-negative integers only
        raise ValueError(f"seed must be >= 0, got {seed}")
    rng = np.random.default_rng([seed, 0x5EED])
    accent_order = [ACCENTS[i] for i in rng.permutation(len(ACCENTS))]
    variant_orders = {a: [VARIANTS[i] for i in rng.permutation(len(VARIANTS))] for a in ACCENTS}
    voices: list[Voice] = []
    seen: set[tuple[str, str, int, int]] = set()
    for i in range(n):
        accent = accent_order[i % len(accent_order)]
        variant = variant_orders[accent][(i // len(accent_order)) % len(VARIANTS)]
        while True:  # redraw prosody until the voice is new (only matters past 240 speakers)
            pitch = int(rng.integers(PITCH_RANGE[0], PITCH_RANGE[1] + 1))
            speed = int(rng.integers(SPEED_RANGE[0], SPEED_RANGE[1] + 1))
            if (accent, variant, pitch, speed) not in seen:
                break
        seen.add((accent, variant, pitch, speed))
        amplitude = int(rng.integers(AMPLITUDE_RANGE[0], AMPLITUDE_RANGE[1] + 1))
        noisy = rng.random() < 0.5
        noise_db = round(float(rng.uniform(*NOISE_DB_RANGE)), 1)
        voices.append(Voice(accent, variant, pitch, speed, amplitude, noise_db if noisy else None))
    return voices


def speaker_splits(speakers: Sequence[str], seed: int) -> dict[str, str]:
    """Assign whole speakers to train/dev/test (about 80/10/10), so evaluation speakers
    are never heard in training. With 3 or more speakers dev and test get at least one
    each; with fewer, everything is train."""
    n = len(speakers)
    n_dev = n_test = 0
    if n >= 3:
        n_dev = max(1, round(n * SPLIT_FRACTIONS[1]))
        n_test = max(1, round(n * SPLIT_FRACTIONS[2]))
    order = np.random.default_rng([seed, 0x5B1]).permutation(n)
    splits = {}
    for rank, index in enumerate(order):
        splits[speakers[index]] = "test" if rank < n_test else "dev" if rank < n_test + n_dev else "train"
    return {s: splits[s] for s in speakers}


def espeak_binary() -> str:
    """Path of espeak-ng, or a FileNotFoundError that says how to install it."""
    path = shutil.which("espeak-ng")
    if path is None:
        raise FileNotFoundError(_INSTALL_HINT)
    return path


def espeak_version(binary: str) -> str:
    """The version line espeak-ng prints, recorded so a corpus says what made it."""
    out = subprocess.run([binary, "--version"], capture_output=True, text=True, check=False).stdout
    return " ".join(out.split()[:4]) if out else "unknown"  # drop the data path: machine specific


@dataclass(frozen=True)
class _Job:
    """One utterance to synthesise; everything needed to redo it identically."""

    utt_id: str
    text: str
    label: str
    speaker: str
    voice: Voice
    seed: tuple[int, int, int]
    path: Path


def _synthesise(binary: str, voice: Voice, text: str, rng: np.random.Generator) -> np.ndarray:
    """espeak-ng audio for ``text`` at 16 kHz as float32, trimmed, padded, normalised.

    Pitch and rate are jittered a little per utterance: repeats of a keyword by the same
    speaker would otherwise be identical files, which teaches a model nothing.
    """
    pitch = int(np.clip(voice.pitch + rng.integers(-4, 5), 0, 99))
    speed = int(round(voice.speed * rng.uniform(0.93, 1.07)))
    cmd = [binary, "-v", voice.espeak_name, "-p", str(pitch), "-s", str(speed), "-a", str(voice.amplitude), "--stdout"]
    # Text on stdin, not argv, so no sentence can be mistaken for an option.
    result = subprocess.run(cmd, input=text.encode(), capture_output=True, check=False)
    if result.returncode != 0 or len(result.stdout) <= 44:
        detail = result.stderr.decode(errors="replace").strip() or "no audio produced"
        raise RuntimeError(f"espeak-ng failed for voice {voice.espeak_name!r} and text {text!r}: {detail}")
    audio, rate = sf.read(io.BytesIO(result.stdout), dtype="float32")
    audio = soxr.resample(audio, rate, SAMPLE_RATE, quality="HQ")

    peak = float(np.max(np.abs(audio)))
    if peak == 0.0:
        raise RuntimeError(f"espeak-ng produced silence for voice {voice.espeak_name!r} and text {text!r}")
    loud = np.flatnonzero(np.abs(audio) >= peak * 10 ** (TRIM_DB / 20))
    margin = int(0.01 * SAMPLE_RATE)  # keep faint onsets/decays just past the threshold
    audio = audio[max(0, loud[0] - margin) : loud[-1] + 1 + margin]
    pad = np.zeros(int(PAD_S * SAMPLE_RATE), dtype=np.float32)
    audio = np.concatenate([pad, audio * (PEAK / peak), pad])
    if voice.noise_db is not None:
        audio = audio + rng.standard_normal(len(audio)).astype(np.float32) * np.float32(10 ** (voice.noise_db / 20))
    return audio


def _run_job(binary: str, job: _Job) -> Utterance:
    audio = _synthesise(binary, job.voice, job.text, np.random.default_rng(list(job.seed)))
    pcm = np.clip(np.round(audio * 32767.0), -32768, 32767).astype(np.int16)
    job.path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(job.path, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    return Utterance(
        id=job.utt_id,
        path=str(job.path),
        duration=len(pcm) / SAMPLE_RATE,
        sample_rate=SAMPLE_RATE,
        speaker=job.speaker,
        transcript=job.text,
        label=job.label,
    )


def _speaker_jobs(
    audio_dir: Path, speaker: str, index: int, voice: Voice, seed: int, n_keywords: int, n_sentences: int
) -> list[_Job]:
    """The utterances one speaker records: keyword rounds (every keyword once, then two
    unknown words) and a seeded choice of sentences."""
    rng = np.random.default_rng([seed, index, 0xC0DE])
    unknown = [UNKNOWN_WORDS[i] for i in rng.permutation(len(UNKNOWN_WORDS))]
    words: list[str] = []
    while len(words) < n_keywords:
        round_no = len(words) // (len(KEYWORDS) + 2)
        words += KEYWORDS
        words += [unknown[(2 * round_no + k) % len(unknown)] for k in range(2)]
    words = words[:n_keywords]
    sentences: list[str] = []
    while len(sentences) < n_sentences:  # cycle seeded permutations if more are asked than exist
        sentences += [SENTENCES[i] for i in rng.permutation(len(SENTENCES))]
    sentences = sentences[:n_sentences]

    jobs = []
    for j, word in enumerate(words):
        utt_id = f"{speaker}_kw{j:03d}_{word}"
        label = word if word in KEYWORDS else UNKNOWN_LABEL
        jobs.append(_Job(utt_id, word, label, speaker, voice, (seed, index, j), audio_dir / speaker / f"{utt_id}.wav"))
    for j, text in enumerate(sentences):
        utt_id = f"{speaker}_sent{j:03d}"
        seq = (seed, index, n_keywords + j)
        jobs.append(_Job(utt_id, text, "", speaker, voice, seq, audio_dir / speaker / f"{utt_id}.wav"))
    return jobs


def _prepare_out_dir(out_dir: Path) -> None:
    """Reuse a folder only if empty or a previous synth corpus (whose audio is replaced,
    so no stale speakers linger); never clear a folder this module did not write."""
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir}: output path exists and is not a folder")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if not (out_dir / "corpus.json").is_file():
            raise ValueError(f"{out_dir}: folder is not empty and holds no synth corpus (corpus.json); choose another")
        shutil.rmtree(out_dir / "audio", ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)


def _write_speakers(path: Path, names: Sequence[str], voices: Sequence[Voice], splits: dict[str, str]) -> None:
    lines = ["speaker\tvoice\tvariant\tpitch\tspeed\tamplitude\tnoise_db\tsplit"]
    for name, v in zip(names, voices, strict=True):
        noise = "" if v.noise_db is None else f"{v.noise_db:.1f}"
        lines.append(f"{name}\t{v.voice}\t{v.variant}\t{v.pitch}\t{v.speed}\t{v.amplitude}\t{noise}\t{splits[name]}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def build_corpus(
    out_dir: str | Path,
    speakers: int,
    seed: int,
    keywords_per_speaker: int = 36,
    sentences_per_speaker: int = 30,
    jobs: int | None = None,
) -> Path:
    """Synthesise the corpus into ``out_dir`` and return its manifest path.

    ``keywords_per_speaker`` counts keyword-task utterances; the default 36 is each of the
    10 keywords three times plus six unknown words. ``jobs`` espeak-ng processes run at
    once (default: one per CPU).
    """
    if keywords_per_speaker < 0 or sentences_per_speaker < 0:
        raise ValueError("keywords_per_speaker and sentences_per_speaker must be >= 0")
    if keywords_per_speaker + sentences_per_speaker == 0:
        raise ValueError("keywords_per_speaker and sentences_per_speaker are both 0: nothing to synthesise")
    if jobs is not None and jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    binary = espeak_binary()
    voices = speaker_voices(speakers, seed)
    out_dir = Path(out_dir)
    _prepare_out_dir(out_dir)

    width = max(3, len(str(speakers - 1)))
    names = [f"spk{i:0{width}d}" for i in range(speakers)]
    splits = speaker_splits(names, seed)
    audio_dir = out_dir / "audio"
    work = [
        job
        for i, (name, voice) in enumerate(zip(names, voices, strict=True))
        for job in _speaker_jobs(audio_dir, name, i, voice, seed, keywords_per_speaker, sentences_per_speaker)
    ]
    # Threads suffice: the heavy lifting is in espeak-ng processes and in soxr/numpy.
    pool = ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1)
    try:
        utterances = list(pool.map(lambda job: _run_job(binary, job), work))
    finally:  # on the first failure, drop the queued utterances instead of finishing them
        pool.shutdown(cancel_futures=True)
    utterances = [dataclasses.replace(u, split=splits[u.speaker]) for u in utterances]

    manifest = write_manifest(utterances, out_dir / "manifest.tsv")
    _write_speakers(out_dir / "speakers.tsv", names, voices, splits)
    split_names = ("train", "dev", "test")
    info = {
        "generator": "fedspeech.data.synth",
        "seed": seed,
        "espeak_ng": espeak_version(binary),
        "sample_rate": SAMPLE_RATE,
        "speakers": speakers,
        "speakers_per_split": {s: sum(v == s for v in splits.values()) for s in split_names},
        "keywords_per_speaker": keywords_per_speaker,
        "sentences_per_speaker": sentences_per_speaker,
        "utterances": len(utterances),
        "utterances_per_split": {s: sum(u.split == s for u in utterances) for s in split_names},
        "keyword_utterances": sum(bool(u.label) for u in utterances),
        "sentence_utterances": sum(not u.label for u in utterances),
        "hours": round(sum(u.duration for u in utterances) / 3600, 4),
        "keywords": list(KEYWORDS),
        "unknown_label": UNKNOWN_LABEL,
    }
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return manifest


# ----------------------------------------------------------------- Speech Commands layout

# Non-English espeak-ng voices reading the English keywords: accents none of the built-in
# corpus's English voices have, so a test on these speakers is a test on unseen voices.
FOREIGN_ACCENTS: tuple[str, ...] = ("de", "fr-fr", "es", "it", "nl", "pl", "sv", "pt", "cs", "hu", "fi", "ro")
SC_CLIP_S = 1.0  # Speech Commands clips are one second long
SC_SNR_DB_RANGE = (5.0, 20.0)  # coloured background noise, by SNR to the speech (built-in: faint white noise)


def _coloured_noise(length: int, rng: np.random.Generator) -> np.ndarray:
    """Pink-ish or brown-ish noise (spectrum ~ 1/f^a, a in [0.8, 2]), unit RMS: unlike the
    built-in corpus's white noise."""
    exponent = rng.uniform(0.8, 2.0)
    spectrum = np.fft.rfft(rng.standard_normal(length))
    freqs = np.fft.rfftfreq(length, 1 / SAMPLE_RATE)
    spectrum *= 1.0 / np.maximum(freqs, 20.0) ** (exponent / 2)
    noise = np.fft.irfft(spectrum, n=length)
    return (noise / (np.sqrt(np.mean(noise**2)) + 1e-12)).astype(np.float32)


def build_speech_commands_like(
    out_dir: str | Path, speakers: int, seed: int, repeats: int = 2, jobs: int | None = None
) -> Path:
    """Keyword clips in the Speech Commands v0.02 layout, spoken by voices and with noise
    unlike the built-in corpus, to test that results carry over to a corpus the model has
    not heard (read back with ``fedspeech corpus import speech_commands``).

    Layout: ``out_dir/WORD/SPEAKER_nohash_N.wav`` (1 s, 16 kHz, the word at a random
    offset), ``validation_list.txt`` and ``testing_list.txt`` (whole speakers, about 10%
    each) and ``_background_noise_/`` with a few noise files. Each speaker says every
    keyword and unknown word ``repeats`` times. Deterministic for ``seed``. Returns
    ``out_dir``.
    """
    if speakers < 1 or repeats < 1:
        raise ValueError(f"speakers and repeats must be >= 1, got {speakers} and {repeats}")
    binary = espeak_binary()
    out_dir = Path(out_dir)
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / "corpus.json").is_file():
        raise ValueError(f"{out_dir}: folder is not empty and holds no synthetic corpus (corpus.json)")
    shutil.rmtree(out_dir, ignore_errors=True)
    out_dir.mkdir(parents=True)
    rng = np.random.default_rng([seed, 0x5C])
    names = [f"{int(rng.integers(16**8)):08x}" for _ in range(speakers)]  # SC-style speaker hashes
    voices = []
    for i in range(speakers):
        accent = FOREIGN_ACCENTS[i % len(FOREIGN_ACCENTS)]
        voices.append(
            Voice(
                accent,
                VARIANTS[int(rng.integers(len(VARIANTS)))],
                int(rng.integers(*PITCH_RANGE)),
                int(rng.integers(*SPEED_RANGE)),
                100,
            )
        )
    splits = speaker_splits(names, seed)
    clip = int(SC_CLIP_S * SAMPLE_RATE)

    words = (*KEYWORDS, *UNKNOWN_WORDS)

    def record(task: tuple[int, int, int]) -> tuple[str, str]:
        index, word_index, take = task
        word = words[word_index]
        job_rng = np.random.default_rng([seed, index, word_index, take, 0x5C])
        audio = _synthesise(binary, voices[index], word, job_rng)[:clip]
        offset = int(job_rng.integers(0, clip - len(audio) + 1))
        placed = np.zeros(clip, dtype=np.float32)
        placed[offset : offset + len(audio)] = audio
        speech_rms = float(np.sqrt(np.mean(audio**2)))
        snr = job_rng.uniform(*SC_SNR_DB_RANGE)
        placed += _coloured_noise(clip, job_rng) * np.float32(speech_rms * 10 ** (-snr / 20))
        placed *= np.float32(PEAK / max(float(np.max(np.abs(placed))), 1e-6))
        relative = f"{word}/{names[index]}_nohash_{take}.wav"
        (out_dir / word).mkdir(exist_ok=True)
        pcm = np.clip(np.round(placed * 32767.0), -32768, 32767).astype(np.int16)
        sf.write(out_dir / relative, pcm, SAMPLE_RATE, subtype="PCM_16", format="WAV")
        return relative, splits[names[index]]

    tasks = [(i, w, take) for i in range(speakers) for w in range(len(words)) for take in range(repeats)]
    pool = ThreadPoolExecutor(max_workers=jobs or os.cpu_count() or 1)
    try:
        written = list(pool.map(record, tasks))
    finally:
        pool.shutdown(cancel_futures=True)
    for split, list_name in (("dev", "validation_list.txt"), ("test", "testing_list.txt")):
        (out_dir / list_name).write_text("".join(f"{rel}\n" for rel, s in written if s == split), encoding="utf-8")
    noise_dir = out_dir / "_background_noise_"
    noise_dir.mkdir()
    for k in range(3):
        noise = _coloured_noise(10 * SAMPLE_RATE, np.random.default_rng([seed, 0xB6, k])) * np.float32(0.1)
        sf.write(noise_dir / f"coloured_noise_{k}.wav", noise, SAMPLE_RATE, subtype="PCM_16", format="WAV")
    info = {
        "generator": "fedspeech.data.synth.build_speech_commands_like",
        "seed": seed,
        "speakers": speakers,
        "repeats": repeats,
        "accents": sorted({v.voice for v in voices}),
        "clips": len(written),
        "snr_db_range": list(SC_SNR_DB_RANGE),
        "espeak_ng": espeak_version(binary),
    }
    (out_dir / "corpus.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    return out_dir
