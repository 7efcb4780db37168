"""Does self-supervised pretraining help? Random init vs centralised vs federated SSL.

One command builds the built-in corpus, pretrains a tiny wav2vec 2.0 centrally and
federated (10 speaker clients, all of them every round — the gao10 setting) with the old
recipe and with the recipe that learns (``benchmarks/fed_ssl_recipe.py`` runs and caches
the pretraining, so both benchmarks share runs), then fine-tunes every backbone with the
*same* recipe and prints one table (keyword accuracy, CER, WER, pretraining wall time,
mean ± standard error over seeds) with the verdicts:

    .venv/bin/python benchmarks/ssl_quality.py [--quick] [--work DIR] [--seeds 0 1 2] [--test-manifest M]

The set-up is the usual low-resource SSL one: pretraining sees the audio of *all* training
speakers without labels, fine-tuning gets labels for only ``labelled_speakers`` of them,
and every number is measured on the test split's unseen speakers. ``--test-manifest``
scores the same fine-tuned keyword models on another corpus as well (e.g. one in Speech
Commands layout: ``fedspeech corpus synth --layout speech_commands`` makes one with voices
and noise unlike the built-in corpus; ``fedspeech corpus import speech_commands`` reads
it), so a result is not specific to the built-in voices. Fair comparison: the random-init
baseline is the *same* untrained checkpoint folder the pretraining starts from (same
architecture, same initial weights), and every backbone is fine-tuned with the same steps,
batch size, learning rates, seed and freezing (the whole network, CNN included, is
trained: a frozen *random* CNN would handicap the baseline). ``--work`` caches the corpus,
the pretraining runs and the fine-tuning results, so a rerun only redoes what changed.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

from fedspeech.cli import quiet_logging

sys.path.insert(0, str(Path(__file__).resolve().parent))  # fed_ssl_recipe beside this file

# The recipe, full and --quick. Model overrides go into the shared untrained checkpoint.
# pretrain_per_speaker: unlabelled utterances per training speaker that pretraining sees;
# local_epochs: passes over them per round (both runs see the same examples: centralised
# draws as many per round from the pooled data). FULL gives the centralised run 1440
# optimiser steps of batch 8 x 1.5 s and every federated client 144 local steps.
FULL = dict(
    speakers=40,
    pretrain_per_speaker=30,
    rounds=6,
    local_epochs=3,
    batch_size=8,
    max_seconds=1.5,
    lr=2e-3,
    warmup_rounds=2,
    labelled_speakers=6,
    kws_steps=120,
    asr_steps=300,
    dev_cap=48,
)
QUICK = dict(
    speakers=20,
    pretrain_per_speaker=8,
    rounds=2,
    local_epochs=1,
    batch_size=8,
    max_seconds=1.5,
    lr=2e-3,
    warmup_rounds=1,
    labelled_speakers=4,
    kws_steps=20,
    asr_steps=20,
    dev_cap=16,
)
# feature_penalty_weight=0: the paper's weight 10 (and 1, and 0.1 for its first ~200 steps)
# keeps a tiny model's contrastive loss at chance — the penalty shrinks the CNN output, the
# context network collapses to a constant vector (docs/evaluation.md). Everything else is
# the paper's objective (65% span masking of length 10, 100 distractors, Gumbel 2 -> 0.5).
MODEL_OVERRIDES: dict = {"feature_penalty_weight": 0.0}
# ASR gets its own, higher learning rates and 300 steps: at 3e-4/2e-3 and 120 steps CTC
# never left the all-blank stage (CER ~1 for every backbone), so CER could not discriminate.
FINETUNE = dict(
    lr_backbone=3e-4,
    lr_head=2e-3,
    asr_lr_backbone=5e-4,
    asr_lr_head=5e-3,
    freeze_cnn=False,
    kws_batch=16,
    asr_batch=8,
    kws_max_seconds=1.0,
    asr_max_seconds=4.0,
)


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


def pretrain(variant: str, work: Path, seed: int, quick: bool) -> tuple[Path, float, list[float]]:
    """Run (or reuse) one of ``fed_ssl_recipe.py``'s pretraining variants on this benchmark's
    data; returns its last checkpoint (``VARIANT@R``: round R's, which the run must have
    kept), wall time and validation loss per round (up to that round)."""
    import fed_ssl_recipe
    from fedspeech.federated import checkpoints

    variant, _, at_round = variant.partition("@")
    row = fed_ssl_recipe.run_variant(variant, seed, str(work), setting="quick" if quick else None)
    folder = Path(row["folder"])
    if not at_round:
        return checkpoints.latest_checkpoint(folder), row["seconds"], row["val_loss"]
    chosen = checkpoints.round_dir(folder, int(at_round))
    if not chosen.is_dir():
        raise SystemExit(f"{variant}@{at_round}: {folder} kept no round {at_round} checkpoint (keep_checkpoints)")
    return chosen, row["seconds"], row["val_loss"][: int(at_round)]


def labelled_subset(utterances, count: int, seed: int):
    """Only ``count`` training speakers' labels are used for fine-tuning (seeded choice)."""
    import numpy as np

    speakers = sorted({u.speaker for u in utterances if u.split == "train"})
    chosen = set(np.random.default_rng([seed, 11]).permutation(speakers)[:count].tolist())
    return [u for u in utterances if u.split != "train" or u.speaker in chosen]


