"""``fedspeech profile`` and ``fedspeech feasibility``: measure a workload, plan it on devices.

Heavy imports (torch, transformers, matplotlib) happen inside the command functions.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedspeech.profiling.savers import Savers

log = logging.getLogger("fedspeech.profiling")


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {text}")
    return value


def _seconds_list(text: str) -> list[float]:
    try:
        values = [float(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated seconds, got {text!r}") from None
    if not values or any(v <= 0 for v in values):
        raise argparse.ArgumentTypeError(f"expected positive seconds, got {text!r}")
    return values


def _add_workload_arguments(parser: argparse.ArgumentParser) -> None:
    from fedspeech.profiling.savers import PRECISIONS, PROFILER_SAVER_HELP

    parser.add_argument(
        "--model", default="base", help="tiny, base, large or a local HF checkpoint folder (default: base)"
    )
    parser.add_argument("--seconds", type=_positive_float, default=5.0, help="utterance length in seconds (default: 5)")
    parser.add_argument("--batch", type=_positive_int, default=1, help="batch size (default: 1)")
    parser.add_argument("--precision", choices=PRECISIONS, default="fp32", help="default: fp32")
    parser.add_argument(
        "--savers",
        nargs="*",
        default=[],
        metavar="SAVER",
        help=f"memory savers: {PROFILER_SAVER_HELP}; "
        "feasibility also takes 'auto' (exact savers per device, only where needed)",
    )
    parser.add_argument("--device-type", choices=("cpu", "cuda"), default="cpu", help="where to measure (default: cpu)")
    parser.add_argument("--threads", type=_positive_int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", type=Path, metavar="OUT", help="write the report as JSON")


def register(subparsers: argparse._SubParsersAction) -> None:
    profile = subparsers.add_parser(
        "profile",
        help="measure params, FLOPs, activation memory, peak memory and step time of SSL pretraining",
        description="Measure one wav2vec 2.0 pretraining step (forward with masking, loss, backward, AdamW) "
        "per module and per layer; optionally sweep input lengths, compare precisions and memory savers.",
    )
    _add_workload_arguments(profile)
    profile.add_argument("--plots", type=Path, metavar="DIR", help="write PNG plots into DIR")
    profile.add_argument(
        "--sweep-seconds", type=_seconds_list, metavar="S1,S2,...", help="also measure these input lengths"
    )
    profile.add_argument("--compare-precision", action="store_true", help="also measure fp32, bf16 and fp16")
    profile.add_argument(
        "--convention",
        choices=("complete", "gao2022"),
        default="complete",
        help="counting convention of the module table: complete (default: every counted op, quantization = "
        "quantizer + contrastive projections) or gao2022 (the reference study's table: conv + linear layers "
        "only, quantization = quantizer only, projections listed outside the total)",
    )
    profile.add_argument(
        "--repeats", type=int, default=1, help="timed steps per measurement after warm-up (default: 1)"
    )
    profile.set_defaults(func=run_profile)

    feasibility = subparsers.add_parser(
        "feasibility",
        help="predict per device whether a workload fits, how long a batch and a federated training take",
        description="Measure the workload's FLOPs and memory here, then apply the device model "
        "(docs/profiling.md) to each catalogue device.",
    )
    _add_workload_arguments(feasibility)
    chosen = feasibility.add_mutually_exclusive_group()
    chosen.add_argument("--device", nargs="+", action="extend", metavar="NAME", help="device ids or names")
    chosen.add_argument("--all", action="store_true", help="every catalogue device (the default)")
    feasibility.add_argument(
        "--catalogue",
        type=Path,
        action="append",
        default=[],
        metavar="FILE",
        help="extra device catalogue JSON (overrides the packaged one; repeatable)",
    )
    feasibility.add_argument(
        "--workload",
        type=Path,
        metavar="FILE",
        help="reuse the workloads stored in an earlier feasibility JSON instead of measuring them",
    )
    fl = feasibility.add_argument_group("federated schedule (wall-clock of the whole training)")
    fl.add_argument("--utterances-per-client", type=_positive_int, help="enables the FL estimate")
    fl.add_argument("--clients", type=_positive_int, default=10, help="default: 10")
    fl.add_argument("--clients-per-round", type=_positive_int, help="sampled per round (default: all)")
    fl.add_argument("--rounds", type=_positive_int, default=150, help="default: 150")
    fl.add_argument("--local-epochs", type=_positive_int, default=1, help="default: 1")
    fl.add_argument("--bandwidth-mbps", type=_positive_float, help="add model download+upload time per round")
    fl.add_argument("--fleet", metavar="ID:COUNT,...", help="mixed fleet, e.g. a40:2,raspberry-pi-4:8")
    trend = feasibility.add_argument_group("hardware trend")
    trend.add_argument("--trend-months", type=_positive_float, help="compute doubling period in months, e.g. 18")
    trend.add_argument("--trend-target", default="a40", help="device whose time is the target (default: a40)")
    calibrate = feasibility.add_argument_group("calibrate this machine as device 'local-cpu'")
    calibrate.add_argument("--calibrate-local", action="store_true", help="measure this machine and save it first")
    calibrate.add_argument(
        "--calibrate-to", type=Path, help="user catalogue to write (default: ~/.config/fedspeech/devices.json)"
    )
    calibrate.add_argument("--calibration-model", default="tiny", help="default: tiny")
    calibrate.add_argument("--calibration-seconds", type=_positive_float, default=2.0, help="default: 2")
    calibrate.add_argument("--calibration-batch", type=_positive_int, default=1, help="default: 1")
    calibrate.add_argument("--calibration-repeats", type=_positive_int, default=3, help="default: 3")
    calibrate.add_argument(
        "--clock",
        choices=("wall", "cpu"),
        default="wall",
        help="time steps by wall-clock or process CPU seconds (robust on a shared machine)",
    )
    feasibility.set_defaults(func=run_feasibility)


def _setup_torch(args: argparse.Namespace) -> None:
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device_type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device-type cuda: no CUDA device is available")


def _write_json(path: Path | None, data: dict[str, Any]) -> None:
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, default=_json_default) + "\n", encoding="utf-8")
    print(f"wrote {path}")


def _json_default(value: Any) -> Any:
    return str(value)  # paths, dtypes: anything JSON has no type for


def _profiled_savers(tokens: list[str]) -> Savers:
    """``--savers`` parsed, refusing the one whose effect a single timed batch misstates."""
    from fedspeech.profiling.savers import UNPROFILED_SAVERS, Savers

    savers = Savers.parse(tokens)
    refused = [token for token in savers.tokens() if token in UNPROFILED_SAVERS]
    if refused:
        raise ValueError(
            f"--savers {' '.join(refused)}: the profiler repeats one batch, where a feature cache would hit at "
            "every step; its saving depends on how often crops recur (benchmarks/memory_savers.py measures it); "
            "use freeze-cnn"
        )
    return savers


def run_profile(args: argparse.Namespace) -> int:
    from fedspeech.profiling.plots import write_plots
    from fedspeech.profiling.report import model_label, profile, render
    from fedspeech.profiling.trainstep import build_model

    _setup_torch(args)
    if args.repeats < 0:
        raise ValueError("--repeats must be >= 0")
    savers = _profiled_savers(args.savers)
    template = build_model(args.model)
    report = profile(
        template,
        args.model,
        args.seconds,
        args.batch,
        args.precision,
        savers,
        args.device_type,
        args.repeats,
        args.sweep_seconds,
        args.compare_precision,
        log=log.info,
        convention=args.convention,
    )
    print(render(report))
    _write_json(args.json, report)
    if args.plots:
        label = model_label(args.model) + ("_with-savers" if savers.any else "")
        for path in write_plots(report, args.plots, label):
            print(f"wrote {path}")
    return 0


def run_feasibility(args: argparse.Namespace) -> int:
    from fedspeech.profiling.catalogue import DEFAULT_USER_CATALOGUE, load_catalogue, select_devices
    from fedspeech.profiling.feasibility import AUTO_SAVER_LADDER, plan, render_plan
    from fedspeech.profiling.planner import FLSchedule, Workload
    from fedspeech.profiling.savers import Savers
    from fedspeech.profiling.workload import calibrate_local, measure_workload

    _setup_torch(args)
    extra = list(args.catalogue)
    if args.calibrate_local:
        target = args.calibrate_to or DEFAULT_USER_CATALOGUE
        log.info(
            "calibrating this machine: %s, %g s, batch %d",
            args.calibration_model,
            args.calibration_seconds,
            args.calibration_batch,
        )
        entry = calibrate_local(
            target,
            args.calibration_model,
            args.calibration_seconds,
            args.calibration_batch,
            args.calibration_repeats,
            args.clock,
        )
        cal = entry["calibration"]
        print(
            f"calibrated local-cpu: {cal['train_gflops'] / cal['seconds_per_batch']:.2f} GFLOP/s fp32, "
            f"bf16 factor {entry['mixed_precision_speedup']:.2f}; wrote {target}"
        )
        if target not in extra:
            extra.append(target)
    catalogue = load_catalogue(extra)
    devices = select_devices(catalogue, None if args.all else args.device)
    auto = "auto" in args.savers
    if auto and args.savers != ["auto"]:
        raise ValueError("--savers auto picks the savers per device; it cannot be combined with other savers")
    savers = Savers() if auto else _profiled_savers(args.savers)
    precision = savers.effective_precision(args.precision)

    def workload_for(p: str, chosen: Savers) -> Workload:
        if args.workload is not None:
            stored = _stored_workload(
                args.workload,
                p,
                args.model,
                chosen.effective_seconds(args.seconds),
                args.batch,
                chosen.without_amp().tokens(),
            )
            if stored is not None:
                return stored
        log.info(
            "measuring workload: %s, %g s, three short runs, %s, savers %s",
            args.model,
            args.seconds,
            p,
            " ".join(chosen.tokens()) or "none",
        )
        return measure_workload(
            args.model, args.seconds, args.batch, p, chosen.without_amp(), device_type=args.device_type
        )

    def workloads_for(chosen: Savers) -> dict[str, Workload]:
        found = {precision: workload_for(precision, chosen)}
        if precision != "fp32" and any(not d.supports(precision) for d in devices):
            found["fp32"] = workload_for("fp32", chosen)
        return found

    workloads = workloads_for(savers)
    ladder = [workloads_for(Savers.parse(list(rung))) for rung in AUTO_SAVER_LADDER] if auto else None
    schedule = None
    if args.utterances_per_client:
        schedule = FLSchedule(
            args.clients,
            args.utterances_per_client,
            args.rounds,
            args.local_epochs,
            args.clients_per_round,
            args.bandwidth_mbps,
        )
    result = plan(
        devices, workloads, precision, catalogue, schedule, args.fleet, args.trend_months, args.trend_target, ladder
    )
    print(render_plan(result))
    _write_json(args.json, result)
    return 0


def _stored_workload(path: Path, precision: str, model: str, seconds: float, batch: int, savers: list[str]):
    """A workload saved in an earlier feasibility JSON, rescaled to ``batch`` (None if the
    file has none for ``precision``, or none with these savers among the ``--savers auto``
    rungs it holds: that one is measured)."""
    from dataclasses import replace

    from fedspeech.profiling.planner import Workload

    if not path.is_file():
        raise FileNotFoundError(f"workload file {path} does not exist")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        stored = data.get("workloads", {}).get(precision)
        rungs = [rung.get(precision) for rung in data.get("savers_auto", {}).get("ladder_workloads", [])]
    except (json.JSONDecodeError, AttributeError):
        raise ValueError(f"{path}: not a feasibility JSON") from None
    if stored is None:
        log.info("%s has no %s workload: measuring it", path, precision)
        return None
    rung = next((r for r in rungs if r is not None and list(r.get("savers", [])) == list(savers)), None)
    if rung is not None:
        stored = rung
    elif rungs and list(stored.get("savers", [])) != list(savers):
        log.info("%s has no %s workload with savers %s: measuring it", path, precision, savers)
        return None
    workload = Workload.from_dict(stored)
    if workload.model != model:
        raise ValueError(f"{path}: workload was measured for model {workload.model!r}, not {model!r}")
    if abs(workload.seconds - seconds) > 1e-9:
        raise ValueError(f"{path}: workload was measured at {workload.seconds:g} s, not {seconds:g} s")
    if list(workload.savers) != list(savers):
        raise ValueError(f"{path}: workload was measured with savers {list(workload.savers)}, not {savers}")
    return replace(workload, batch=batch)
