"""Plain Hugging Face pretraining step vs fedspeech's memory savers, side by side in one run.

    .venv/bin/python benchmarks/memory_savers.py                      # base, batch 4, 5.5 s
    .venv/bin/python benchmarks/memory_savers.py --model base --seconds 12 --batch 8
    .venv/bin/python benchmarks/memory_savers.py --model large --seconds 5.5 --batch 1

Each variant runs in its own fresh process (so the process high-water mark belongs to that
variant alone): build the randomly initialised ``Wav2Vec2ForPreTraining``, one warm-up step
(creates the AdamW state), ``--repeats`` timed steps, then one instrumented step. Per
variant it prints:

- **held for backward**: live tensor bytes at the end of the forward pass minus those
  before it, i.e. everything autograd (and checkpointing) keeps for backward;
- **tensor peak**: the high-water mark of live tensor bytes over a whole step
  (``fedspeech.profiling.memory.PeakTensorMemory``);
- **process peak**: the process's maximum resident set size (``ru_maxrss``), the figure a
  device's memory limit applies to, including Python, torch and transformers themselves;
- **losses** of every step (the exact savers must give the plain losses);
- **step time ÷ plain**: measured in one more process per variant that holds both models
  and alternates their steps (plain, variant, plain, variant, ...), the median of the
  per-pair ratios: a load that comes and goes on a shared machine hits both sides alike.

Ratios are against ``plain`` measured in the same run. ``plain`` is the model as
transformers ships it with ``torch.optim.AdamW``; ``exact`` is fedspeech's savers that do
not change the training (``recompute-cnn ckpt-transformer ckpt-contrastive
fused-quantizer step-in-backward``, gradients
checked equal in ``tests/test_savers_exact.py``); ``hf-ckpt`` is the library's own
activation checkpointing of conv and Transformer layers; ``exact+adam-bf16`` adds AdamW
moments in bfloat16 (stochastic rounding; not exact: compare its losses); ``frozen-cnn``
freezes the CNN instead of recomputing it, which changes the training (the CNN no longer
learns); ``frozen-cnn-cached`` also serves the frozen CNN's features from a cache
(``cache-cnn``). Every step here repeats one batch, so after the warm-up every step hits the
cache: its time is that of a pass over crops seen before (in ``fedspeech pretrain``, every
local epoch after a round's first), and its process peak includes the cached features.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

VARIANTS = {
    "plain": [],
    "hf-ckpt": ["ckpt-cnn", "ckpt-transformer"],
    "exact": ["recompute-cnn", "ckpt-transformer", "ckpt-contrastive", "fused-quantizer", "step-in-backward"],
    "exact+adam-bf16": [
        "recompute-cnn",
        "ckpt-transformer",
        "ckpt-contrastive",
        "fused-quantizer",
        "step-in-backward",
        "adam-bf16",
    ],
    "frozen-cnn": ["ckpt-transformer", "ckpt-contrastive", "fused-quantizer", "step-in-backward", "freeze-cnn"],
    "frozen-cnn-cached": [
        "ckpt-transformer",
        "ckpt-contrastive",
        "fused-quantizer",
        "step-in-backward",
        "freeze-cnn",
        "cache-cnn",
    ],
}
TARGETS = {"held": 0.25, "process_peak": 0.50, "time": 1.35}
MIB = 2**20


def rss_bytes() -> int:
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def child(model_name: str, seconds: float, batch: int, tokens: list[str], repeats: int, threads: int) -> dict:
    """Measure one variant in this (fresh) process."""
    import torch
    import transformers.models.wav2vec2.modeling_wav2vec2  # noqa: F401  (counted in the runtime RSS)

    from fedspeech.profiling.memory import PeakTensorMemory, tensors_of
    from fedspeech.profiling.savers import Savers
    from fedspeech.profiling.trainstep import TrainStep, build_model, synthetic_batch

    torch.set_num_threads(threads)
    rss_runtime = rss_bytes()
    torch.manual_seed(0)
    step = TrainStep(build_model(model_name), savers=Savers.parse(tokens), copy_model=False)
    data = synthetic_batch(step.model, batch, seconds, seed=0)
    losses: list[float] = []

    def run_step() -> float:
        loss = step.forward_loss(data)
        losses.append(float(loss.detach()))
        step.backward_and_update(loss)
        return losses[-1]

    run_step()  # warm-up: AdamW state exists from here on
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    process_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    tracker = PeakTensorMemory(
        tensors_of(step.model, step.optimizer, data.input_values, data.mask_time_indices, data.sampled_negative_indices)
    )
    with tracker:
        before = tracker.current_bytes
        loss = step.forward_loss(data)
        held = tracker.current_bytes - before
        losses.append(float(loss.detach()))
        step.backward_and_update(loss)
        del loss
    return {
        "savers": tokens,
        "held_bytes": held,
        "tensor_peak_bytes": tracker.peak_bytes,
        "process_peak_bytes": process_peak,
        "runtime_rss_bytes": rss_runtime,
        "step_seconds": times,
        "losses": losses,
    }


def pair_timing(model_name: str, seconds: float, batch: int, tokens: list[str], pairs: int, threads: int) -> dict:
    """Alternate steps of the plain model and of ``tokens``' model in this process."""
    import torch

    from fedspeech.profiling.savers import Savers
    from fedspeech.profiling.trainstep import TrainStep, build_model, synthetic_batch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    steps = [TrainStep(build_model(model_name), savers=Savers.parse(t), copy_model=False) for t in ([], tokens)]
    data = synthetic_batch(steps[0].model, batch, seconds, seed=0)
    for step in steps:
        step(data)  # warm-up
    times: list[list[float]] = [[], []]
    for _ in range(pairs):
        for side, step in enumerate(steps):
            start = time.perf_counter()
            step(data)
            times[side].append(time.perf_counter() - start)
    ratios = [b / a for a, b in zip(*times)]
    return {"plain_seconds": times[0], "variant_seconds": times[1], "ratio": statistics.median(ratios)}


