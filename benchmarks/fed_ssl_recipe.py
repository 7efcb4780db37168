"""Why does federated wav2vec 2.0 pretraining lag centralised, and which recipe closes the gap?

Every row is one pretraining run of the tiny wav2vec 2.0 on the same data as
``benchmarks/ssl_quality.py`` (40-speaker built-in corpus, 30 unlabelled utterances per
training speaker, 1.5 s crops, batch 8, 10 speaker clients), started from the same untrained
checkpoint, at the same number of examples seen (the centralised baseline draws as many
examples per round from the pooled data as the federated clients hold). Each variant
changes one thing against the federated baseline, so the table is an ablation:

    .venv/bin/python benchmarks/fed_ssl_recipe.py --work runs/fed-ssl [VARIANT ...] [--seeds 0 1 2]
    .venv/bin/python benchmarks/fed_ssl_recipe.py --list

``--work`` caches the corpus and every finished run (keyed by all of its settings), so a
rerun only does what is missing; ``--jobs 2`` runs two variants at a time (one torch thread
each). The table gives, per variant: rounds, local steps per client and round, examples
seen, wall time, the validation contrastive loss (held-out speakers, fixed masks) at
every round and the last one relative to the centralised run of the same seed.
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import ssl_quality  # noqa: E402  (the corpus, pool, partition and shared init of that benchmark)
from fedspeech.cli import quiet_logging

RECIPE = ssl_quality.FULL


@dataclass(frozen=True)
class Setting:
    """One of the reference study's client settings on a built-in corpus large enough for it."""

    speakers: int  # corpus speakers (80% train, 10% dev, 10% test)
    keywords: int  # keyword clips per speaker
    sentences: int  # sentences per speaker
    per_speaker: int  # unlabelled utterances per training speaker in the pretraining pool
    clients: int
    clients_per_round: int  # 0 = all
    rounds: int
    local_epochs: int
    warmup_rounds: int


SETTINGS = {
    # ssl_quality.py's data: 32 training speakers, 10 clients all every round, 6 x 3 epochs.
    "gao10": Setting(
        RECIPE["speakers"],
        36,
        30,
        RECIPE["pretrain_per_speaker"],
        10,
        0,
        RECIPE["rounds"],
        RECIPE["local_epochs"],
        RECIPE["warmup_rounds"],
    ),
    # 104 training speakers, 100 clients, 20 per round; 60 rounds of 1 epoch: each client's data
    # is seen 12 times on average, about the gao10 run's number of examples.
    "gao100": Setting(130, 8, 3, 11, 100, 20, 60, 1, 20),
    # ssl_quality.py --quick: a smoke test whose numbers mean nothing.
    "quick": Setting(20, 36, 30, 8, 10, 0, 2, 1, 1),
}

#: The optimiser settings before this benchmark (every row starts from them).
OLD_DEFAULTS = dict(
    lr_schedule="round",
    optimizer_state="reset",
    server_optimizer="none",
    server_lr=1.0,
    server_momentum=0.0,
    server_tau=1e-3,
    max_grad_norm=5.0,
)

#: What the ablation found to learn (the library's defaults follow it): more, smaller local
#: steps at the same examples (client batch 1). Larger steps (server lr > 1, server momentum,
#: a higher client lr) kept the loss at chance longer.
RECIPE_OVERRIDES = dict(batch_size=1)

