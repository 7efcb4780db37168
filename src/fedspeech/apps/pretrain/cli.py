"""``fedspeech pretrain``: federated (or centralised) self-supervised pretraining."""

from __future__ import annotations

import argparse
from pathlib import Path

from fedspeech.apps.pretrain.settings import METHODS, SERVER_OPTIMIZERS, STRATEGIES, PretrainSettings
from fedspeech.federated.rules import GUARDED_HELPS
from fedspeech.federated.runners import RUNNERS
from fedspeech.settings import add_settings_flags, given_settings

# Client settings of the reference study (Gao et al., Interspeech 2022), 1 local epoch. Its
# batch 4 is `--batch-size 4`; the presets keep the default batch 1, which learns faster at
# the same examples seen (benchmarks/fed_ssl_recipe.py).
PRESETS = {
    "gao10": {"clients": 10, "clients_per_round": 0, "local_epochs": 1},
    "gao100": {"clients": 100, "clients_per_round": 20, "local_epochs": 1},
}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``PretrainSettings`` field, so the CLI and Flower's run config agree."""
    helps = {
        "manifest": "corpus manifest (TSV)",
        "partition": "client partition JSON (fedspeech partition)",
        "out_dir": "run folder (round log, checkpoints, plots)",
        "model": "tiny, base, large or a local HF checkpoint folder",
        "method": f"SSL method: {', '.join(METHODS)}",
        "strategy": f"aggregation rule: {', '.join(STRATEGIES)}",
        "backbone_only": "send and aggregate only the backbone; heads stay on the clients",
        "clients_per_round": "clients sampled per round (0 = all)",
        "max_seconds": "random crop length for training",
        "resume": "continue the run in --out from its last completed round",
        "lr_schedule": "round: one learning rate per round; step: the warm-up/cosine curve followed step by step",
        "optimizer_state": "clients' AdamW moments between rounds: reset, client (kept in the node's state) or "
        "server (averaged by the server and sent back; 3x the traffic)",
        "server_optimizer": f"server-side step after the rule (Flower's strategies): {', '.join(SERVER_OPTIMIZERS)}",
        "server_lr": "server learning rate (FedAvgM server_learning_rate, FedAdam/FedYogi/FedAdagrad eta)",
        "server_momentum": "server momentum (FedAvgM server_momentum, FedAdam/FedYogi beta_1)",
        "server_tau": "FedAdam/FedYogi/FedAdagrad adaptivity tau",
        "server_optimizer_scope": "weight-name prefixes the server step applies to, e.g. "
        "'wav2vec2.feature_extractor.' (default: all; the rest takes the rule's aggregate)",
        "savers": "memory savers every client applies to its model, e.g. 'recompute-cnn ckpt-transformer "
        "fused-quantizer' (exact: same training), or 'cache-cnn' (a frozen CNN computed once per crop; "
        "docs/performance.md)",
    }
    add_settings_flags(parser, PretrainSettings, {**GUARDED_HELPS, **helps}, flag_names={"out_dir": "--out"})


def settings_from_args(args: argparse.Namespace) -> PretrainSettings:
    values = given_settings(args, PretrainSettings)
    if getattr(args, "preset", None):
        preset = {k: v for k, v in PRESETS[args.preset].items() if k != "clients"}
        values = {**preset, **values}
    return PretrainSettings(**values)


def _check_preset(preset: str | None, settings: PretrainSettings) -> None:
    """A preset's client count must match the partition it runs on."""
    if not preset:
        return
    from fedspeech.data.partition import Partition

    clients = Partition.load(settings.partition).num_clients
    if clients != PRESETS[preset]["clients"]:
        raise ValueError(
            f"--preset {preset} needs a partition with {PRESETS[preset]['clients']} clients; "
            f"{settings.partition} has {clients}"
        )


def _pretrain(args: argparse.Namespace) -> int:
    from fedspeech.apps.pretrain.run import run_centralised, run_pretraining

    settings = settings_from_args(args)
    if not settings.manifest:
        raise ValueError("--manifest is required")
    if args.centralised:
        records = run_centralised(settings)
    else:
        if not settings.partition:
            raise ValueError("--partition is required (make one with `fedspeech partition`)")
        _check_preset(args.preset, settings)
        records = run_pretraining(settings, runner=args.runner)
    last = records[-1] if records else None
    if last:
        print(f"round {last['round']}: train loss {last['train_loss']:.4f}, val loss {last['val_loss']}")
    print(f"run folder: {Path(settings.out_dir).resolve()}")
    return 0


def _plot(args: argparse.Namespace) -> int:
    from fedspeech.federated.plots import plot_validation_curves

    path = plot_validation_curves(args.runs, args.out, labels=args.labels)
    print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "pretrain",
        help="federated self-supervised pretraining (wav2vec 2.0 or feature matching)",
        description="Federated SSL pretraining on Flower. Every setting is also a Flower run-config key "
        "(kebab-case), so `flwr run .` takes the same settings.",
    )
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="reference-study client settings: gao10 = 10 clients all per round; gao100 = 20 of "
        "100 per round (partition with that many clients); 1 local epoch (the study's batch 4: "
        "--batch-size 4)",
    )
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default="inprocess",
        help="inprocess (default, no Ray), Flower's Simulation Engine, or Flower's Deployment Engine "
        "on this machine (SuperLink + one SuperNode per client on loopback, TLS, "
        "SuperNode authentication)",
    )
    parser.add_argument(
        "--centralised",
        action="store_true",
        help="centralised baseline: same model and objective on the pooled training data, "
        "same number of examples per round as the federated run",
    )
    add_settings_arguments(parser)
    parser.set_defaults(func=_pretrain)

    plot = subparsers.add_parser("plot-rounds", help="plot validation loss vs round for several runs")
    plot.add_argument("runs", nargs="+", help="run folders (each with rounds.jsonl)")
    plot.add_argument("--labels", nargs="*", help="legend labels (default: folder names)")
    plot.add_argument("--out", required=True, help="PNG to write")
    plot.set_defaults(func=_plot)
