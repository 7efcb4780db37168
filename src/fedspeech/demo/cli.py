"""``fedspeech demo`` (the main job, end to end) and ``fedspeech report`` (its HTML page).

The demo runs, on the built-in corpus: corpus -> speaker-disjoint clients -> profile and
feasibility on the device catalogue -> federated SSL pretraining with two rules and the
centralised baseline -> downstream keyword spotting and ASR -> early-exit federated
fine-tuning on a heterogeneous fleet -> ``OUT/report.html``. Each step is a ``fedspeech``
command (:mod:`fedspeech.demo.pipeline`); rerunning skips what is done.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from fedspeech.demo.pipeline import RUNNERS, DemoConfig


def _demo(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn
    from rich.table import Table

    from fedspeech.demo.pipeline import run_demo

    given = {k: v for k, v in vars(args).items() if k in DemoConfig.__dataclass_fields__ and v is not None}
    given["out"] = Path(args.out)
    if "rules" in given:
        given["rules"] = tuple(r.strip() for r in given["rules"].split(",") if r.strip())
    config = DemoConfig.reduced(**given) if args.reduced else DemoConfig(**given)
    console = Console()
    columns = (TextColumn("{task.description:<22}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[status]}"))  # fmt: skip
    tasks: dict[str, TaskID] = {}
    last: dict[str, str] = {}
    with Progress(*columns, console=console) as progress:

        def show(steps: dict) -> None:
            for name, step in steps.items():
                if not console.is_terminal and last.get(name) != step["status"]:  # a log: one line per change
                    console.print(f"{name}: {step['status']}")
                last[name] = step["status"]
                if name not in tasks:
                    tasks[name] = progress.add_task(name, total=1, status=step["status"])
                done, total = step.get("progress", (0, 1))
                finished = step["status"] in ("done", "skipped")
                seconds = step.get("seconds")
                status = step["status"] + ("" if seconds is None else f" {seconds:.0f} s")
                progress.update(tasks[name], total=total, completed=total if finished else done, status=status)

        console.print(f"fedspeech demo into {config.out} (logs per step in {config.out / 'logs'})")
        state = run_demo(config, jobs=args.jobs or 0, on_update=show)
    table = Table(title="fedspeech demo")
    for column in ("step", "status", "seconds"):
        table.add_column(column)
    for name, step in state["steps"].items():
        seconds = step.get("seconds")
        table.add_row(name, step["status"], "-" if seconds is None else f"{seconds:.1f}")
    console.print(table)
    console.print(f"report: {state['report']}")
    return 0


def _report(args: argparse.Namespace) -> int:
    from fedspeech.demo.report import write_report

    print(write_report(Path(args.out)))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("demo", help="the main job: a whole federated speech experiment with an HTML report")
    parser.add_argument("--out", default="runs/demo", help="demo folder (default: runs/demo)")
    parser.add_argument("--speakers", type=int, help="speakers in the built-in corpus (default 20)")
    parser.add_argument("--clients", type=int, help="speaker-disjoint federated clients (default 10)")
    parser.add_argument("--rounds", type=int, help="pretraining rounds (default 3)")
    parser.add_argument("--rules", help="comma-separated aggregation rules to pretrain with (default fedavg,loss)")
    parser.add_argument("--runner", choices=RUNNERS, help="Flower runner for the federated steps (default inprocess)")
    parser.add_argument("--seed", type=int, help="seed of every step (default 0)")
    parser.add_argument("--jobs", type=int, help="steps run at once (default 2 in-process, else 1)")
    parser.add_argument("--reduced", action="store_true", help="a few speakers and one round per stage (CI size)")
    parser.set_defaults(func=_demo)
    report = subparsers.add_parser("report", help="write OUT/report.html for a demo folder")
    report.add_argument("out", help="demo folder")
    report.set_defaults(func=_report)