#: name -> (setting, overrides of the setting's federated baseline, centralised?, what it tests)
MORE_ROUNDS = dict(
    rounds=3 * RECIPE["rounds"], local_epochs=RECIPE["local_epochs"] // 3, warmup_rounds=3 * RECIPE["warmup_rounds"]
)  # same examples: 3x the rounds, 1/3 the epochs
ONE_OPTIMIZER = dict(optimizer_state="client", lr_schedule="step")  # a plain centralised run's optimiser
VARIANTS: dict[str, tuple[str, dict, bool, str]] = {
    "centralised-reset": (
        "gao10",
        {},
        True,
        "pooled data, same examples, batch, crops, per-round lr; AdamW reset every round",
    ),
    "centralised": (
        "gao10",
        ONE_OPTIMIZER,
        True,
        "pooled data, same examples, batch, crops; one AdamW and one per-step lr schedule for the whole run",
    ),
    "fedavg": ("gao10", {}, False, "FedAvg, fresh AdamW every round, lr constant within a round (the old default)"),
    "step-lr": ("gao10", {"lr_schedule": "step"}, False, "lr follows the global schedule step by step"),
    "moments-client": (
        "gao10",
        {"optimizer_state": "client"},
        False,
        "each client keeps its AdamW moments (node state)",
    ),
    "moments-server": (
        "gao10",
        {"optimizer_state": "server"},
        False,
        "AdamW moments averaged by the server, sent back",
    ),
    "more-rounds": ("gao10", MORE_ROUNDS, False, "3x the rounds with 1/3 the local epochs each"),
    "server-lr3": (
        "gao10",
        {"server_optimizer": "fedavgm", "server_lr": 3.0},
        False,
        "server learning rate 3 (FedAvgM, no momentum)",
    ),
    "cnn-server-lr3": (
        "gao10",
        {"server_optimizer": "fedavgm", "server_lr": 3.0, "server_optimizer_scope": "wav2vec2.feature_extractor."},
        False,
        "server learning rate 3 for the CNN only (FedAvgM scoped to it); the rest as FedAvg",
    ),
    "cnn-server-lr10": (
        "gao10",
        {"server_optimizer": "fedavgm", "server_lr": 10.0, "server_optimizer_scope": "wav2vec2.feature_extractor."},
        False,
        "server learning rate 10 for the CNN only",
    ),
    "cnn-server-lr5": (
        "gao10",
        {"server_optimizer": "fedavgm", "server_lr": 5.0, "server_optimizer_scope": "wav2vec2.feature_extractor."},
        False,
        "server learning rate 5 for the CNN only",
    ),
    "cnn-server-lr10-every-round": (
        "gao10",
        {
            "server_optimizer": "fedavgm",
            "server_lr": 10.0,
            "server_optimizer_scope": "wav2vec2.feature_extractor.",
            "keep_checkpoints": 0,
        },
        False,
        "cnn-server-lr10 keeping every round's checkpoint (fine-tune the rounds before its collapse)",
    ),
    "cnn-server-lr30": (
        "gao10",
        {"server_optimizer": "fedavgm", "server_lr": 30.0, "server_optimizer_scope": "wav2vec2.feature_extractor."},
        False,
        "server learning rate 30 for the CNN only",
    ),
    "fedavgm": (
        "gao10",
        {"server_optimizer": "fedavgm", "server_momentum": 0.9},
        False,
        "server momentum 0.9 (Flower FedAvgM)",
    ),
    "fedadam": (
        "gao10",
        {"server_optimizer": "fedadam", "server_lr": 0.01, "server_momentum": 0.9},
        False,
        "Flower FedAdam, eta 0.01, beta1 0.9, tau 1e-3",
    ),
    "fedyogi": (
        "gao10",
        {"server_optimizer": "fedyogi", "server_lr": 0.01, "server_momentum": 0.9},
        False,
        "Flower FedYogi, eta 0.01, beta1 0.9, tau 1e-3",
    ),
    "more-rounds-fedavgm": (
        "gao10",
        {**MORE_ROUNDS, "server_optimizer": "fedavgm", "server_momentum": 0.9},
        False,
        "3x the rounds and server momentum 0.9",
    ),
    "fedavg-3x-examples": (
        "gao10",
        {"rounds": 3 * RECIPE["rounds"], "warmup_rounds": 3 * RECIPE["warmup_rounds"], "keep_checkpoints": 0},
        False,
        "the old FedAvg default for 3x the rounds (3x the examples), every round kept: does it transfer "
        "like a centralised checkpoint at the same SSL loss?",
    ),
    "iid-clients": (
        "gao10",
        {"partition_scheme": "iid"},
        False,
        "FedAvg (old default), clients get random utterances of every speaker instead of 3-4 speakers each",
    ),
    "batch4": ("gao10", {"batch_size": 4}, False, "client batch 4 (the reference study's): 2x the local steps"),
    "batch2": ("gao10", {"batch_size": 2}, False, "client batch 2: 4x the local steps"),
    "batch1": ("gao10", {"batch_size": 1}, False, "client batch 1: 8x the local steps"),
    "local-lr3x": ("gao10", {"lr": 3 * RECIPE["lr"]}, False, "3x the client learning rate"),
    "no-clip": ("gao10", {"max_grad_norm": 1e9}, False, "no gradient clipping (default clips at norm 5)"),
    "centralised-every-round": (
        "gao10",
        {**ONE_OPTIMIZER, "keep_checkpoints": 0},
        True,
        "the centralised run keeping every round's checkpoint (fine-tune an early round with ssl_quality.py NAME@R)",
    ),
    "centralised-batch2": (
        "gao10",
        {**ONE_OPTIMIZER, "batch_size": 2},
        True,
        "the centralised run at batch 2 (4x its steps)",
    ),
    "centralised-batch1": (
        "gao10",
        {**ONE_OPTIMIZER, "batch_size": 1},
        True,
        "the centralised run at batch 1 (8x its steps): is batch 1 or federation what the downstream sees?",
    ),
    "batch2-lr1e-3": ("gao10", {"batch_size": 2, "lr": 1e-3}, False, "batch 2 at half the learning rate"),
    "batch2-moments-server": (
        "gao10",
        {"batch_size": 2, "optimizer_state": "server"},
        False,
        "batch 2, AdamW moments averaged by the server",
    ),
    "batch2-moments-client": (
        "gao10",
        {"batch_size": 2, "optimizer_state": "client"},
        False,
        "batch 2, each client keeps its AdamW moments",
    ),
    # The recipe that learns (the library's defaults since this benchmark), under every rule.
    "recipe": ("gao10", RECIPE_OVERRIDES, False, "the recipe: FedAvg at client batch 1"),
    "recipe-moments-client": (
        "gao10",
        {**RECIPE_OVERRIDES, "optimizer_state": "client"},
        False,
        "the recipe, each client keeping its AdamW moments across rounds",
    ),
    "recipe-cnn-server-lr10": (
        "gao10",
        {
            **RECIPE_OVERRIDES,
            "server_optimizer": "fedavgm",
            "server_lr": 10.0,
            "server_optimizer_scope": "wav2vec2.feature_extractor.",
        },
        False,
        "the recipe with a server learning rate of 10 for the CNN only",
    ),
    "recipe-probed": (
        "gao10",
        {**RECIPE_OVERRIDES, "probes": "kws"},
        False,
        "the recipe with a per-round keyword probe (probes do not change training)",
    ),
    "recipe-loss": ("gao10", {**RECIPE_OVERRIDES, "strategy": "loss"}, False, "the recipe, loss-weighted rule"),
    "recipe-mixed": ("gao10", {**RECIPE_OVERRIDES, "strategy": "mixed"}, False, "the recipe, mixed FedAvg/loss rule"),
    "recipe-ldawa": ("gao10", {**RECIPE_OVERRIDES, "strategy": "ldawa"}, False, "the recipe, L-DAWA rule"),
    "recipe-byol-fedu": (
        "gao10",
        {**RECIPE_OVERRIDES, "method": "byol", "strategy": "fedu"},
        False,
        "the recipe, feature matching (BYOL-style) with FedU; its loss is not contrastive",
    ),
    "gao100-centralised": ("gao100", ONE_OPTIMIZER, True, "gao100 data pooled, one AdamW, per-step lr"),
    "gao100-fedavg": ("gao100", {}, False, "gao100, FedAvg, the old default"),
    "gao100-recipe": ("gao100", RECIPE_OVERRIDES, False, "gao100, the recipe"),
}