def finetune_cache(work: Path, backbone: Path, recipe: dict, seed: int, extra_test: str | None) -> Path:
    """Where one backbone's fine-tuning results are kept, keyed by everything they depend on."""
    payload = {"backbone": str(backbone), "recipe": recipe, "finetune": FINETUNE, "seed": seed}
    if extra_test:
        payload["extra_test"] = extra_test
    return work / f"finetune-{_key(payload)}.json"


def _cap(utterances, count: int, seed: int):
    """A seeded subset of the dev split (epoch selection only), to bound evaluation time."""
    import numpy as np

    items = sorted(utterances, key=lambda u: u.id)
    return [items[i] for i in sorted(np.random.default_rng([seed, 5]).permutation(len(items))[:count])] or None


def external_kws_test(manifest: Path):
    """Keyword clips of another corpus (its test split, or all of it if it has none), with
    every word outside the ten keywords relabelled ``_unknown_``, the built-in corpus's
    classes (the usual Speech Commands 10 + unknown protocol, without silence)."""
    import dataclasses

    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.synth import KEYWORDS, UNKNOWN_LABEL

    clips = [u for u in read_manifest(manifest) if u.label]
    if not clips:
        raise ValueError(f"{manifest}: no keyword-labelled utterances for a keyword test set")
    test = [u for u in clips if u.split == "test"] or clips
    return [dataclasses.replace(u, label=u.label if u.label in KEYWORDS else UNKNOWN_LABEL) for u in test]


def finetune(backbone: Path, utterances, recipe: dict, seed: int, extra_kws_test=None) -> dict:
    """Keyword accuracy and CER/WER on the test speakers, one recipe for every backbone;
    with ``extra_kws_test`` also the keyword accuracy of the same model on that set."""
    from fedspeech.downstream.finetune import finetune_asr, finetune_classifier
    from fedspeech.downstream.tasks import task_data

    common = dict(freeze_cnn=FINETUNE["freeze_cnn"], seed=seed)
    kws = task_data(utterances, "kws", seed=seed)
    kws_result = finetune_classifier(
        backbone,
        kws.train,
        kws.test,
        task="kws",
        dev_utts=_cap(kws.dev, recipe["dev_cap"], seed),
        epochs=1000,
        max_steps=recipe["kws_steps"],
        batch_size=FINETUNE["kws_batch"],
        max_seconds=FINETUNE["kws_max_seconds"],
        lr_backbone=FINETUNE["lr_backbone"],
        lr_head=FINETUNE["lr_head"],
        extra_eval_utts={"extra": extra_kws_test} if extra_kws_test else None,
        **common,
    )
    asr = task_data(utterances, "asr", seed=seed)
    asr_result = finetune_asr(
        backbone,
        asr.train,
        asr.test,
        dev_utts=_cap(asr.dev, recipe["dev_cap"], seed),
        epochs=1000,
        max_steps=recipe["asr_steps"],
        batch_size=FINETUNE["asr_batch"],
        max_seconds=FINETUNE["asr_max_seconds"],
        lr_backbone=FINETUNE["asr_lr_backbone"],
        lr_head=FINETUNE["asr_lr_head"],
        **common,
    )
    result = {
        "kws_accuracy": kws_result["accuracy"],
        "cer": asr_result["cer"],
        "wer": asr_result["wer"],
        "kws_train": kws_result["num_train"],
        "asr_train": asr_result["num_train"],
        "kws_test": kws_result["num_eval"],
        "asr_test": asr_result["num_eval"],
        "asr_example": asr_result["examples"][0] if asr_result["examples"] else None,
    }
    if extra_kws_test:
        result["extra_kws_accuracy"] = kws_result["extra"]["extra"]["accuracy"]
        # the other corpus's test set is half `_unknown_` clips: a classifier that says
        # `_unknown_` to everything scores 0.5 accuracy, so report the mean per-class recall too
        result["extra_kws_macro_accuracy"] = kws_result["extra"]["extra"]["macro_accuracy"]
        result["extra_kws_test"] = kws_result["extra"]["extra"]["num_eval"]
    return result


