"""Server aggregation of 20 client updates of wav2vec 2.0 base, against a NumPy sum.

    .venv/bin/python benchmarks/server_aggregation.py [--clients 20] [--model base] [--threads 1]

Every mode runs in its own fresh process, so its process peak (``ru_maxrss``) is its own:

- ``numpy-sum``: the memory-bandwidth baseline, all client states in memory, summed in
  place (``np.add(acc, x, out=acc)``, float32): the least work any average can do;
- ``held-<rule>``: what a server does that waits for every reply: all client states in
  memory, then the library's rule (:mod:`fedspeech.federated.aggregation`);
- ``streaming-<rule>``: replies aggregated as they arrive (:mod:`fedspeech.federated.streaming`):
  each client state exists only until it has been added, so memory is one float64
  accumulator plus one reply.
- ``server-held-<rule>`` / ``server-streamed-<rule>``: the server's own code path, Flower
  messages included: each client state travels as a Flower reply (``ArrayRecord``), and the
  strategy either screens and aggregates all 20 held replies (``aggregate_train``) or takes
  each one as it arrives (``reply_stream``, what the round loop does for these rules). Timed:
  decoding the arrays, screening and aggregating (building a reply is the client's work).

Client states are the base model's float32 state dict plus seeded noise, made one at a time
(not timed); only the aggregation is timed. Rules: FedAvg (weights n_k), loss-weighted
(softmax of −L_k, streamed with a running shift) and L-DAWA (per-tensor cosine to the global
model). ``checksum`` (the float64 sum of the aggregate) shows streaming and held give the
same model.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

RULES = ("fedavg", "loss", "ldawa")
MODES = (
    "numpy-sum",
    *(f"held-{r}" for r in RULES),
    *(f"streaming-{r}" for r in RULES),
    *(f"server-held-{r}" for r in RULES),
    *(f"server-streamed-{r}" for r in RULES),
)
TARGET = 3.0
MIB = 2**20


def child(mode: str, model: str, clients: int, threads: int) -> dict:
    import numpy as np
    import torch

    from fedspeech.federated import aggregation as agg
    from fedspeech.profiling.trainstep import build_model

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    built = build_model(model)
    global_state = {k: v.detach().numpy().copy() for k, v in built.state_dict().items()}
    del built
    params = sum(v.size for v in global_state.values())
    examples = [100 + 10 * k for k in range(clients)]
    losses = [4.0 + 0.01 * k for k in range(clients)]

    def client_state(k: int) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(k)
        out = {}
        for key, value in global_state.items():
            if value.dtype.kind == "f":
                out[key] = value + np.float32(0.01) * rng.standard_normal(value.shape, dtype=np.float32)
            else:
                out[key] = value.copy()
        return out

    seconds = 0.0
    if mode.startswith("server-"):
        seconds, result = through_the_strategy(mode, global_state, client_state, examples, losses)
    elif mode == "numpy-sum" or mode.startswith("held-"):
        states = [client_state(k) for k in range(clients)]
        start = time.perf_counter()
        if mode == "numpy-sum":
            result = {k: np.zeros_like(v) for k, v in global_state.items() if v.dtype.kind == "f"}
            for state in states:
                for key, acc in result.items():
                    np.add(acc, state[key], out=acc)
        elif mode == "held-fedavg":
            result = agg.fedavg(states, examples, global_state=global_state)
        elif mode == "held-loss":
            result = agg.loss_weighted(states, losses, global_state=global_state)
        else:
            result = agg.ldawa(global_state, states)
        seconds = time.perf_counter() - start
    else:
        from fedspeech.federated import streaming

        rule = mode.removeprefix("streaming-")
        accumulator: streaming.StreamingAverage | streaming.StreamingSoftmaxAverage
        accumulator = (
            streaming.StreamingSoftmaxAverage(global_state)
            if rule == "loss"
            else streaming.StreamingAverage(global_state)
        )
        norms = {k: streaming.global_norm(v) for k, v in global_state.items()}
        for k in range(clients):
            state = client_state(k)  # "arrives"
            start = time.perf_counter()
            agg.validate_update(state, global_state)  # the per-reply screening the held path does too
            if rule == "fedavg":
                accumulator.add(state, float(examples[k]))  # type: ignore[call-arg]
            elif rule == "loss":
                accumulator.add(state, -losses[k])  # type: ignore[call-arg]
            else:
                deltas = {key: streaming.cosine(v, global_state[key], norms[key]) for key, v in state.items()}
                accumulator.add(state, deltas, normaliser=1.0)  # type: ignore[call-arg]
            seconds += time.perf_counter() - start
            del state  # dropped: the next reply reuses its memory
        start = time.perf_counter()
        result = accumulator.result()
        seconds += time.perf_counter() - start
    checksum = float(sum(np.asarray(v, dtype=np.float64).sum() for v in result.values() if v.dtype.kind == "f"))
    if mode == "numpy-sum":
        checksum /= clients
    return {
        "mode": mode,
        "seconds": seconds,
        "process_peak_bytes": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        "params": params,
        "checksum": checksum,
    }


def through_the_strategy(mode: str, global_state, client_state, examples, losses):
    """Aggregate Flower replies with the library's strategy, held or as they arrive."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
    from flwr.supercore.task_identity import TaskIdentity

    from fedspeech.federated.strategies import make_strategy

    TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 1, 1
    rule = mode.split("-")[-1]
    server_round = 3  # past L-DAWA's FedAvg warm-up
    strategy = make_strategy(rule)
    strategy.set_global_arrays(ArrayRecord({k: Array(v) for k, v in global_state.items()}))
    instruction = Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=1, message_type="train")

    def arriving(k: int) -> Message:
        state = client_state(k)
        metrics = MetricRecord({"num-examples": examples[k], "train_loss": losses[k]})
        content = RecordDict({"arrays": ArrayRecord({key: Array(v) for key, v in state.items()}), "metrics": metrics})
        reply = Message(content, reply_to=instruction)
        reply.metadata.__dict__["_src_node_id"] = 100 + k
        return reply

    clients = len(examples)
    seconds = 0.0
    if mode.startswith("server-held-"):
        replies = [arriving(k) for k in range(clients)]
        start = time.perf_counter()
        record, _ = strategy.aggregate_train(server_round, replies)
        seconds = time.perf_counter() - start
    else:
        stream = strategy.reply_stream(server_round)
        for k in range(clients):
            reply = arriving(k)
            start = time.perf_counter()
            stream.add(reply)
            seconds += time.perf_counter() - start
            del reply
        start = time.perf_counter()
        record, _ = stream.finish()
        seconds += time.perf_counter() - start
    assert record is not None and strategy.last_report.accepted, strategy.last_report
    return seconds, {k: v.numpy() for k, v in record.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="base")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (NumPy's sum uses one)")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    parser.add_argument("--json")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.model, args.clients, args.threads)))
        return 0
    results = {}
    for mode in args.modes:
        print(f"running {mode} ...", file=sys.stderr, flush=True)
        command = [sys.executable, __file__, "--child", mode, "--model", args.model]
        command += ["--clients", str(args.clients), "--threads", str(args.threads)]
        out = subprocess.run(command, capture_output=True, text=True)
        if out.returncode != 0:
            results[mode] = {"error": (out.stderr.strip().splitlines() or [f"exit {out.returncode}"])[-1]}
            continue
        results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    base = results.get("numpy-sum", {}).get("seconds")
    params = next((r["params"] for r in results.values() if "params" in r), 0)
    print(
        f"# {args.clients} client updates of {args.model} ({params / 1e6:.1f} M parameters, "
        f"{params * 4 / MIB:,.0f} MiB each), torch threads {args.threads}, {os.cpu_count()} cores"
    )
    print("| mode | aggregation s | ÷ numpy-sum | process peak MiB | checksum |")
    print("|---|---:|---:|---:|---:|")
    for mode, r in results.items():
        if "error" in r:
            print(f"| {mode} | failed: {r['error']} | | | |")
            continue
        ratio = f"{r['seconds'] / base:.2f}" if base else "-"
        print(f"| {mode} | {r['seconds']:.2f} | {ratio} | {r['process_peak_bytes'] / MIB:,.0f} | {r['checksum']:.6e} |")
    print(f"\n(target: every rule within {TARGET:g}x numpy-sum; streaming holds one reply at a time)")
    if args.json:
        with open(args.json, "w") as out_file:
            json.dump({"settings": vars(args), "results": results}, out_file, indent=1)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