def setting_data(work: Path, name: str, scheme: str = "speaker") -> tuple[Path, Path]:
    """(unlabelled pretraining manifest, partition) of a setting, built once; ``scheme`` is
    a partition scheme of ``fedspeech.data.partition`` (speaker-disjoint clients by default)."""
    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import make_partition
    from fedspeech.data.synth import build_corpus

    setting = SETTINGS[name]
    if (setting.keywords, setting.sentences) == (36, 30):  # ssl_quality.py's corpus: cached runs are shared
        manifest = ssl_quality.corpus(work, setting.speakers, 0)
    else:
        folder = work / f"corpus-{setting.speakers}spk-{setting.keywords}kw-{setting.sentences}sent-seed0"
        manifest = folder / "manifest.tsv"
        if not manifest.is_file():
            build_corpus(
                folder,
                setting.speakers,
                0,
                keywords_per_speaker=setting.keywords,
                sentences_per_speaker=setting.sentences,
            )
    unlabelled = ssl_quality.pretraining_manifest(manifest, setting.per_speaker, 0)
    partition = unlabelled.with_suffix(f".{scheme}{setting.clients}.json")
    if not partition.is_file():
        make_partition(read_manifest(unlabelled), scheme, setting.clients, seed=0, manifest=str(unlabelled)).save(
            partition
        )
    return unlabelled, partition


