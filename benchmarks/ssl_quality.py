"""Does self-supervised pretraining help? Random init vs centralised vs federated SSL.

One command builds the built-in corpus, pretrains a tiny wav2vec 2.0 centrally and
federated (FedAvg, 10 speaker clients, all of them every round — the gao10 setting), then
fine-tunes every backbone with the *same* recipe and prints one table (keyword accuracy,
CER, WER, pretraining wall time) with the verdicts:

    .venv/bin/python benchmarks/ssl_quality.py [--quick] [--work DIR]

The set-up is the usual low-resource SSL one: pretraining sees the audio of *all* training
speakers without labels, fine-tuning gets labels for only ``--labelled-speakers`` of them,
and every number is measured on the test split's unseen speakers. Fair comparison: the
random-init baseline is the *same* untrained checkpoint folder the pretraining starts
from (same architecture, same initial weights), and every backbone is fine-tuned with the
same steps, batch size, learning rates, seed and freezing (the whole network, CNN included,
is trained: a frozen *random* CNN would handicap the baseline). ``--work`` caches the corpus
and the pretraining runs (keyed by their settings), so a rerun only redoes what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

# The recipe, full and --quick. Model overrides go into the shared untrained checkpoint.
# pretrain_per_speaker: unlabelled utterances per training speaker that pretraining sees;
# local_epochs: passes over them per round (both runs see the same examples: centralised
# draws as many per round from the pooled data). FULL gives the centralised run 1440
# optimiser steps of batch 8 x 1.5 s and every federated client 144 local steps.
FULL = dict(speakers=40, pretrain_per_speaker=30, rounds=6, local_epochs=3, batch_size=8, max_seconds=1.5,
            lr=2e-3, warmup_rounds=2, labelled_speakers=6, kws_steps=120, asr_steps=300, dev_cap=48)
QUICK = dict(speakers=20, pretrain_per_speaker=8, rounds=2, local_epochs=1, batch_size=8, max_seconds=1.5,
             lr=2e-3, warmup_rounds=1, labelled_speakers=4, kws_steps=20, asr_steps=20, dev_cap=16)
# feature_penalty_weight=0: the paper's weight 10 (and 1, and 0.1 for its first ~200 steps)
# keeps a tiny model's contrastive loss at chance — the penalty shrinks the CNN output, the
# context network collapses to a constant vector (docs/evaluation.md). Everything else is
# the paper's objective (65% span masking of length 10, 100 distractors, Gumbel 2 -> 0.5).
MODEL_OVERRIDES: dict = {"feature_penalty_weight": 0.0}
CLIENTS = 10
# ASR gets its own, higher learning rates and 300 steps: at 3e-4/2e-3 and 120 steps CTC
# never left the all-blank stage (CER ~1 for every backbone), so CER could not discriminate.
FINETUNE = dict(lr_backbone=3e-4, lr_head=2e-3, asr_lr_backbone=5e-4, asr_lr_head=5e-3, freeze_cnn=False,
                kws_batch=16, asr_batch=8, kws_max_seconds=1.0, asr_max_seconds=4.0)


def _key(payload: dict) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:10]


def corpus(work: Path, speakers: int, seed: int) -> Path:
    """The built-in corpus, synthesised once per (speakers, seed) under ``work``."""
    from fedspeech.data.synth import build_corpus

    folder = work / f"corpus-{speakers}spk-seed{seed}"
    manifest = folder / "manifest.tsv"
    if not manifest.is_file():
        if folder.exists():
            shutil.rmtree(folder)
        build_corpus(folder, speakers, seed)
    return manifest


def pretraining_manifest(manifest: Path, per_speaker: int, seed: int) -> Path:
    """The unlabelled pretraining pool: ``per_speaker`` utterances (keyword clips and
    sentences alike, labels unused) of every training speaker, plus the dev split for the
    validation loss. Fine-tuning still reads the full manifest."""
    import numpy as np

    from fedspeech.data.manifest import read_manifest, write_manifest

    out = manifest.parent / f"pretrain-{per_speaker}per-speaker.tsv"
    if not out.is_file():
        utterances = read_manifest(manifest)
        kept = [u for u in utterances if u.split == "dev"]
        for speaker in sorted({u.speaker for u in utterances if u.split == "train"}):
            own = sorted((u for u in utterances if u.speaker == speaker), key=lambda u: u.id)
            order = np.random.default_rng([seed, len(kept)]).permutation(len(own))[:per_speaker]
            kept.extend(own[i] for i in sorted(order))
        write_manifest(kept, out)
    return out


def untrained_checkpoint(work: Path, seed: int) -> Path:
    """An untrained wav2vec 2.0 (tiny + overrides) saved as an HF folder: the start of every
    pretraining run *and* the random-init baseline, so all rows share architecture and init."""
    import torch
    from transformers import Wav2Vec2ForPreTraining

    from fedspeech.models.configs import model_config

    folder = work / f"init-{_key({'overrides': MODEL_OVERRIDES, 'seed': seed})}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(seed)
        Wav2Vec2ForPreTraining(model_config("tiny", **MODEL_OVERRIDES)).save_pretrained(folder)
    return folder


def pretrain(kind: str, work: Path, manifest: Path, partition: Path, init: Path, recipe: dict, seed: int
             ) -> tuple[Path, float]:
    """Run (or reuse) one pretraining run; returns its last checkpoint and its wall time."""
    from fedspeech.federated import checkpoints, roundlog
    from fedspeech.federated.runners import run_centralised, run_pretraining
    from fedspeech.federated.settings import PretrainSettings

    fields = dict(manifest=str(manifest), partition=str(partition), model=str(init), method="wav2vec2",
                  strategy="fedavg", rounds=recipe["rounds"], clients_per_round=0,
                  local_epochs=recipe["local_epochs"], batch_size=recipe["batch_size"],
                  max_seconds=recipe["max_seconds"], lr=recipe["lr"], warmup_rounds=recipe["warmup_rounds"],
                  seed=seed, val_max_utterances=16, keep_checkpoints=1)
    out = work / f"{kind}-{_key({**fields, 'overrides': MODEL_OVERRIDES})}"
    timing = out / "wall_seconds.json"
    if timing.is_file():
        return checkpoints.latest_checkpoint(out), json.loads(timing.read_text())["seconds"]
    if out.exists():
        shutil.rmtree(out)
    settings = PretrainSettings(out_dir=str(out), **fields)
    started = time.perf_counter()
    run = run_centralised if kind == "centralised" else run_pretraining
    rounds = run(settings)
    seconds = time.perf_counter() - started
    losses = [r.get("val_loss") for r in roundlog.read_rounds(out)]
    print(f"  {kind}: {len(rounds)} rounds in {seconds:.0f} s; val loss by round "
          + " ".join(f"{v:.3f}" if v is not None else "-" for v in losses), flush=True)
    timing.write_text(json.dumps({"seconds": seconds}))
    return checkpoints.latest_checkpoint(out), seconds


def labelled_subset(utterances, count: int, seed: int):
    """Only ``count`` training speakers' labels are used for fine-tuning (seeded choice)."""
    import numpy as np

    speakers = sorted({u.speaker for u in utterances if u.split == "train"})
    chosen = set(np.random.default_rng([seed, 11]).permutation(speakers)[:count].tolist())
    return [u for u in utterances if u.split != "train" or u.speaker in chosen]


