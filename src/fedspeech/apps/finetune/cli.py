"""``fedspeech finetune asr|kws|speaker``: fine-tuning of a backbone, centralised or
(``--federated``) on Flower with the same runners as pretraining.

Data come from one manifest: train split to train, test split to report, dev split (when
present) to pick the best epoch (federated: the best round). Speaker ID instead divides
every speaker's utterances between train and test (see ``fedspeech.downstream.tasks``).
Federated clients are a speaker partition of the training utterances
(``fedspeech.apps.finetune``). Heavy modules load inside the command, so
``--help`` stays fast.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path

from fedspeech.apps.finetune.settings import RUNNERS
from fedspeech.apps.finetune.settings import STRATEGIES as FED_STRATEGIES
from fedspeech.federated.rules import GUARDED_HELPS, GuardedSettings
from fedspeech.settings import add_settings_flags

TASK_CHOICES = ("asr", "kws", "speaker")
_RULE_OPTIONS = (
    "loss_temperature",
    "mixed_beta",
    "ldawa_warmup",
    "trim_fraction",
    *(f.name for f in dataclasses.fields(GuardedSettings)),
)
_FEDERATED_ONLY = (
    "clients",
    "clients_per_round",
    "rounds",
    "local_epochs",
    "runner",
    "out",
    "partition",
    "strategy",
    *_RULE_OPTIONS,
)
_MAX_MATRIX_LABELS = 20  # a larger confusion matrix does not fit a terminal


def register(subparsers: argparse._SubParsersAction) -> None:
    """Add ``finetune`` and ``compare``."""
    parser = subparsers.add_parser(
        "finetune", help="fine-tune a backbone on a downstream task (centralised, or federated with --federated)"
    )
    parser.add_argument(
        "task", choices=TASK_CHOICES, help="asr (character CTC), kws (keywords) or speaker (speaker ID)"
    )
    parser.add_argument("--manifest", required=True, type=Path, metavar="M", help="manifest TSV")
    parser.add_argument(
        "--backbone",
        default="tiny",
        metavar="tiny|base|large|FOLDER",
        help="model preset (random init) or local HF checkpoint folder (default tiny)",
    )
    parser.add_argument("--epochs", type=_positive_int, metavar="E", help="centralised: passes over train (default 10)")
    parser.add_argument("--max-steps", type=_positive_int, metavar="N", help="centralised: stop after N updates")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="B", help="default 8")
    parser.add_argument("--lr-backbone", type=_positive_float, default=5e-5, metavar="LR", help="default 5e-5")
    parser.add_argument("--lr-head", type=_positive_float, default=1e-3, metavar="LR", help="default 1e-3")
    parser.add_argument(
        "--freeze-cnn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the CNN feature encoder frozen (default: frozen)",
    )
    parser.add_argument("--freeze-backbone", action="store_true", help="train the head only (linear probe)")
    parser.add_argument(
        "--layer-weighted", action="store_true", help="kws/speaker: learn a weighted sum of all hidden layers"
    )
    parser.add_argument(
        "--max-seconds",
        type=_positive_float,
        metavar="S",
        help="kws/speaker: crop clips to S seconds; asr: skip training clips longer than S",
    )
    parser.add_argument("--no-dev", action="store_true", help="ignore the dev split; evaluate the last epoch")
    parser.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="also write the full result as JSON")
    federated = parser.add_argument_group("federated fine-tuning (--federated)")
    federated.add_argument(
        "--federated",
        action="store_true",
        help="fine-tune on Flower: clients are speaker partitions of the training data",
    )
    federated.add_argument(
        "--clients",
        type=_positive_int,
        metavar="N",
        help="clients (speaker-disjoint partition of the training data; default 2)",
    )
    federated.add_argument(
        "--partition",
        type=Path,
        metavar="FILE",
        help="use this partition JSON (fedspeech partition) instead of making one",
    )
    federated.add_argument("--clients-per-round", type=_positive_int, metavar="K", help="default: all clients")
    federated.add_argument("--rounds", type=_positive_int, metavar="R", help="default 10")
    federated.add_argument("--local-epochs", type=_positive_int, metavar="E", help="per client and round (default 1)")
    federated.add_argument("--strategy", choices=FED_STRATEGIES, help="aggregation rule (default fedavg)")
    federated.add_argument(
        "--loss-temperature",
        type=_positive_float,
        metavar="T",
        help="loss and mixed rules: softmax temperature (default 1.0)",
    )
    federated.add_argument("--mixed-beta", type=float, metavar="B", help="mixed rule: FedAvg share (default 0.2)")
    federated.add_argument(
        "--ldawa-warmup", type=int, metavar="R", help="ldawa: plain FedAvg for this many rounds (default 2)"
    )
    federated.add_argument(
        "--trim-fraction", type=float, metavar="F", help="trimmed: share of extreme values dropped (default 0.1)"
    )
    # the screening, privacy and fault flags every federated workload shares
    add_settings_flags(federated, GuardedSettings, GUARDED_HELPS)
    federated.add_argument(
        "--runner", choices=RUNNERS, help="inprocess (default, no Ray) or Flower's Simulation Engine"
    )
    federated.add_argument(
        "--out",
        type=Path,
        metavar="DIR",
        help="run folder: rounds.jsonl, result.json, best checkpoint (default runs/finetune)",
    )
    parser.set_defaults(func=_run_finetune)

    from fedspeech.apps.finetune.compare import register as register_compare

    register_compare(subparsers)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {value}")
    return value


def _run_finetune(args: argparse.Namespace) -> int:
    if args.federated:
        return _run_federated(args)
    given = [name for name in _FEDERATED_ONLY if getattr(args, name) is not None]
    if given:
        raise ValueError(f"--{given[0].replace('_', '-')} applies to --federated fine-tuning only")
    from fedspeech.data.manifest import read_manifest
    from fedspeech.downstream.finetune import finetune_asr, finetune_classifier
    from fedspeech.downstream.heads import is_preset
    from fedspeech.downstream.tasks import task_data

    if not is_preset(args.backbone) and not (Path(args.backbone) / "config.json").is_file():
        raise ValueError(f"--backbone {args.backbone}: not a preset (tiny, base, large) and no config.json there")
    data = task_data(read_manifest(args.manifest), args.task, seed=args.seed)
    common = dict(
        dev_utts=None if args.no_dev else data.dev,
        epochs=args.epochs or 10,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        lr_backbone=args.lr_backbone,
        lr_head=args.lr_head,
        freeze_cnn=args.freeze_cnn,
        freeze_backbone=args.freeze_backbone,
        max_seconds=args.max_seconds,
        seed=args.seed,
    )
    if args.task == "asr":
        if args.layer_weighted:
            raise ValueError("--layer-weighted applies to kws and speaker only")
        result = finetune_asr(args.backbone, data.train, data.test, **common)
    else:
        result = finetune_classifier(
            args.backbone, data.train, data.test, task=args.task, layer_weighted=args.layer_weighted, **common
        )
    result["manifest"] = str(args.manifest)
    print_result(result)
    _write_json(args, result)
    return 0


def _run_federated(args: argparse.Namespace) -> int:
    from fedspeech.apps.finetune.run import run_federated_finetune
    from fedspeech.apps.finetune.settings import FinetuneSettings

    for name in ("epochs", "max_steps"):
        if getattr(args, name) is not None:
            flag = "--" + name.replace("_", "-")
            raise ValueError(f"{flag}: federated fine-tuning counts --rounds and --local-epochs instead")
    given = {
        "clients": args.clients,
        "clients_per_round": args.clients_per_round,
        "rounds": args.rounds,
        "local_epochs": args.local_epochs,
        "strategy": args.strategy,
        **{name: getattr(args, name) for name in _RULE_OPTIONS},
        "out_dir": str(args.out) if args.out else None,
        "partition": str(args.partition) if args.partition else None,
    }
    settings = FinetuneSettings(
        task=args.task,
        manifest=str(args.manifest),
        backbone=str(args.backbone),
        batch_size=args.batch_size,
        lr_backbone=args.lr_backbone,
        lr_head=args.lr_head,
        freeze_cnn=args.freeze_cnn,
        freeze_backbone=args.freeze_backbone,
        layer_weighted=args.layer_weighted,
        max_seconds=args.max_seconds or 0.0,
        use_dev=not args.no_dev,
        seed=args.seed,
        **{k: v for k, v in given.items() if v is not None},
    )
    result = run_federated_finetune(settings, runner=args.runner or "inprocess")
    result["manifest"] = str(args.manifest)
    print_result(result)
    print(f"run folder: {result['out_dir']} (rounds.jsonl, result.json, best round's checkpoint)")
    _write_json(args, result)
    return 0


def _write_json(args: argparse.Namespace, result: dict) -> None:
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
        print(f"wrote {args.json}")


def print_result(result: dict) -> None:
    """Metrics, training curve and (for classifiers) the confusion matrix."""
    from rich.console import Console
    from rich.table import Table

    console = Console()
    federated = result.get("federated", False)
    how = f"federated ({result['num_clients']} clients, {result['rounds']} rounds) " if federated else ""
    table = Table(title=f"{result['task']} {how}fine-tuning of {result['backbone']} (seed {result['seed']})")
    table.add_column("metric")
    table.add_column("value", justify="right")
    metrics = ("wer", "cer", "loss") if result["task"] == "asr" else ("accuracy", "macro_accuracy", "loss")
    for name in metrics:
        table.add_row(f"test {name}", f"{result[name]:.4f}")
    best, losses = ("best_round", "round_losses") if federated else ("best_epoch", "epoch_losses")
    for name in (
        "num_train",
        "num_dev",
        "num_eval",
        "steps",
        best,
        "selected_on",
        "trainable_parameters",
        "train_seconds",
    ):
        table.add_row(name, str(result[name]))
    table.add_row(losses.replace("_", " "), " ".join(f"{loss:.3f}" for loss in result[losses]))
    console.print(table)

    if result["task"] == "asr":
        examples = Table(title="examples")
        for column in ("id", "reference", "hypothesis"):
            examples.add_column(column)
        for ex in result["examples"]:
            examples.add_row(ex["id"], ex["reference"], ex["hypothesis"])
        console.print(examples)
    elif len(result["labels"]) <= _MAX_MATRIX_LABELS:
        matrix = Table(title="confusion matrix (rows: true, columns: predicted)")
        matrix.add_column("")
        for label in result["labels"]:
            matrix.add_column(label, justify="right")
        for label, row in zip(result["labels"], result["confusion_matrix"], strict=True):
            matrix.add_row(label, *(str(v) for v in row))
        console.print(matrix)