def run_variant(name: str, seed: int, work: str, setting: str | None = None, cached_only: bool = False) -> dict | None:
    """Pretrain one variant (or reuse its cached run); returns its table row. ``setting``
    runs the variant's recipe on another setting's data and budget; ``cached_only`` returns
    None instead of running what is not cached."""

    import torch

    from fedspeech.apps.pretrain.run import run_centralised, run_pretraining
    from fedspeech.apps.pretrain.settings import PretrainSettings
    from fedspeech.federated import roundlog

    quiet_logging()
    torch.set_num_threads(1)
    setting_name, overrides, centralised, _ = VARIANTS[name]
    setting_name = setting or setting_name
    setting = SETTINGS[setting_name]
    folder = Path(work)
    overrides = dict(overrides)
    unlabelled, partition = setting_data(folder, setting_name, overrides.pop("partition_scheme", "speaker"))
    init = ssl_quality.untrained_checkpoint(folder, seed)
    fields = dict(
        rounds=setting.rounds,
        local_epochs=setting.local_epochs,
        batch_size=RECIPE["batch_size"],
        max_seconds=RECIPE["max_seconds"],
        lr=RECIPE["lr"],
        warmup_rounds=setting.warmup_rounds,
        strategy="fedavg",
        method="wav2vec2",
        clients_per_round=setting.clients_per_round,
    )
    fields.update(overrides)
    fields.update(
        manifest=str(unlabelled),
        partition=str(partition),
        model=str(init),
        seed=seed,
        val_max_utterances=16,
        keep_checkpoints=overrides.get("keep_checkpoints", 1),
    )
    # Every optimiser setting is given explicitly, so a row never changes with the library's
    # defaults; the folder key leaves out those equal to the old defaults (older caches stay valid).
    key = {k: v for k, v in fields.items() if OLD_DEFAULTS.get(k, object()) != v}
    if fields.get("lr_schedule") == "step":  # runs before the per-step schedule was fixed went 2x too fast
        key["step_schedule"] = "by-local-step"
    fields = {**OLD_DEFAULTS, **fields}
    kind = "centralised" if centralised else "federated"  # the folder is keyed by settings, not by variant name
    out = folder / f"{kind}-seed{seed}-{ssl_quality._key({**key, 'centralised': centralised})}"
    done = out / "wall_seconds.json"
    if not done.is_file() and cached_only:
        return None
    if not done.is_file():
        import shutil

        owner = out / "owner.pid"  # another invocation running the same row must not be wiped
        if owner.is_file() and Path(f"/proc/{owner.read_text().strip()}").exists():
            raise RuntimeError(f"{out} is being run by process {owner.read_text().strip()}; wait for it")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        owner.write_text(str(os.getpid()))
        started = time.perf_counter()
        settings = PretrainSettings(out_dir=str(out), **fields)
        (run_centralised if centralised else run_pretraining)(settings)
        done.write_text(json.dumps({"seconds": time.perf_counter() - started}))
    rounds = roundlog.read_rounds(out)
    final = final_val_loss(out, PretrainSettings(out_dir=str(out), **fields))
    epochs = fields["local_epochs"]  # the logs count the examples of a round's last epoch
    if centralised:
        examples = [r["examples"] * epochs for r in rounds]
        steps = None
    else:
        examples = [sum(c["examples"] for c in r["clients"]) * epochs for r in rounds]
        steps = sum(c["steps"] for r in rounds for c in r["clients"]) / max(1, sum(len(r["clients"]) for r in rounds))
    return {
        "variant": name,
        "setting": setting_name,
        "seed": seed,
        "centralised": centralised,
        "folder": str(out),
        "rounds": len(rounds),
        "local_steps": steps,
        "examples": sum(examples),
        "examples_by_round": examples,
        "seconds": json.loads(done.read_text())["seconds"],
        "val_loss": [r["val_loss"] for r in rounds],
        "final": final,
        "probes": [r.get("probes") or {} for r in rounds],
    }