#: The rows: (name, fed_ssl_recipe variant or None for the untrained init).
BACKBONES = (
    ("random init", None),
    ("centralised SSL", "centralised"),
    ("federated SSL, old (batch 8)", "fedavg"),
    ("federated SSL, recipe (batch 1)", "recipe"),
    # Ablations: which of "batch 1" and "federated" costs the recipe's backbone downstream?
    ("centralised SSL, batch 1", "centralised-batch1"),
    ("federated SSL, batch 2", "batch2"),
)


def rows_to_run(names: list[str]) -> list[tuple[str, str | None]]:
    """The rows named, in table order: BACKBONES' names, then raw ``fed_ssl_recipe`` variants
    (so any pretraining variant can be fine-tuned without a new row here)."""
    import fed_ssl_recipe

    known = dict(BACKBONES)

    def is_variant(name: str) -> bool:  # VARIANT or VARIANT@ROUND
        variant, _, at_round = name.partition("@")
        return variant in fed_ssl_recipe.VARIANTS and (not at_round or at_round.isdigit())

    unknown = [n for n in names if n not in known and not is_variant(n)]
    if unknown:
        raise SystemExit(f"--backbones: unknown {unknown}; rows: {list(known)}, or a variant of fed_ssl_recipe.py")
    rows = [(name, variant) for name, variant in BACKBONES if name in names]
    return rows + [(f"variant {n}", n) for n in names if n not in known]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="a few-minute smoke version of the recipe")
    parser.add_argument("--work", default=None, help="cache folder for corpus and runs (default: a temp dir)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (1 measured faster than 2 for the tiny model on a loaded 2-core box)",
    )
    parser.add_argument(
        "--seeds",
        type=int,
        nargs="+",
        default=[0],
        help="init, pretraining and fine-tuning seeds (the corpus stays seed 0)",
    )
    parser.add_argument(
        "--test-manifest",
        default=None,
        help="also score keyword spotting on this manifest's test split (any corpus, e.g. one "
        "imported with `fedspeech corpus import speech_commands`; other words -> _unknown_)",
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=None,
        help="which rows to run (default: all, or none when --folder is given): row names, or any "
        "fed_ssl_recipe.py variant name (--list there), "
        "VARIANT@R for round R's checkpoint of a run that keeps it",
    )
    parser.add_argument(
        "--folder",
        action="append",
        default=[],
        metavar="NAME=FOLDER",
        help="also fine-tune this HF checkpoint folder as row NAME (repeatable), e.g. benchmarks/transplant.py's",
    )
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--plot", default=None, help="also draw the table as grouped bars (PNG)")
    args = parser.parse_args()

    import torch

    quiet_logging()
    torch.set_num_threads(args.threads)
    recipe = QUICK if args.quick else FULL
    started = time.perf_counter()
    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="ssl_quality-"))
    work.mkdir(parents=True, exist_ok=True)
    print(
        f"work folder {work}; recipe {recipe}; model overrides {MODEL_OVERRIDES}; fine-tuning {FINETUNE}; "
        f"threads {args.threads}; load average {os.getloadavg()[0]:.1f}",
        flush=True,
    )

    from fedspeech.data.manifest import read_manifest

    manifest = corpus(work, recipe["speakers"], 0)
    utterances = read_manifest(manifest)
    extra = external_kws_test(Path(args.test_manifest)) if args.test_manifest else None
    rows: list[dict] = []
    # each row's source: None (the untrained init), a fed_ssl_recipe variant, or a checkpoint folder
    sources: list[tuple[str, str | Path | None]] = []
    for item in args.folder:
        name, sep, folder = item.partition("=")
        if not sep or not (Path(folder) / "config.json").is_file():
            raise SystemExit(f"--folder {item!r}: expected NAME=FOLDER with a config.json in FOLDER")
        sources.append((f"folder {name}", Path(folder).resolve()))
    named = args.backbones if args.backbones is not None else ([] if sources else [n for n, _ in BACKBONES])
    sources = [*rows_to_run(named), *sources]
    for seed in args.seeds:
        labelled = labelled_subset(utterances, recipe["labelled_speakers"], seed)
        for name, source in sources:
            if source is None:
                path, seconds, losses = untrained_checkpoint(work, seed), 0.0, []
            elif isinstance(source, Path):
                path, seconds, losses = source, 0.0, []
            else:
                path, seconds, losses = pretrain(source, work, seed, args.quick)
            cache = finetune_cache(work, path, recipe, seed, args.test_manifest)
            result = json.loads(cache.read_text()) if cache.is_file() else None
            if result is not None and extra is not None and "extra_kws_macro_accuracy" not in result:
                result = None  # cached before the macro accuracy was kept: fine-tune again
            if result is None:
                t0 = time.perf_counter()
                result = finetune(path, labelled, recipe, seed, extra)
                result["finetune_seconds"] = time.perf_counter() - t0
                cache.write_text(json.dumps(result, default=str))
            rows.append({"backbone": name, "seed": seed, **result, "pretrain_seconds": seconds, "val_losses": losses})
            print(
                f"  seed {seed} {name}: kws {result['kws_accuracy']:.3f}, cer {result['cer']:.3f}"
                + (f", extra kws {result['extra_kws_accuracy']:.3f}" if "extra_kws_accuracy" in result else "")
                + (
                    f" (macro {result['extra_kws_macro_accuracy']:.3f})" if "extra_kws_macro_accuracy" in result else ""
                ),
                flush=True,
            )
    total = time.perf_counter() - started
    report(rows, recipe, total, args.test_manifest)
    if args.plot:
        plot(rows, args.plot)
    if args.json:
        Path(args.json).write_text(
            json.dumps(
                {
                    "recipe": recipe,
                    "finetune": FINETUNE,
                    "rows": rows,
                    "test_manifest": args.test_manifest,
                    "total_seconds": total,
                },
                indent=2,
                default=str,
            )
            + "\n"
        )


