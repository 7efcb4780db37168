"""``fedspeech demo``: the end-to-end main job on the built-in corpus.

Steps (each a public job you can also run alone): build the espeak-ng corpus, split it
into speaker-disjoint clients and print the per-client table, then a short federated
wav2vec 2.0 pretraining of the tiny model (in-process Flower runner) with its round log
and plot. Re-running reuses what is already there (the corpus and partition are
deterministic; a finished pretraining run is kept, an interrupted one resumes).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

log = logging.getLogger(__name__)


def run_demo(out: Path, speakers: int, clients: int, rounds: int, seed: int) -> dict:
    from rich.console import Console

    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import client_summary, make_partition, summary_table
    from fedspeech.data.synth import build_corpus

    console = Console()
    out.mkdir(parents=True, exist_ok=True)
    corpus = out / "corpus"
    manifest = corpus / "manifest.tsv"
    if not manifest.is_file():
        console.rule("1. built-in corpus (espeak-ng)")
        build_corpus(corpus, speakers=speakers, seed=seed, keywords_per_speaker=24, sentences_per_speaker=12)
    utterances = read_manifest(manifest)
    console.print(f"corpus: {len(utterances)} utterances, {len({u.speaker for u in utterances})} speakers ({manifest})")

    console.rule(f"2. speaker-disjoint partition into {clients} clients")
    partition = make_partition(utterances, "speaker", clients, seed=seed, manifest=str(manifest))
    partition_path = partition.save(out / f"partition_speaker_{clients}.json")
    console.print(summary_table(client_summary(partition, utterances), title=f"clients ({partition_path})"))
    result = {"manifest": str(manifest), "partition": str(partition_path)}
    if rounds <= 0:
        return result

    from fedspeech.apps.pretrain.run import run_pretraining
    from fedspeech.apps.pretrain.settings import PretrainSettings
    from fedspeech.federated import checkpoints
    from fedspeech.federated.plots import plot_validation_curves
    from fedspeech.ssl.methods import get_method

    console.rule(f"3. federated wav2vec 2.0 pretraining (tiny, FedAvg, {rounds} rounds, in-process Flower)")
    run_dir = out / "pretrain_fedavg"
    done = checkpoints.completed_rounds(run_dir)
    # The default recipe (client batch 1, lr 2e-3) with 3 local epochs per round, so that a
    # three-round demo already leaves the contrastive loss's chance level.
    settings = PretrainSettings(
        manifest=str(manifest),
        partition=str(partition_path),
        out_dir=str(run_dir),
        model="tiny",
        strategy="fedavg",
        rounds=rounds,
        local_epochs=3,
        max_seconds=1.5,
        seed=seed,
        resume=bool(done),
    )
    records = run_pretraining(settings) if not done or done[-1] < rounds else None
    from fedspeech.federated.roundlog import read_rounds

    records = read_rounds(run_dir)
    import math

    chance = math.log(1 + get_method(settings).objective.num_negatives)
    for r in records:
        console.print(
            f"round {r['round']}: clients {r['sampled']}, train loss {r['train_loss']:.3f}, "
            f"val loss {r['val_loss']:.3f} (chance {chance:.3f}), {r['round_seconds']:.1f} s"
        )
    plot = plot_validation_curves([run_dir], out / "val_loss.png", labels=["FedAvg"])
    console.print(f"validation-loss plot: {plot}")
    result.update(run=str(run_dir), plot=str(plot))
    return result


def _demo(args: argparse.Namespace) -> int:
    import torch

    # The tiny model gains little from a second thread and loses a lot when cores are shared;
    # `fedspeech --threads N demo` overrides.
    if not args.threads:
        torch.set_num_threads(1)
    run_demo(Path(args.out), args.speakers, args.clients, args.rounds, args.seed)
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="end-to-end demo on the built-in corpus")
    parser.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    parser.add_argument("--speakers", type=int, default=20, help="speakers in the built-in corpus")
    parser.add_argument("--clients", type=int, default=10, help="federated clients (speaker-disjoint)")
    parser.add_argument("--rounds", type=int, default=3, help="pretraining rounds (0 = data steps only)")
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=_demo)