def final_val_loss(out: Path, settings) -> float:
    """The last checkpoint's validation loss in the library's fixed validation batches
    (``task.VAL_BATCH_SIZE``). Runs logged before that fix scored validation in
    batches of their own training batch size, which is not comparable across batch sizes;
    this re-scores every row the same way (cached beside the run)."""
    cache = out / "val_loss_fixed.json"
    if cache.is_file():
        return json.loads(cache.read_text())["val_loss"]
    from fedspeech.apps.pretrain.task import VAL_BATCH_SIZE, validation_loader
    from fedspeech.federated import checkpoints
    from fedspeech.ssl.methods import get_method
    from fedspeech.ssl.train import evaluate_loss

    method = get_method(settings)
    model = method.fresh_model()
    method.restore(model, checkpoints.latest_checkpoint(out))
    loss = evaluate_loss(model, method.objective, validation_loader(settings))
    cache.write_text(json.dumps({"val_loss": loss, "batch_size": VAL_BATCH_SIZE}))
    return loss


#: Variants that train exactly like another one (probes only read the global model after a
#: round; every client draws its own seeded randomness), tabulated as that one's seeds.
SAME_TRAINING = {"recipe-probed": "recipe"}

#: The centralised run each setting's rows are compared with.
REFERENCE = {"gao10": "centralised", "gao100": "gao100-centralised", "quick": "centralised"}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    sd = (sum((v - mean) ** 2 for v in values) / (len(values) - 1)) ** 0.5 if len(values) > 1 else 0.0
    return mean, sd