def plot(rows: list[dict], out: str) -> Path:
    """Mean keyword accuracy and CER as bars, through ``fedspeech compare``'s plot (which
    knows those two metrics; the other corpus's accuracy is in the table)."""
    from fedspeech.apps.finetune.compare import plot_comparison

    flat = [
        {"backbone": r["backbone"], "task": task, "score": r[key]}
        for r in rows
        for task, key in (("kws", "kws_accuracy"), ("asr", "cer"))
        if key in r
    ]
    means: dict[tuple[str, str], list[float]] = {}
    for item in flat:
        means.setdefault((item["backbone"], item["task"]), []).append(item["score"])
    return plot_comparison([{"backbone": b, "task": t, "score": sum(v) / len(v)} for (b, t), v in means.items()], out)


# A difference counts only when it exceeds two standard errors. With several seeds that is
# the standard error of the per-seed paired difference (training and test-set noise both);
# with one seed the binomial standard error of keyword accuracy on the test clips and a fixed
# 0.02 for CER (a stated threshold, not a measured variance).
CER_MARGIN = 0.02


def kws_margin(accuracy: float, count: int) -> float:
    return 2 * (accuracy * (1 - accuracy) / max(count, 1)) ** 0.5


def _mean_se(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    return mean, (sum((v - mean) ** 2 for v in values) / (len(values) - 1) / len(values)) ** 0.5


def compare(rows: list[dict], metric: str, better: str, worse: str, *, higher: bool) -> str:
    """'better' beats 'worse' on ``metric`` by more than two standard errors?"""
    pairs = {}
    for r in rows:
        if metric in r:
            pairs.setdefault(r["seed"], {})[r["backbone"]] = r[metric]
    diffs = [p[better] - p[worse] for p in pairs.values() if better in p and worse in p]
    if not diffs:
        return f"{metric}: {better} vs {worse}: not measured"
    mean, se = _mean_se(diffs)
    sign = 1 if higher else -1
    if len(diffs) > 1:
        margin, how = 2 * se, f"2 se over {len(diffs)} seeds"
    elif metric == "cer":
        margin, how = CER_MARGIN, "fixed CER margin, 1 seed"
    else:
        count_key = "extra_kws_test" if metric.startswith("extra") else "kws_test"
        row = next(r for r in rows if r["backbone"] == worse)
        margin, how = kws_margin(row[metric], row[count_key]), "2 binomial se, 1 seed"
    answer = "yes" if sign * mean > margin else "no"
    return f"{metric}: {better} minus {worse} = {mean:+.3f} (margin {margin:.3f}, {how}): beats it: {answer}"


def report(rows: list[dict], recipe: dict, total: float, test_manifest: str | None) -> None:
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    metrics = [("kws_accuracy", "keyword accuracy ↑"), ("cer", "CER ↓"), ("wer", "WER ↓")]
    if any("extra_kws_accuracy" in r for r in rows):
        metrics.append(("extra_kws_accuracy", f"keyword accuracy ↑ on {Path(test_manifest).name}"))
    seeds = sorted({r["seed"] for r in rows})
    print(f"\nmean ± se over seeds {seeds}")
    print(
        "| backbone | " + " | ".join(label for _, label in metrics) + " | pretraining wall time | final SSL val loss |"
    )
    print("|---|" + "---:|" * (len(metrics) + 2))
    for name in names:
        mine = [r for r in rows if r["backbone"] == name]
        cells = []
        for key, _ in metrics:
            mean, se = _mean_se([r[key] for r in mine])
            cells.append(f"{mean:.3f}" + (f" ± {se:.3f}" if se == se else ""))
        wall = sum(r["pretrain_seconds"] for r in mine) / len(mine)
        finals = [r["val_losses"][-1] for r in mine if r["val_losses"]]
        loss = f"{sum(finals) / len(finals):.3f}" if finals else "-"
        print(f"| {name} | " + " | ".join(cells) + f" | {wall / 60:.1f} min | {loss} |")
    first = rows[0]
    print(
        f"\n(fine-tuning on {recipe['labelled_speakers']} labelled training speakers: {first['kws_train']} keyword "
        f"clips, {first['asr_train']} sentences; test: {first['kws_test']} keyword clips, {first['asr_test']} "
        "sentences of unseen speakers"
        + (f"; other corpus: {first['extra_kws_test']} keyword clips" if "extra_kws_test" in first else "")
        + ")"
    )
    random_name, central_name = names[0], next((n for n in names if n.startswith("centralised")), None)
    for name in names[1:]:
        for key, _ in metrics:
            if key == "wer":
                continue
            print(compare(rows, key, name, random_name, higher=key != "cer"))
    fed = [n for n in names if n.startswith("federated")]
    if central_name:
        for name in fed:
            for key in ("kws_accuracy", "extra_kws_accuracy"):
                if any(key in r for r in rows):
                    gap = _mean_se(
                        [
                            r2[key] - r1[key]
                            for r1 in rows
                            for r2 in rows
                            if r1["backbone"] == central_name and r2["backbone"] == name and r1["seed"] == r2["seed"]
                        ]
                    )
                    print(
                        f"{key}: {name} minus centralised = {gap[0]:+.3f}"
                        + (f" ± {gap[1]:.3f} (se)" if gap[1] == gap[1] else "")
                        + f"; within 0.10: {'yes' if gap[0] > -0.10 else 'no'}"
                    )
    compute = sum(r["pretrain_seconds"] + r.get("finetune_seconds", 0.0) for r in rows)
    print(
        f"compute behind this table (pretraining + fine-tuning, cached or not): {compute / 60:.1f} min; "
        f"this invocation's wall time: {total / 60:.1f} min"
    )


if __name__ == "__main__":
    main()
