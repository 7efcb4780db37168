"""``fedspeech corpus …`` and ``fedspeech partition`` through the real entry point."""

from __future__ import annotations

import importlib
import sys
import types
import warnings
from pathlib import Path

import pytest

import fedspeech.cli
from fedspeech.data.manifest import Utterance, read_manifest, write_manifest
from fedspeech.data.partition import Partition


@pytest.fixture
def cli(monkeypatch):
    """``fedspeech.cli.main``; limited to the data commands while other packages' CLIs are missing."""
    missing = []
    for name in fedspeech.cli._COMMAND_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError:
            missing.append(name)
    if missing:
        warnings.warn(f"testing without {', '.join(missing)} (not written yet)", stacklevel=1)
        monkeypatch.setattr(fedspeech.cli, "_COMMAND_MODULES", ("fedspeech.data.cli",))
    return fedspeech.cli.main


def fake_utterances(speakers: int = 12, per_speaker: int = 5) -> list[Utterance]:
    """Manifest rows whose audio does not exist: partitioning must not open audio."""
    utts = []
    for s in range(speakers):
        split = "dev" if s == speakers - 1 else "train"
        for i in range(per_speaker):
            utts.append(
                Utterance(
                    id=f"s{s:02d}_{i}",
                    path=f"/does/not/exist/s{s:02d}_{i}.wav",
                    duration=1.0 + 0.1 * ((s * per_speaker + i) % 7),
                    sample_rate=16000,
                    speaker=f"s{s:02d}",
                    label=("yes", "no", "up")[(s + i) % 3],
                    split=split,
                )
            )
    return utts


@pytest.fixture
def manifest(tmp_path) -> Path:
    return write_manifest(fake_utterances(), tmp_path / "corpus" / "manifest.tsv")


