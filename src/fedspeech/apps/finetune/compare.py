"""``fedspeech compare``: one table and plot of downstream quality across backbones.

Each backbone (random init, centralised SSL, federated SSL under each rule, 10- or
100-client setting, ...) is fine-tuned with the *same* recipe and budget on every task, so
differences come from the representation alone. A backbone is a preset name (random
init), a HF checkpoint folder, or a pretraining run folder, for which the task's best
round (``best/TASK``, from the per-round probes) is used when present, else the last
round.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from fedspeech.downstream.tasks import task_data
from fedspeech.figures import save_figure

# The headline metric per task and whether higher is better.
METRICS = {"kws": ("accuracy", True), "speaker": ("accuracy", True), "asr": ("cer", False)}


def resolve_backbone(source: str, task: str) -> str:
    """A preset, an HF folder, or a run folder (→ its best checkpoint for ``task``)."""
    from fedspeech.downstream.heads import is_preset
    from fedspeech.federated.checkpoints import latest_checkpoint

    if is_preset(source):
        return source
    folder = Path(source)
    if (folder / "config.json").is_file():
        return str(folder)
    best = folder / "best" / task
    if (best / "config.json").is_file():
        return str(best)
    latest = latest_checkpoint(folder)
    if latest is None:
        raise ValueError(f"backbone {source}: not a preset, an HF folder or a run folder with checkpoints")
    return str(latest)


def compare_backbones(
    backbones: Mapping[str, str],
    manifest: str | Path,
    tasks: Sequence[str],
    *,
    epochs: int = 5,
    max_steps: int | None = None,
    batch_size: int = 8,
    lr_backbone: float = 5e-5,
    lr_head: float = 1e-3,
    max_seconds: float | None = 2.0,
    freeze_cnn: bool = True,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Fine-tune every backbone on every task with one recipe; one row per (backbone, task)."""
    from fedspeech.data.manifest import read_manifest
    from fedspeech.downstream.finetune import finetune_asr, finetune_classifier

    utterances = read_manifest(manifest)
    rows = []
    for task in tasks:
        if task not in METRICS:
            raise ValueError(f"task {task!r}: choose from {sorted(METRICS)}")
        data = task_data(utterances, task, seed=seed)
        for name, source in backbones.items():
            path = resolve_backbone(source, task)
            common: dict[str, Any] = dict(
                dev_utts=data.dev or None,
                epochs=epochs,
                max_steps=max_steps,
                batch_size=batch_size,
                lr_backbone=lr_backbone,
                lr_head=lr_head,
                max_seconds=max_seconds,
                freeze_cnn=freeze_cnn,
                seed=seed,
            )
            if task == "asr":
                result = finetune_asr(path, data.train, data.test, **common)
            else:
                result = finetune_classifier(path, data.train, data.test, task=task, **common)
            metric, _ = METRICS[task]
            rows.append(
                {
                    "backbone": name,
                    "source": path,
                    "task": task,
                    "metric": metric,
                    "score": float(result[metric]),
                    "wer": result.get("wer"),
                }
            )
    return rows


def comparison_table(rows: Sequence[dict]):
    from rich.table import Table

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    table = Table(title="Downstream quality by backbone (same fine-tuning recipe)")
    table.add_column("backbone")
    for task in tasks:
        metric, higher = METRICS[task]
        table.add_column(f"{task} {metric} ({'↑' if higher else '↓'})", justify="right")
    for backbone in dict.fromkeys(r["backbone"] for r in rows):
        scores = {r["task"]: r["score"] for r in rows if r["backbone"] == backbone}
        table.add_row(backbone, *(f"{scores[t]:.3f}" if t in scores else "-" for t in tasks))
    return table


def plot_comparison(rows: Sequence[dict], out: str | Path) -> Path:
    """Grouped bars: one group per task, one bar per backbone."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(dict.fromkeys(r["task"] for r in rows))
    names = list(dict.fromkeys(r["backbone"] for r in rows))
    fig, axes = plt.subplots(1, len(tasks), figsize=(3.2 * len(tasks) + 1, 3.6), squeeze=False)
    for ax, task in zip(axes[0], tasks):
        scores = [next((r["score"] for r in rows if r["task"] == task and r["backbone"] == n), 0.0) for n in names]
        ax.bar(range(len(names)), scores, color=[f"C{i}" for i in range(len(names))])
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        metric, higher = METRICS[task]
        ax.set_title(f"{task}: {metric} ({'higher' if higher else 'lower'} is better)", fontsize=9)
    return save_figure(fig, out)


def run_compare(args) -> int:
    from rich.console import Console

    backbones = {}
    for item in args.backbone:
        name, _, source = item.partition("=")
        if not source:
            raise ValueError(f"--backbone {item!r}: expected NAME=SOURCE (preset, HF folder or run folder)")
        backbones[name] = source
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    rows = compare_backbones(
        backbones,
        args.manifest,
        tasks,
        epochs=args.epochs,
        max_steps=args.max_steps,
        batch_size=args.batch_size,
        max_seconds=args.max_seconds,
        lr_backbone=args.lr_backbone,
        lr_head=args.lr_head,
        freeze_cnn=args.freeze_cnn,
        seed=args.seed,
    )
    Console().print(comparison_table(rows))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "compare.json").write_text(json.dumps(rows, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {out / 'compare.json'} and {plot_comparison(rows, out / 'compare.png')}")
    return 0


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare", help="fine-tune several backbones with one recipe and compare them on every task"
    )
    parser.add_argument(
        "--backbone",
        action="append",
        required=True,
        metavar="NAME=SOURCE",
        help="repeatable; SOURCE = preset (random init), HF folder, or pretraining run folder",
    )
    parser.add_argument("--manifest", required=True)
    parser.add_argument("--tasks", default="kws,asr,speaker")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--max-steps", type=int, default=None)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-seconds", type=float, default=2.0)
    parser.add_argument("--lr-backbone", type=float, default=5e-5)
    parser.add_argument("--lr-head", type=float, default=1e-3)
    parser.add_argument(
        "--freeze-cnn",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the CNN frozen (--no-freeze-cnn when a random-init row is compared: "
        "a frozen random CNN would handicap it)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", required=True, help="folder for compare.json and compare.png")
    parser.set_defaults(func=run_compare)
