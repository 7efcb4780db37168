"""``fedspeech corpus …`` and ``fedspeech partition``: make a manifest, then split it.

Every command ends by printing what it made (utterances, speakers, hours), so a wrong
corpus root or an unbalanced partition shows up before hours of training are spent.
Heavy modules (the synthesiser, corpus readers, numpy, rich) load inside the commands.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from fedspeech.data.manifest import Utterance

# Kept here rather than read from fedspeech.data.readers so that --help needs no import.
IMPORTABLE_CORPORA = ("common_voice", "librispeech", "speech_commands")
_SPLITS = ("train", "dev", "test")  # mirrors fedspeech.data.manifest.SPLITS


def _int_at_least(minimum: int, what: str) -> Callable[[str], int]:
    """An argparse ``type`` whose error says what was expected."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


_positive_int = _int_at_least(1, "a positive integer")
_non_negative_int = _int_at_least(0, "a non-negative integer")


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``corpus synth``, ``corpus import`` and ``partition``."""
    corpus = subparsers.add_parser("corpus", help="build or import a corpus manifest")
    corpus_commands = corpus.add_subparsers(dest="corpus_command", required=True, metavar="ACTION")

    synth = corpus_commands.add_parser("synth", help="generate the built-in synthetic speech corpus")
    synth.add_argument("--out", required=True, type=Path, metavar="DIR", help="corpus folder (audio + manifest)")
    synth.add_argument("--speakers", required=True, type=_positive_int, metavar="N", help="number of speakers")
    synth.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    synth.add_argument("--keywords-per-speaker", type=_non_negative_int, metavar="K", help="keyword clips per speaker")
    synth.add_argument("--sentences-per-speaker", type=_non_negative_int, metavar="M", help="sentences per speaker")
    synth.add_argument("--jobs", type=_positive_int, metavar="J", help="parallel worker processes")
    synth.add_argument(
        "--layout",
        choices=("builtin", "speech_commands"),
        default="builtin",
        help="builtin: the manifest corpus (keywords + sentences, English voices); speech_commands: "
        "keyword clips in the Speech Commands layout with foreign-accent voices and coloured "
        "noise, to test on unseen voices (import it with `corpus import speech_commands`)",
    )
    synth.add_argument(
        "--repeats",
        type=_positive_int,
        default=2,
        metavar="R",
        help="speech_commands layout: takes of every word per speaker (default 2)",
    )
    synth.set_defaults(func=_run_synth)

    imported = corpus_commands.add_parser("import", help="write a manifest for a corpus already on disk")
    imported.add_argument("corpus", choices=IMPORTABLE_CORPORA, help="corpus layout")
    imported.add_argument("root", type=Path, metavar="ROOT", help="the corpus's top folder")
    imported.add_argument("--out", required=True, type=Path, metavar="MANIFEST", help="manifest TSV to write")
    imported.set_defaults(func=_run_import)

    partition = subparsers.add_parser("partition", help="split a manifest's utterances across federated clients")
    partition.add_argument("--manifest", required=True, type=Path, metavar="M", help="manifest TSV")
    partition.add_argument("--clients", required=True, type=_positive_int, metavar="N", help="number of clients")
    partition.add_argument(
        "--scheme", required=True, choices=("speaker", "iid", "dirichlet"), help="how to split (see docs/methods.md §5)"
    )
    partition.add_argument("--alpha", type=float, metavar="A", help="Dirichlet concentration (dirichlet only)")
    partition.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    partition.add_argument("--split", default="train", choices=_SPLITS, help="which split to partition (default train)")
    partition.add_argument("--out", required=True, type=Path, metavar="PARTITION.json", help="file to write")
    partition.set_defaults(func=_run_partition)


def _run_synth(args: argparse.Namespace) -> int:
    from fedspeech.data.manifest import read_manifest

    if args.layout == "speech_commands":
        from fedspeech.data.synth import build_speech_commands_like

        if args.keywords_per_speaker is not None or args.sentences_per_speaker is not None:
            raise ValueError(
                "--keywords-per-speaker/--sentences-per-speaker: not for --layout speech_commands "
                "(every speaker says every word --repeats times)"
            )
        root = build_speech_commands_like(args.out, args.speakers, args.seed, repeats=args.repeats, jobs=args.jobs)
        print(
            f"wrote a Speech Commands layout corpus in {root}; "
            f"import it with `fedspeech corpus import speech_commands {root} --out MANIFEST`"
        )
        return 0

    from fedspeech.data.synth import build_corpus

    optional = {
        "keywords_per_speaker": args.keywords_per_speaker,
        "sentences_per_speaker": args.sentences_per_speaker,
        "jobs": args.jobs,
    }
    given = {name: value for name, value in optional.items() if value is not None}
    manifest = build_corpus(args.out, args.speakers, args.seed, **given)
    _print_corpus_summary(read_manifest(manifest))
    print(f"wrote {manifest}")
    return 0


def _run_import(args: argparse.Namespace) -> int:
    from fedspeech.data.manifest import write_manifest
    from fedspeech.data.readers import READERS

    if not args.root.is_dir():
        raise FileNotFoundError(f"{args.root}: corpus root folder not found")
    if args.corpus not in READERS:
        raise ValueError(f"no reader for corpus {args.corpus!r}; known: {', '.join(sorted(READERS))}")
    utterances = READERS[args.corpus](args.root)
    if not utterances:
        raise ValueError(f"{args.root}: found no {args.corpus} utterances there")
    manifest = write_manifest(utterances, args.out)
    _print_corpus_summary(utterances)
    print(f"wrote {manifest}")
    return 0


def _run_partition(args: argparse.Namespace) -> int:
    from rich.console import Console

    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import client_summary, make_partition, summary_table

    # Checked here too so the message names the flags rather than the function arguments.
    if args.scheme == "dirichlet" and args.alpha is None:
        raise ValueError("--scheme dirichlet needs --alpha A (the Dirichlet concentration, e.g. 0.5)")
    if args.scheme != "dirichlet" and args.alpha is not None:
        raise ValueError(f"--alpha only applies to --scheme dirichlet, not {args.scheme}")
    utterances = read_manifest(args.manifest)
    partition = make_partition(
        utterances,
        args.scheme,
        args.clients,
        args.seed,
        alpha=args.alpha,
        split=args.split,
        manifest=str(args.manifest),
    )
    rows = client_summary(partition, utterances)
    path = partition.save(args.out)
    title = f"{args.scheme} partition of {args.split!r} over {args.clients} clients (seed {args.seed})"
    Console().print(summary_table(rows, title=title))
    print(f"wrote {path}")  # plain print: rich would wrap a long path
    return 0


def _print_corpus_summary(utterances: Sequence[Utterance]) -> None:
    """Utterances, speakers and hours per split."""
    from rich.console import Console
    from rich.table import Table

    table = Table()
    for name in ("split", "utterances", "speakers", "hours", "seconds"):
        table.add_column(name, justify="left" if name == "split" else "right")
    present = [s for s in _SPLITS if any(u.split == s for u in utterances)]
    for split in [*present, "all"]:
        chosen = [u for u in utterances if split == "all" or u.split == split]
        seconds = sum(u.duration for u in chosen)
        speakers = len({u.speaker for u in chosen})
        table.add_row(split, str(len(chosen)), str(speakers), f"{seconds / 3600:.3f}", f"{seconds:.1f}")
    Console().print(table)