def finetune_cache(work: Path, backbone: Path, recipe: dict, seed: int) -> Path:
    """Where one backbone's fine-tuning results are kept, keyed by everything they depend on."""
    return work / f"finetune-{_key({'backbone': str(backbone), 'recipe': recipe, 'finetune': FINETUNE, 'seed': seed})}.json"


def _cap(utterances, count: int, seed: int):
    """A seeded subset of the dev split (epoch selection only), to bound evaluation time."""
    import numpy as np

    items = sorted(utterances, key=lambda u: u.id)
    return [items[i] for i in sorted(np.random.default_rng([seed, 5]).permutation(len(items))[:count])] or None


def finetune(backbone: Path, utterances, recipe: dict, seed: int) -> dict:
    """Keyword accuracy and CER/WER on the test speakers, one recipe for every backbone."""
    from fedspeech.downstream.finetune import finetune_asr, finetune_classifier
    from fedspeech.downstream.tasks import task_data

    common = dict(freeze_cnn=FINETUNE["freeze_cnn"], seed=seed)
    kws = task_data(utterances, "kws", seed=seed)
    kws_result = finetune_classifier(backbone, kws.train, kws.test, task="kws", dev_utts=_cap(kws.dev, recipe["dev_cap"], seed),
                                     epochs=1000, max_steps=recipe["kws_steps"], batch_size=FINETUNE["kws_batch"],
                                     max_seconds=FINETUNE["kws_max_seconds"], lr_backbone=FINETUNE["lr_backbone"],
                                     lr_head=FINETUNE["lr_head"], **common)
    asr = task_data(utterances, "asr", seed=seed)
    asr_result = finetune_asr(backbone, asr.train, asr.test, dev_utts=_cap(asr.dev, recipe["dev_cap"], seed), epochs=1000,
                              max_steps=recipe["asr_steps"], batch_size=FINETUNE["asr_batch"],
                              max_seconds=FINETUNE["asr_max_seconds"], lr_backbone=FINETUNE["asr_lr_backbone"],
                              lr_head=FINETUNE["asr_lr_head"], **common)
    return {"kws_accuracy": kws_result["accuracy"], "cer": asr_result["cer"], "wer": asr_result["wer"],
            "kws_train": kws_result["num_train"], "asr_train": asr_result["num_train"],
            "kws_test": kws_result["num_eval"], "asr_test": asr_result["num_eval"],
            "asr_example": asr_result["examples"][0] if asr_result["examples"] else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke version of the recipe")
    parser.add_argument("--work", default=None, help="cache folder for corpus and runs (default: a temp dir)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (1 measured faster than 2 for the tiny model on a loaded 2-core box)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="also draw the table as grouped bars (PNG)")
    args = parser.parse_args()

    import logging

    import torch

    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    recipe = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ssl_quality-"))
    work.mkdir(parents=True, exist_ok=True)
    print(f"work folder {work}; recipe {recipe}; model overrides {MODEL_OVERRIDES}; fine-tuning {FINETUNE}; "
          f"threads {args.threads}; load average {os.getloadavg()[0]:.1f}", flush=True)

    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import make_partition

    manifest = corpus(work, recipe["speakers"], args.seed)
    utterances = read_manifest(manifest)
    unlabelled = pretraining_manifest(manifest, recipe["pretrain_per_speaker"], args.seed)
    partition = unlabelled.with_suffix(f".speaker{CLIENTS}.json")
    if not partition.is_file():
        make_partition(read_manifest(unlabelled), "speaker", CLIENTS, seed=args.seed,
                       manifest=str(unlabelled)).save(partition)
    init = untrained_checkpoint(work, args.seed)
    print(f"corpus ready after {time.perf_counter() - started:.0f} s", flush=True)

    labelled = labelled_subset(utterances, recipe["labelled_speakers"], args.seed)
    rows = {}

    def evaluate(name: str, path: Path, seconds: float) -> None:
        cache = finetune_cache(work, path, recipe, args.seed)
        if cache.is_file():
            rows[name] = {**json.loads(cache.read_text()), "pretrain_seconds": seconds}
            print(f"  {name}: fine-tuning results reused from {cache}", flush=True)
            return
        t0 = time.perf_counter()
        result = {**finetune(path, labelled, recipe, args.seed), "finetune_seconds": 0.0}
        result["finetune_seconds"] = time.perf_counter() - t0
        cache.write_text(json.dumps(result, default=str))
        rows[name] = {**result, "pretrain_seconds": seconds}
        print(f"  fine-tuned {name} in {result['finetune_seconds']:.0f} s: {rows[name]}", flush=True)

    def val_losses(name: str, checkpoint: Path) -> None:
        from fedspeech.federated import roundlog

        losses = [r["val_loss"] for r in roundlog.read_rounds(checkpoint.parent.parent) if r.get("val_loss") is not None]
        if losses:
            rows[name]["val_loss"] = (losses[0], losses[-1])
            rows[name]["val_losses"] = losses

    evaluate("random init", init, 0.0)
    for kind, name in (("centralised", "centralised SSL"), ("federated", f"federated SSL (FedAvg, {CLIENTS} clients)")):
        checkpoint, seconds = pretrain(kind, work, unlabelled, partition, init, recipe, args.seed)
        evaluate(name, checkpoint, seconds)
        val_losses(name, checkpoint)
    total = time.perf_counter() - started
    report(rows, recipe, total)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        Path(args.json).write_text(json.dumps({"recipe": recipe, "finetune": FINETUNE, "rows": rows,
                                               "total_seconds": total}, indent=2, default=str) + "\n")


def plot(rows: dict, out: str) -> Path:
    """The table as bars, through ``fedspeech compare``'s plot."""
    from fedspeech.downstream.compare import plot_comparison

    flat = [{"backbone": name, "task": task, "score": r[key]}
            for name, r in rows.items() for task, key in (("kws", "kws_accuracy"), ("asr", "cer"))]
    return plot_comparison(flat, out)


# Single seed, so a difference must clear a noise margin before it counts as a win: two
# binomial standard errors of the baseline's keyword accuracy on the test clips, and a
# fixed 0.02 absolute for CER (a stated threshold, not a measured seed variance).
CER_MARGIN = 0.02


def kws_margin(accuracy: float, count: int) -> float:
    return 2 * (accuracy * (1 - accuracy) / max(count, 1)) ** 0.5


def verdict(metric: str, baseline: float, central: float, federated: float, margin: float, *, higher: bool) -> str:
    """'yes' only when the better pretrained backbone beats random init by more than ``margin``."""
    gain = (max(central, federated) - baseline) if higher else (baseline - min(central, federated))
    answer = "yes" if gain > margin else "no (within the noise margin)" if gain > -margin else "no (worse)"
    return (f"pretraining beats random init on {metric}: {answer} "
            f"(centralised {central:.3f}, federated {federated:.3f} vs random {baseline:.3f}; "
            f"noise margin ±{margin:.3f})")


def report(rows: dict, recipe: dict, total: float) -> None:
    names = list(rows)
    random_row, central, federated = rows[names[0]], rows[names[1]], rows[names[2]]
    print()
    print(f"| backbone | keyword accuracy ↑ | CER ↓ | WER ↓ | pretraining wall time |")
    print(f"|---|---:|---:|---:|---:|")
    for name, r in rows.items():
        wall = f"{r['pretrain_seconds'] / 60:.1f} min" if r["pretrain_seconds"] else "-"
        print(f"| {name} | {r['kws_accuracy']:.3f} | {r['cer']:.3f} | {r['wer']:.3f} | {wall} |")
    print()
    print(f"(fine-tuning on {recipe['labelled_speakers']} labelled training speakers: "
          f"{random_row['kws_train']} keyword clips, {random_row['asr_train']} sentences; "
          f"test: {random_row['kws_test']} keyword clips, {random_row['asr_test']} sentences of unseen speakers)")
    print(verdict("keyword accuracy", random_row["kws_accuracy"], central["kws_accuracy"], federated["kws_accuracy"],
                  kws_margin(random_row["kws_accuracy"], random_row["kws_test"]), higher=True))
    print(verdict("CER", random_row["cer"], central["cer"], federated["cer"], CER_MARGIN, higher=False))
    print(f"federated vs centralised gap: keyword accuracy {federated['kws_accuracy'] - central['kws_accuracy']:+.3f}, "
          f"CER {federated['cer'] - central['cer']:+.3f}, WER {federated['wer'] - central['wer']:+.3f} "
          f"(federated minus centralised; single seed)")
    import math

    from fedspeech.models.configs import model_config

    negatives = model_config("tiny", **MODEL_OVERRIDES).num_negatives
    print(f"SSL validation loss, first → last round (chance level of the contrastive term: "
          f"ln(1 + {negatives} negatives) = {math.log(1 + negatives):.3f}): "
          + "; ".join(f"{name} {r['val_loss'][0]:.3f} → {r['val_loss'][1]:.3f}"
                      for name, r in rows.items() if "val_loss" in r))
    compute = sum(r["pretrain_seconds"] + r.get("finetune_seconds", 0.0) for r in rows.values())
    print(f"compute behind this table (pretraining + fine-tuning, cached or not): {compute / 60:.1f} min; "
          f"this invocation's wall time: {total / 60:.1f} min")


if __name__ == "__main__":
    main()
