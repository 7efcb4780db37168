"""Toy Flower app for the engine tests: numpy FedAvg over a 4-float array.

Client ``partition-id = i`` replies with every weight set to ``i + round`` and
``num-examples = i + 1``; the ServerApp runs ``num-rounds`` rounds of FedAvg and writes a
JSON result (rounds completed, final arrays, node configs seen) to ``result-path`` so a
test can assert that the run really completed, whichever engine ran it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

client_app = ClientApp()
server_app = ServerApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    pid = int(context.node_config["partition-id"])
    server_round = int(msg.content["config"]["server-round"])
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    new = ArrayRecord([np.full_like(a, float(pid + server_round)) for a in arrays])
    metrics = MetricRecord(
        {
            "num-examples": pid + 1,
            "partition-id": pid,
            "num-partitions": int(context.node_config.get("num-partitions", 0)),
            # A deployed SuperNode may name its own files; echo them so tests can check.
            "has-manifest": int(bool(context.node_config.get("manifest", ""))),
        }
    )
    return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)


@server_app.main()
def main(grid: Grid, context: Context) -> None:
    if context.run_config["fail-server"]:
        raise RuntimeError("engine_toy: ServerApp failed on purpose")
    rounds = int(context.run_config["num-rounds"])
    strategy = FedAvg(fraction_train=1.0, fraction_evaluate=0.0, min_available_nodes=2, min_train_nodes=2)
    result = strategy.start(grid=grid, initial_arrays=ArrayRecord([np.zeros(4, dtype=np.float32)]), num_rounds=rounds)
    train_metrics = {int(r): dict(m) for r, m in result.train_metrics_clientapp.items()}
    path = Path(str(context.run_config["result-path"]))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        json.dumps(
            {
                "rounds": len(train_metrics),
                "arrays": [a.tolist() for a in result.arrays.to_numpy_ndarrays()],
                "train-metrics": train_metrics,
            }
        )
    )
