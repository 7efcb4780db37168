"""``fedspeech early-exit``: federated early-exit fine-tuning on a heterogeneous fleet, the
method and its baselines, with a side-by-side table and plots; keyword spotting
(``--task kws``) or character CTC speech recognition (``--task asr``)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from fedspeech.apps.earlyexit.settings import DEFAULT_FLEET, MODES, PRECISIONS, TASKS, EarlyExitSettings
from fedspeech.federated.rules import GUARDED_HELPS
from fedspeech.federated.runners import RUNNERS
from fedspeech.settings import add_settings_flags, given_settings

_CHOICES = {"precision": PRECISIONS, "task": TASKS}
# Set by --modes (one run folder per mode under --out), so not flags of their own.
_NOT_FLAGS = {"mode", "out_dir"}
_HELPS = {
    "manifest": "corpus manifest (TSV) with keyword labels (kws) or sentence transcripts (asr)",
    "task": "kws: a keyword classifier per exit, accuracy; asr: a character CTC head per exit, WER and CER "
    "(greedy decoding) on the sentence utterances",
    "letters": "asr: letters of the character vocabulary besides the word break and \"'\" ('' = a-z)",
    "max_seconds": "kws: random crop length for training",
    "asr_max_seconds": "asr: training sentences longer than this are dropped, never cropped",
    "partition": "client partition JSON (fedspeech partition)",
    "model": "tiny, base, large or a local HF checkpoint folder (e.g. from `fedspeech pretrain`)",
    "num_layers": "Transformer layers (0 = the model's own)",
    "model_overrides": "JSON object of HF config overrides",
    "exit_every": "an exit after every this many layers",
    "exits": "comma-separated exit layers (instead of --exit-every)",
    "fleet": f"device per client: 'dev:fraction,...', 'dev,dev,...' or a .json/.toml fleet file "
    f"(default {DEFAULT_FLEET})",
    "catalogue": "extra device catalogue JSON",
    "deadline": "simulated device seconds per round (0 = the tightest deadline that leaves nobody out)",
    "precision": f"{', '.join(PRECISIONS)}: mixed precision only where the device has it",
    "labels": "kws: comma-separated classes (default: the 10 keywords + _unknown_)",
    "clients_per_round": "clients sampled per round (0 = all taking part)",
    "distill_lambda": "self-distillation weight between exits (DepthFL)",
    "eval_splits": "held-out manifest splits to evaluate on, comma-separated",
    "resume": "continue the runs in --out from their last completed round",
    "freeze_feature_encoder": "keep the CNN frozen: neither trained nor sent",
    "cache_cnn_features": "with a frozen CNN, each client computes its features once per utterance "
    "(counted in its FLOPs) instead of at every step",
}


def add_settings_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per ``EarlyExitSettings`` field, so the CLI and Flower's run config agree."""
    add_settings_flags(parser, EarlyExitSettings, {**GUARDED_HELPS, **_HELPS}, choices=_CHOICES, skip=_NOT_FLAGS)


def settings_from_args(args: argparse.Namespace) -> EarlyExitSettings:
    values = {k: v for k, v in given_settings(args, EarlyExitSettings).items() if k not in _NOT_FLAGS}
    return EarlyExitSettings(out_dir=args.out, **values)


def write_report(runs: dict[str, list[dict]], out: Path) -> tuple[str, list[Path]]:
    """Summary JSON, Markdown table and plots of the runs under ``out``: ``accuracy_vs_*.png``
    for kws, ``wer_vs_*.png`` for asr."""
    from fedspeech.apps.earlyexit.report import (
        comparison_table,
        plot_accuracy_vs_compute,
        plot_accuracy_vs_exit,
        plot_file_stem,
        summarize,
        summary_task,
    )

    summaries = {mode: summarize(records) for mode, records in runs.items()}
    table = comparison_table(summaries)
    stem = plot_file_stem(summary_task(summaries))
    out.mkdir(parents=True, exist_ok=True)
    (out / "summary.json").write_text(json.dumps(summaries, indent=2) + "\n")
    (out / "summary.md").write_text(table + "\n")
    plots = [
        plot_accuracy_vs_exit(runs, out / f"{stem}_vs_exit.png"),
        plot_accuracy_vs_compute(runs, out / f"{stem}_vs_compute.png"),
    ]
    return table, plots


def _early_exit(args: argparse.Namespace) -> int:
    from fedspeech.apps.earlyexit.run import run_modes

    settings = settings_from_args(args)
    if not settings.manifest or not settings.partition:
        raise ValueError("--manifest and --partition are required (make a partition with `fedspeech partition`)")
    runs = run_modes(settings, args.modes, runner=args.runner, timeout=args.timeout)
    table, plots = write_report(runs, Path(args.out))
    print(table)
    for path in plots:
        print(f"wrote {path}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedspeech.federated.roundlog import read_rounds

    folder = Path(args.out)
    runs = {mode: read_rounds(folder / mode) for mode in args.modes if (folder / mode).is_dir()}
    if not runs:
        raise FileNotFoundError(f"{folder}: no run folders named {', '.join(args.modes)}")
    table, plots = write_report(runs, folder)
    print(table)
    for path in plots:
        print(f"wrote {path}")
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "early-exit",
        help="federated early-exit fine-tuning on heterogeneous devices (method + baselines)",
        description="Keyword spotting (--task kws) or character CTC speech recognition (--task asr) with an "
        "exit every few layers of an SSL backbone. Each client trains the "
        "depth its device affords within the round deadline and uploads only that; the server "
        "aggregates per tensor over the clients that trained it. Runs each --modes into OUT/<mode> and "
        "writes OUT/summary.md, OUT/accuracy_vs_exit.png and OUT/accuracy_vs_compute.png (asr: "
        "OUT/wer_vs_exit.png and OUT/wer_vs_compute.png; WER/CER, lower is better). Every "
        "setting is also a Flower run-config key (kebab-case).",
    )
    parser.add_argument("--out", default="runs/early-exit", help="folder of the runs, table and plots")
    parser.add_argument(
        "--modes",
        nargs="+",
        choices=MODES,
        default=list(MODES),
        help="adaptive = the method; full = full-depth FedAvg; exclusion = only full-depth-capable "
        "clients; smallest = everyone at the smallest affordable depth (default: all)",
    )
    parser.add_argument(
        "--runner",
        choices=RUNNERS,
        default="inprocess",
        help="inprocess (default, no Ray), Flower's Simulation Engine, or its Deployment Engine "
        "on this machine (SuperLink + one SuperNode per client, TLS, SuperNode auth)",
    )
    parser.add_argument("--timeout", type=float, default=3600.0, help="seconds per run under a Flower engine")
    add_settings_arguments(parser)
    parser.set_defaults(func=_early_exit)

    report = subparsers.add_parser("early-exit-report", help="table and plots of finished early-exit runs")
    report.add_argument("out", help="folder holding one run folder per mode")
    report.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    report.set_defaults(func=_report)