def run_child(args: argparse.Namespace, flag: str, name: str) -> dict:
    command = [
        sys.executable,
        __file__,
        flag,
        json.dumps(VARIANTS[name]),
        "--model",
        args.model,
        "--seconds",
        str(args.seconds),
        "--batch",
        str(args.batch),
        "--repeats",
        str(args.repeats if flag == "--child" else args.pairs),
        "--threads",
        str(args.threads),
    ]
    started = time.perf_counter()
    out = subprocess.run(command, capture_output=True, text=True)
    if out.returncode != 0:
        return {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
    result = json.loads(out.stdout.strip().splitlines()[-1])
    result["wall_seconds"] = time.perf_counter() - started
    return result


def table(results: dict[str, dict], args: argparse.Namespace) -> str:
    plain = results.get("plain")
    lines = [
        f"# {args.model}, batch {args.batch}, {args.seconds:g} s, fp32, {args.threads} torch thread(s), "
        f"{args.repeats} timed steps; {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "| variant | savers | held for backward MiB | ÷ plain | tensor peak MiB | ÷ plain "
        "| process peak MiB | ÷ plain | step s (alone) | time ÷ plain (paired) | losses by step |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for name, r in results.items():
        if "error" in r:
            lines.append(f"| {name} | {' '.join(VARIANTS[name]) or '-'} | failed: {r['error']} |")
            continue
        step = statistics.median(r["step_seconds"])
        timing = r.get("pair_timing") or {}
        time_ratio = "1.000" if name == "plain" else f"{timing['ratio']:.3f}" if "ratio" in timing else "-"

        def ratio(key: str, value: float) -> str:
            if plain is None or "error" in plain:
                return "-"
            return f"{value / plain[key]:.3f}"

        lines.append(
            f"| {name} | {' '.join(r['savers']) or '-'} "
            f"| {r['held_bytes'] / MIB:,.1f} | {ratio('held_bytes', r['held_bytes'])} "
            f"| {r['tensor_peak_bytes'] / MIB:,.1f} | {ratio('tensor_peak_bytes', r['tensor_peak_bytes'])} "
            f"| {r['process_peak_bytes'] / MIB:,.1f} | {ratio('process_peak_bytes', r['process_peak_bytes'])} "
            f"| {step:.2f} | {time_ratio} | {' '.join(f'{x:.4f}' for x in r['losses'])} |"
        )
    runtime = next((r["runtime_rss_bytes"] for r in results.values() if "error" not in r), 0)
    lines.append(
        f"\n(process peak includes the runtime: {runtime / MIB:,.0f} MiB resident after importing torch "
        f"and transformers; targets for `exact`: held ≤ {TARGETS['held']:.2f}, process peak ≤ "
        f"{TARGETS['process_peak']:.2f}, step time ≤ {TARGETS['time']:.2f} × plain)"
    )
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--seconds", type=float, default=5.5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=1, help="timed steps per memory run (after one warm-up)")
    parser.add_argument("--pairs", type=int, default=3, help="alternating plain/variant step pairs for the time ratio")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads per variant")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--json", help="also write the raw results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--pair-child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        result = child(args.model, args.seconds, args.batch, json.loads(args.child), args.repeats, args.threads)
        print(json.dumps(result))
        return 0
    if args.pair_child is not None:
        tokens = json.loads(args.pair_child)
        print(json.dumps(pair_timing(args.model, args.seconds, args.batch, tokens, args.repeats, args.threads)))
        return 0
    results = {}
    for name in args.variants:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_child(args, "--child", name)
    for name in [n for n in args.variants if n != "plain" and "error" not in results[n] and args.pairs > 0]:
        print(f"timing {name} against plain, {args.pairs} alternating pairs ...", file=sys.stderr, flush=True)
        results[name]["pair_timing"] = run_child(args, "--pair-child", name)
    print(table(results, args))
    if args.json:
        with open(args.json, "w") as out:
            json.dump({"settings": vars(args), "results": results}, out, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
