"""How well does the feasibility planner predict what it was not calibrated on?

Calibrates this machine as the device ``local-cpu`` at ONE setting (tiny, batch 1, 2 s,
fp32; the bf16 factor at that same setting), then, for other batch sizes, lengths,
precisions, a saver and bigger models, prints the planner's predicted step time and peak
memory next to measured ones, with the % error. Also reports (a) the errors had the
calibration been taken on a mid-size model instead, and (b) how well the linear memory line
fitted at 1 s and 2 s extrapolates to longer inputs (that line gives max_seconds_that_fit).

Predictions use only: the workload's FLOPs and memory from three short untimed runs
((batch 1, S), (1, S/2), (2, S/2), as ``fedspeech feasibility`` does), and the calibrated
device (throughput, bf16 factor). Measurements: min step
time over repeats (process CPU seconds by default: robust on a shared machine), peak live
tensor bytes, and the peak RSS growth of a fresh process running plain training steps.

    .venv/bin/python benchmarks/prediction_error.py [--threads 1] [--clock cpu] [--json OUT]

Runs in 6-10 minutes on 1 thread of a loaded 2-core machine.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

MID_CONFIG = dict(
    hidden_size=384,
    num_hidden_layers=6,
    num_attention_heads=6,
    intermediate_size=1536,
    codevector_dim=128,
    proj_codevector_dim=128,
    conv_dim=(256,) * 7,
    num_conv_pos_embeddings=64,
    num_conv_pos_embedding_groups=8,
)


@dataclass(frozen=True)
class Setting:
    model: str  # "tiny", "base", "large" or "mid"
    batch: int
    seconds: float
    precision: str = "fp32"
    savers: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        extra = f", {'+'.join(self.savers)}" if self.savers else ""
        return f"{self.model} b{self.batch} {self.seconds:g}s {self.precision}{extra}"


CALIBRATION = Setting("tiny", 1, 2.0)
SETTINGS = [
    CALIBRATION,
    Setting("tiny", 2, 2.0),
    Setting("tiny", 4, 2.0),
    Setting("tiny", 1, 4.0),
    Setting("tiny", 1, 8.0),
    Setting("tiny", 2, 4.0, "bf16"),
    Setting("mid", 1, 4.0),
    Setting("mid", 2, 4.0),
    Setting("mid", 2, 4.0, "fp32", ("ckpt-cnn", "ckpt-transformer")),
    Setting("base", 1, 2.0),
    Setting("large", 1, 1.0),
]
MID_CALIBRATION = Setting("mid", 1, 4.0)


def model_path(name: str, folder: Path) -> str:
    """Presets by name; the mid-size model as a local HF config folder (as a user would)."""
    if name != "mid":
        return name
    from fedspeech.models.configs import model_config

    if not (folder / "config.json").is_file():
        model_config("base", **MID_CONFIG).save_pretrained(folder)
    return str(folder)


def proc_status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def child(spec: dict) -> None:
    """Fresh process: plain training steps; report how far RSS rose above the imports.

    Uses VmHWM (peak RSS of this process image): ``ru_maxrss`` would also count the parent's
    memory at fork time, which Linux carries across exec.
    """
    import gc

    import torch

    torch.set_num_threads(spec["threads"])
    from fedspeech.profiling.savers import Savers
    from fedspeech.profiling.trainstep import TrainStep, build_model, synthetic_batch

    baseline = proc_status_bytes("VmRSS")
    template = build_model(spec["model"])
    step = TrainStep(template, spec["precision"], Savers.parse(spec["savers"]))
    del template
    gc.collect()
    data = synthetic_batch(step.model, spec["batch"], spec["seconds"])
    for _ in range(2):
        step(data)
    print(json.dumps({"rss_growth_bytes": proc_status_bytes("VmHWM") - baseline}))


def measure_rss(setting: Setting, path: str, threads: int) -> int:
    spec = {
        "model": path,
        "batch": setting.batch,
        "seconds": setting.seconds,
        "precision": setting.precision,
        "savers": list(setting.savers),
        "threads": threads,
    }
    out = subprocess.run(
        [sys.executable, __file__, "--child", json.dumps(spec)], check=True, capture_output=True, text=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])["rss_growth_bytes"]


def percent(predicted: float, measured: float) -> float:
    return 100.0 * (predicted / measured - 1.0)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", type=Path)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(json.loads(args.child))
        return 0

    import torch

    torch.set_num_threads(args.threads)
    from fedspeech.profiling.catalogue import load_catalogue
    from fedspeech.profiling.measure import measure_step
    from fedspeech.profiling.planner import predict
    from fedspeech.profiling.report import format_table
    from fedspeech.profiling.savers import Savers
    from fedspeech.profiling.trainstep import build_model
    from fedspeech.profiling.workload import LOCAL_DEVICE_ID, calibrate_local, measure_workload

    started = time.time()
    work = Path(tempfile.mkdtemp(prefix="fedspeech-prediction-"))
    mid_folder = work / "mid"
    catalogue_file = work / "devices.json"
    entry = calibrate_local(
        catalogue_file, CALIBRATION.model, CALIBRATION.seconds, CALIBRATION.batch, args.repeats, args.clock
    )
    device = load_catalogue([catalogue_file], include_user=False)[LOCAL_DEVICE_ID]
    print(
        f"calibrated at {CALIBRATION.label}: {device.throughput_flops / 1e9:.2f} GFLOP/s, "
        f"bf16 factor {device.mixed_precision_speedup:.3f} ({args.clock} clock, {args.threads} thread(s))",
        flush=True,
    )

    rows, templates = [], {}
    for setting in SETTINGS:
        path = model_path(setting.model, mid_folder)
        template = templates.setdefault(setting.model, build_model(path))
        savers = Savers.parse(list(setting.savers))
        workloads = {
            setting.precision: measure_workload(
                path, setting.seconds, setting.batch, setting.precision, savers, template
            )
        }
        if not device.supports(setting.precision):
            workloads["fp32"] = measure_workload(path, setting.seconds, setting.batch, "fp32", savers, template)
        prediction = predict(device, workloads[setting.precision], workloads.get("fp32"))
        repeats = args.repeats if setting.model in ("tiny", "mid") else 1  # keep the run near 10 minutes
        measured = measure_step(
            template,
            path,
            setting.seconds,
            setting.batch,
            setting.precision,
            savers,
            repeats=repeats,
            with_layers=False,
        )
        seconds = min(measured.step_cpu_seconds if args.clock == "cpu" else measured.step_seconds)
        rss = measure_rss(setting, path, args.threads)
        rows.append(
            {
                "setting": setting.label,
                "model": setting.model,
                "batch": setting.batch,
                "seconds": setting.seconds,
                "precision": setting.precision,
                "savers": list(setting.savers),
                "train_gflops": measured.train_flops / 1e9,
                "predicted_step_seconds": prediction.compute_seconds_per_batch,
                "measured_step_seconds": seconds,
                "measured_wall_seconds": min(measured.step_seconds),
                "predicted_peak_bytes": prediction.peak_bytes,
                "measured_peak_bytes": measured.peak_bytes,
                "rss_growth_bytes": rss,
            }
        )
        print(
            f"{setting.label}: predicted {prediction.compute_seconds_per_batch:.3f} s, measured {seconds:.3f} s; "
            f"peak predicted {prediction.peak_bytes / 2**20:.1f} MiB, measured {measured.peak_bytes / 2**20:.1f} MiB, "
            f"RSS +{rss / 2**20:.1f} MiB  [{time.time() - started:.0f} s]",
            flush=True,
        )

    # (a) the same predictions from a mid-size calibration point instead of tiny
    mid_row = next(r for r in rows if r["setting"] == MID_CALIBRATION.label)
    mid_throughput = mid_row["train_gflops"] / mid_row["measured_step_seconds"]
    for row in rows:
        factor = device.speedup(row["precision"])
        row["predicted_step_seconds_mid_calibration"] = row["train_gflops"] / (mid_throughput * factor)

    # (b) length extrapolation of the memory model fitted at 1 s and 2 s
    extrapolation = []
    for name, lengths in (("tiny", (4.0, 8.0)), ("mid", (4.0,))):
        path = model_path(name, mid_folder)
        fitted = measure_workload(path, 2.0, 1, "fp32", Savers(), templates.get(name) or build_model(path))
        for length in lengths:
            row = next(
                r
                for r in rows
                if r["model"] == name
                and r["batch"] == 1
                and r["seconds"] == length
                and r["precision"] == "fp32"
                and not r["savers"]
            )
            extrapolation.append(
                {
                    "model": name,
                    "seconds": length,
                    "predicted_peak_bytes": fitted.peak_bytes(seconds=length, batch=1),
                    "measured_peak_bytes": row["measured_peak_bytes"],
                }
            )

    mib = lambda b: f"{b / 2**20:,.1f}"  # noqa: E731
    print("\n## Predicted vs measured (calibrated at " + CALIBRATION.label + ")\n")
    print(
        format_table(
            [
                "setting",
                "train GFLOPs",
                "pred s",
                "meas s",
                "err %",
                "err % (mid-cal)",
                "pred peak MiB",
                "meas peak MiB",
                "err %",
                "RSS growth MiB",
                "pred vs RSS %",
            ],
            [
                [
                    r["setting"],
                    f"{r['train_gflops']:.1f}",
                    f"{r['predicted_step_seconds']:.3f}",
                    f"{r['measured_step_seconds']:.3f}",
                    f"{percent(r['predicted_step_seconds'], r['measured_step_seconds']):+.0f}",
                    f"{percent(r['predicted_step_seconds_mid_calibration'], r['measured_step_seconds']):+.0f}",
                    mib(r["predicted_peak_bytes"]),
                    mib(r["measured_peak_bytes"]),
                    f"{percent(r['predicted_peak_bytes'], r['measured_peak_bytes']):+.1f}",
                    mib(r["rss_growth_bytes"]),
                    f"{percent(r['predicted_peak_bytes'], r['rss_growth_bytes']):+.0f}",
                ]
                for r in rows
            ],
        )
    )
    print("\n## Memory line fitted at 1 s and 2 s, extrapolated (batch 1, fp32)\n")
    print(
        format_table(
            ["model", "seconds", "pred peak MiB", "meas peak MiB", "err %"],
            [
                [
                    e["model"],
                    f"{e['seconds']:g}",
                    mib(e["predicted_peak_bytes"]),
                    mib(e["measured_peak_bytes"]),
                    f"{percent(e['predicted_peak_bytes'], e['measured_peak_bytes']):+.1f}",
                ]
                for e in extrapolation
            ],
        )
    )
    print(f"\ntotal {time.time() - started:.0f} s")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "calibration": entry,
                    "rows": rows,
                    "extrapolation": extrapolation,
                    "clock": args.clock,
                    "threads": args.threads,
                },
                indent=2,
            )
            + "\n"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
