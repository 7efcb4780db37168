"""Poisoning and faults in federated pretraining: what each defence keeps of the clean run.

Ten speaker clients, all in every round; in the attacked runs two of them (20 %) send
scaled (x100, model replacement) or sign-flipped updates every round, through the fault
injection of ``federated/faults.py``. Each row is one pretraining run of the same seed and
budget; the table gives the final validation contrastive loss (held-out speakers) and its
ratio to the clean FedAvg run, measured side by side in this one invocation:

    .venv/bin/python benchmarks/robustness.py --work runs/robustness [--rounds 6] [--local-epochs 1] [--jobs 2]

Rows are cached under ``--work`` (rerunning prints the table); docs/reliability.md shows
the result. Slow (minutes per row on 2 cores), so it is a benchmark, not a test.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
import ssl_quality  # noqa: E402  (the built-in corpus and pretraining pool)

ATTACKERS = "malicious=0:5"  # partition ids 0 and 5: 2 of 10 clients
#: name -> (settings overrides, what it shows)
VARIANTS: dict[str, tuple[dict, str]] = {
    "clean-fedavg": ({}, "no attack, FedAvg (the reference)"),
    "scale-fedavg": ({"faults": f"scale=100:0,{ATTACKERS}"}, "2 of 10 clients send 100x updates; plain FedAvg"),
    "scale-normguard": (
        {"faults": f"scale=100:0,{ATTACKERS}", "update_norm_ratio": 3.0},
        "same attack; updates above 3x the round's median norm refused",
    ),
    "scale-median": ({"faults": f"scale=100:0,{ATTACKERS}", "strategy": "median"}, "same attack; coordinate median"),
    "flip-fedavg": ({"faults": f"flip=0,{ATTACKERS}"}, "2 of 10 clients send sign-flipped updates; plain FedAvg"),
    "flip-trimmed": (
        {"faults": f"flip=0,{ATTACKERS}", "strategy": "trimmed", "trim_fraction": 0.2},
        "same attack; trimmed mean (20 % each side)",
    ),
    "crash-fedavg": ({"faults": "crash=0.2"}, "each client crashes with probability 0.2 per round; FedAvg"),
    # Differential privacy: clipping alone, then Gaussian noise of two multipliers (epsilon in the log).
    "dp-clip1": ({"clip_norm": 1.0, "dp_noise": 0.0}, "updates clipped to norm 1, no noise"),
    "dp-z0.1": ({"clip_norm": 1.0, "dp_noise": 0.1}, "DP-FedAvg: clip 1, noise multiplier 0.1"),
    "dp-z1": ({"clip_norm": 1.0, "dp_noise": 1.0}, "DP-FedAvg: clip 1, noise multiplier 1"),
}


def run_variant(name: str, work: str, rounds: int, seed: int, local_epochs: int = 1) -> dict:
    """One cached row: final validation loss and the refusals per round."""
    import torch

    from fedspeech.apps.pretrain.run import run_pretraining
    from fedspeech.apps.pretrain.settings import PretrainSettings
    from fedspeech.cli import quiet_logging
    from fedspeech.data.manifest import read_manifest
    from fedspeech.data.partition import make_partition

    quiet_logging()
    torch.set_num_threads(1)
    root = Path(work)
    tag = f"{name}-r{rounds}-s{seed}" + (f"-e{local_epochs}" if local_epochs != 1 else "")
    cache = root / f"{tag}.json"
    if cache.is_file():
        return json.loads(cache.read_text())
    manifest = ssl_quality.pretraining_manifest(ssl_quality.corpus(root, 24, seed), 12, seed)
    partition = root / f"partition-10-s{seed}.json"
    if not partition.is_file():
        make_partition(read_manifest(manifest), "speaker", 10, seed, manifest=str(manifest)).save(partition)
    out = root / tag
    overrides, _ = VARIANTS[name]
    settings = PretrainSettings(
        manifest=str(manifest),
        partition=str(partition),
        out_dir=str(out),
        rounds=rounds,
        local_epochs=local_epochs,
        seed=seed,
        val_max_utterances=32,
        keep_checkpoints=1,
        resume=out.exists(),
        **overrides,
    )
    started = time.perf_counter()
    records = run_pretraining(settings)
    row = {
        "variant": name,
        "rounds": rounds,
        "seed": seed,
        "local_epochs": local_epochs,
        "folder": str(out),
        "val_loss": [r["val_loss"] for r in records],
        "refused_per_round": [len(r["aggregation"].get("refused", {})) for r in records],
        "failed_per_round": [len(r["failed"]) for r in records],
        "seconds": time.perf_counter() - started,
        "epsilon": records[-1]["aggregation"].get("dp", {}).get("epsilon"),
    }
    cache.write_text(json.dumps(row, indent=2))
    return row


def final_weights_finite(work: str, row: dict) -> bool:
    """Whether the run's last global model is still finite (a poisoned FedAvg run is not)."""
    from safetensors.numpy import load_file

    from fedspeech.federated import checkpoints

    out = Path(row["folder"]) if "folder" in row else Path(work) / f"{row['variant']}-r{row['rounds']}-s{row['seed']}"
    latest = checkpoints.latest_checkpoint(out)
    if latest is None:
        return False
    return all(np.isfinite(v).all() for v in load_file(str(latest / "model.safetensors")).values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", default="runs/robustness")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--local-epochs", type=int, default=1, help="3 makes the clean run learn (docs/reliability.md)")
    parser.add_argument("--jobs", type=int, default=2, help="runs in parallel (one thread each)")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    Path(args.work).mkdir(parents=True, exist_ok=True)
    # the corpus once, before the workers race to build it
    ssl_quality.pretraining_manifest(ssl_quality.corpus(Path(args.work), 24, args.seed), 12, args.seed)
    with ProcessPoolExecutor(args.jobs) as pool:
        count = len(args.variants)
        rows = list(
            pool.map(
                run_variant,
                args.variants,
                [args.work] * count,
                [args.rounds] * count,
                [args.seed] * count,
                [args.local_epochs] * count,
            )
        )
    clean = next((r for r in rows if r["variant"] == "clean-fedavg"), None)
    print(
        "\n| variant | what it shows | val loss by round | final | ÷ clean | refused / failed clients per round "
        "| final weights finite | epsilon (delta 1e-5) | wall |"
    )
    print("|---|---|---|---:|---:|---|---|---:|---:|")
    for row in rows:
        final = row["val_loss"][-1]
        ratio = f"{final / clean['val_loss'][-1]:.3f}" if clean and math.isfinite(final) else "-"
        curve = " ".join(f"{v:.2f}" for v in row["val_loss"])
        faults = " ".join(f"{a}/{b}" for a, b in zip(row["refused_per_round"], row["failed_per_round"]))
        finite = "yes" if final_weights_finite(args.work, row) else "no"
        epsilon = f"{row['epsilon']:.1f}" if row.get("epsilon") is not None else "-"
        print(
            f"| {row['variant']} | {VARIANTS[row['variant']][1]} | {curve} | {final:.3f} | {ratio} | {faults} "
            f"| {finite} | {epsilon} | {row['seconds'] / 60:.1f} min |"
        )
    epochs = f"{args.local_epochs} local epoch" + ("s" if args.local_epochs != 1 else "")
    print(f"\n(seed {args.seed}, {args.rounds} rounds of {epochs}, 10 clients, batch 1; n=1 per row)")


if __name__ == "__main__":
    main()