@pytest.mark.parametrize(("scheme", "extra"), [("speaker", []), ("iid", []), ("dirichlet", ["--alpha", "0.5"])])
def test_partition_command_writes_file_and_prints_table(cli, manifest, tmp_path, capsys, scheme, extra):
    out = tmp_path / "parts" / f"{scheme}.json"
    argv = ["partition", "--manifest", str(manifest), "--clients", "4", "--scheme", scheme, "--seed", "3"]
    assert cli([*argv, *extra, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "client" in printed and "speakers" in printed and str(out.name) in printed

    partition = Partition.load(out)
    assert (partition.scheme, partition.seed, partition.num_clients, partition.split) == (scheme, 3, 4, "train")
    assert Path(partition.manifest).resolve() == manifest.resolve()
    train = sorted(u.id for u in read_manifest(manifest) if u.split == "train")
    assert sorted(i for client in partition.clients for i in client) == train
    assert all(partition.clients)


def test_partition_command_on_another_split(cli, manifest, tmp_path):
    out = tmp_path / "dev.json"
    argv = ["partition", "--manifest", str(manifest), "--clients", "2", "--scheme", "iid", "--split", "dev"]
    assert cli([*argv, "--out", str(out)]) == 0
    dev = {u.id for u in read_manifest(manifest) if u.split == "dev"}
    assert {i for client in Partition.load(out).clients for i in client} == dev


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--scheme", "dirichlet"], "--scheme dirichlet needs --alpha"),
        (["--scheme", "iid", "--alpha", "0.1"], "--alpha only applies to --scheme dirichlet"),
        (["--scheme", "speaker", "--clients", "50"], "11 speakers for 50 clients"),
    ],
)
def test_partition_command_reports_bad_input_in_one_line(cli, manifest, tmp_path, capsys, args, message):
    argv = ["partition", "--manifest", str(manifest), "--clients", "4", "--out", str(tmp_path / "p.json"), *args]
    assert cli(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.startswith("fedspeech partition: error:") and "Traceback" not in err
    assert not (tmp_path / "p.json").exists()


def test_partition_command_missing_manifest_and_bad_counts(cli, tmp_path, capsys):
    absent = tmp_path / "absent.tsv"
    argv = ["partition", "--manifest", str(absent), "--clients", "2", "--scheme", "iid", "--out", str(tmp_path / "p")]
    assert cli(argv) == 2
    assert f"{absent}: manifest not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["partition", "--manifest", str(absent), "--clients", "0", "--scheme", "iid", "--out", "p.json"])
    assert "must be a positive integer" in capsys.readouterr().err


# ------------------------------------------------------------------ corpus synth


def test_corpus_synth_passes_only_given_options(cli, tmp_path, capsys, monkeypatch):
    calls = []

    def build_corpus(out_dir, speakers, seed, **options):
        calls.append((Path(out_dir), speakers, seed, options))
        return write_manifest(fake_utterances(speakers=3), Path(out_dir) / "manifest.tsv")

    monkeypatch.setitem(sys.modules, "fedspeech.data.synth", types.SimpleNamespace(build_corpus=build_corpus))
    assert cli(["corpus", "synth", "--out", str(tmp_path / "a"), "--speakers", "3", "--seed", "7"]) == 0
    argv = ["corpus", "synth", "--out", str(tmp_path / "b"), "--speakers", "3", "--keywords-per-speaker", "0"]
    assert cli([*argv, "--sentences-per-speaker", "4", "--jobs", "2"]) == 0
    assert calls == [
        (tmp_path / "a", 3, 7, {}),
        (tmp_path / "b", 3, 0, {"keywords_per_speaker": 0, "sentences_per_speaker": 4, "jobs": 2}),
    ]
    printed = capsys.readouterr().out
    assert "train" in printed and "dev" in printed and "hours" in printed and "manifest.tsv" in printed


def test_corpus_synth_then_partition_end_to_end(cli, tmp_path, capsys):
    pytest.importorskip("fedspeech.data.synth")
    from fedspeech.data.synth import espeak_binary

    try:
        espeak_binary()
    except Exception as error:  # no espeak-ng on this machine
        pytest.skip(f"espeak-ng unavailable: {error}")
    corpus = tmp_path / "synth"
    argv = ["corpus", "synth", "--out", str(corpus), "--speakers", "6", "--seed", "1"]
    assert cli([*argv, "--keywords-per-speaker", "2", "--sentences-per-speaker", "1", "--jobs", "2"]) == 0
    assert "train" in capsys.readouterr().out
    manifest = corpus / "manifest.tsv"
    argv = ["partition", "--manifest", str(manifest), "--clients", "2", "--scheme", "dirichlet", "--alpha", "1"]
    assert cli([*argv, "--out", str(corpus / "p.json")]) == 0
    partition = Partition.load(corpus / "p.json")
    train = {u.id for u in read_manifest(manifest) if u.split == "train"}
    assert {i for client in partition.clients for i in client} == train


# ------------------------------------------------------------------ corpus import


def test_corpus_import_uses_the_named_reader(cli, tmp_path, capsys, monkeypatch):
    seen = []

    def reader(root):
        seen.append(Path(root))
        return fake_utterances(speakers=2, per_speaker=2)

    fake = types.SimpleNamespace(READERS={"librispeech": reader, "common_voice": None, "speech_commands": None})
    monkeypatch.setitem(sys.modules, "fedspeech.data.readers", fake)
    root = tmp_path / "LibriSpeech"
    root.mkdir()
    out = tmp_path / "manifests" / "libri.tsv"
    assert cli(["corpus", "import", "librispeech", str(root), "--out", str(out)]) == 0
    assert seen == [root]
    assert [u.id for u in read_manifest(out)] == [u.id for u in fake_utterances(speakers=2, per_speaker=2)]
    assert "libri.tsv" in capsys.readouterr().out

    assert cli(["corpus", "import", "librispeech", str(tmp_path / "nowhere"), "--out", str(out)]) == 2
    assert "corpus root folder not found" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli(["corpus", "import", "timit", str(root), "--out", str(out)])


def test_corpus_import_choices_match_the_readers():
    readers = pytest.importorskip("fedspeech.data.readers")
    from fedspeech.data.cli import IMPORTABLE_CORPORA

    assert set(IMPORTABLE_CORPORA) == set(readers.READERS)


def test_corpus_import_speech_commands_end_to_end(cli, tmp_path):
    pytest.importorskip("fedspeech.data.readers")
    import numpy as np
    import soundfile

    root = tmp_path / "speech_commands"
    for word in ("yes", "no"):
        (root / word).mkdir(parents=True)
        for speaker in ("aaaa1111", "bbbb2222", "cccc3333"):
            soundfile.write(root / word / f"{speaker}_nohash_0.wav", np.zeros(1600, dtype="float32"), 16000)
    (root / "validation_list.txt").write_text("yes/cccc3333_nohash_0.wav\n")
    (root / "testing_list.txt").write_text("no/cccc3333_nohash_0.wav\n")
    out = tmp_path / "sc.tsv"
    assert cli(["corpus", "import", "speech_commands", str(root), "--out", str(out)]) == 0
    utts = read_manifest(out)
    assert len(utts) == 6 and {u.label for u in utts} == {"yes", "no"}
    assert sorted(u.split for u in utts) == ["dev", "test", "train", "train", "train", "train"]
    part = tmp_path / "sc.json"
    argv = ["partition", "--manifest", str(out), "--clients", "2", "--scheme", "speaker", "--out", str(part)]
    assert cli(argv) == 0
    speakers = [{i.split("_")[1] for i in client} for client in Partition.load(part).clients]
    assert not speakers[0] & speakers[1]