def summarise(rows: list[dict]) -> None:
    """One line per variant: its budget, seed 0's curve, the final validation loss over seeds
    (mean ± sd) and its ratio to the same setting's centralised run of the same seed."""
    probed = [r for r in rows if any(r.get("probes") or [])]
    rows = [{**r, "variant": SAME_TRAINING.get(r["variant"], r["variant"])} for r in rows]
    central = {(r["setting"], r["seed"]): r["final"] for r in rows if r["variant"] == REFERENCE[r["setting"]]}
    print(
        "\n| setting | variant | what it tests | rounds | local steps / client / round | examples seen | wall (seed "
        f"{rows[0]['seed']}) | val loss by round, as logged (seed {rows[0]['seed']}) "
        "| final val loss, batches of 8 | ÷ centralised |"
    )
    print("|---|---|---|---:|---:|---:|---:|---|---:|---:|")
    for name in dict.fromkeys(r["variant"] for r in rows):
        mine = [r for r in rows if r["variant"] == name]
        mean, sd = _mean_sd([r["final"] for r in mine])
        ratios = [r["final"] / central[(r["setting"], r["seed"])] for r in mine if (r["setting"], r["seed"]) in central]
        ratio = "-"
        if ratios:
            ratio_mean, ratio_sd = _mean_sd(ratios)
            ratio = f"{ratio_mean:.3f}" + (f" ± {ratio_sd:.3f}" if len(ratios) > 1 else "")
        first = mine[0]
        steps = f"{first['local_steps']:.1f}" if first["local_steps"] is not None else "-"
        curve = " ".join(f"{v:.2f}" for v in first["val_loss"][:: max(1, len(first["val_loss"]) // 12)])
        spread = f" ± {sd:.3f}" if len(mine) > 1 else ""
        print(
            f"| {first['setting']} | {name} | {VARIANTS[name][3]} | {first['rounds']} | {steps} "
            f"| {first['examples']} | "
            f"{first['seconds'] / 60:.1f} min | {curve} | {mean:.3f}{spread} (n={len(mine)}) | {ratio} |"
        )
    print(
        f"\n(contrastive chance level ln(101) = {math.log(101):.3f}; the loss also holds 0.1 x diversity; "
        "curves longer than 12 rounds are shown every few rounds)"
    )
    for r in probed:
        for task in sorted({t for p in r["probes"] for t in p}):
            scores = [p.get(task) for p in r["probes"]]
            best = max(s for s in scores if s is not None)
            print(
                f"{r['variant']} seed {r['seed']}: per-round {task} probe (dev accuracy) "
                + " ".join(f"{s:.3f}" for s in scores if s is not None)
                + f"; best {best:.3f} vs round 1 {scores[0]:.3f}: {'rises' if best > scores[0] else 'does not rise'}"
            )


def plot(rows: list[dict], out: str, seed: int) -> Path:
    """Validation loss against the fraction of the examples budget seen, one line per variant
    (runs with other round counts line up by examples, not by round)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from fedspeech.figures import save_figure

    settings = list(dict.fromkeys(r["setting"] for r in rows))
    fig, axes = plt.subplots(1, len(settings), figsize=(6.5 * len(settings), 4.2), squeeze=False)
    for ax, setting in zip(axes[0], settings):
        for r in (r for r in rows if r["setting"] == setting and r["seed"] == seed):
            total = sum(r["examples_by_round"])
            seen = [sum(r["examples_by_round"][: i + 1]) / total for i in range(len(r["val_loss"]))]
            style = dict(color="black", linewidth=2.5) if r["centralised"] else {}
            ax.plot(seen, r["val_loss"], marker="." if len(seen) > 12 else "o", label=r["variant"], **style)
        ax.axhline(math.log(101), color="grey", linestyle=":", label="chance (ln 101)")
        ax.set_title(f"{setting}, seed {seed}")
        ax.set_xlabel("fraction of the examples budget seen")
        ax.set_ylabel("validation loss (held-out speakers)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    return save_figure(fig, out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("variants", nargs="*", help="variants to run (default: all)")
    parser.add_argument("--work", default="runs/fed-ssl-recipe")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--jobs", type=int, default=2, help="runs at a time (one torch thread each)")
    parser.add_argument("--list", action="store_true")
    parser.add_argument("--json", default=None, help="also write the rows here")
    parser.add_argument("--plot", default=None, help="also plot validation loss vs examples seen (PNG)")
    parser.add_argument("--cached-only", action="store_true", help="tabulate the finished runs only; run nothing")
    parser.add_argument(
        "--without-reference",
        action="store_true",
        help="do not add each setting's centralised run (no ratio column for it)",
    )
    args = parser.parse_args()
    if args.list:
        for name, (setting, overrides, central, what) in VARIANTS.items():
            print(f"{name:24s} [{setting}] {what}  {overrides}{' (centralised)' if central else ''}")
        return
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {unknown}; --list names them")
    references = [REFERENCE[s] for s in dict.fromkeys(VARIANTS[n][0] for n in names)]
    names = list(dict.fromkeys([*([] if args.without_reference else references), *names]))
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    # The data first, in this process, so parallel runs do not both synthesise it.
    for setting in dict.fromkeys(VARIANTS[n][0] for n in names):
        setting_data(work, setting)
    print(f"recipe {RECIPE}; settings {SETTINGS}; load average {os.getloadavg()[0]:.1f}", flush=True)
    jobs = [(n, s) for s in args.seeds for n in names]
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(run_variant, n, s, args.work, cached_only=args.cached_only) for n, s in jobs]
        rows = []
        for future in futures:
            row = future.result()
            if row is None:
                continue
            rows.append(row)
            print(
                f"  {row['variant']} seed {row['seed']}: final val loss {row['final']:.3f} "
                f"({row['seconds'] / 60:.1f} min)",
                flush=True,
            )
    summarise(rows)
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
    if args.plot:
        print(f"plot: {plot(rows, args.plot, args.seeds[0])}")


if __name__ == "__main__":
    main()
