"""The in-process Grid runs unmodified Flower apps and strategies."""

import numpy as np
import pytest
from flwr.app import ArrayRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

from fedspeech.federated.inprocess import run_inprocess

client_app = ClientApp()


@client_app.train()
def train(msg: Message, context: Context) -> Message:
    """Each client moves every weight to its partition id and reports n = id + 1."""
    pid = int(context.node_config["partition-id"])
    if context.run_config.get("fail-client") == pid:
        raise RuntimeError("simulated crash")
    arrays = msg.content["arrays"].to_numpy_ndarrays()
    calls = context.state.get("calls", MetricRecord({"n": 0}))
    calls["n"] = int(calls["n"]) + 1
    context.state["calls"] = calls
    new = ArrayRecord([np.full_like(a, float(pid)) for a in arrays])
    metrics = MetricRecord({"num-examples": pid + 1, "calls": calls["n"]})
    return Message(RecordDict({"arrays": new, "metrics": metrics}), reply_to=msg)


def make_server(results: dict) -> ServerApp:
    app = ServerApp()

    @app.main()
    def main(grid: Grid, context: Context) -> None:
        strategy = FedAvg(fraction_evaluate=0.0, min_available_nodes=1, min_train_nodes=1)
        result = strategy.start(
            grid=grid,
            initial_arrays=ArrayRecord([np.zeros(3, dtype=np.float32)]),
            num_rounds=int(context.run_config["rounds"]),
        )
        results["arrays"] = result.arrays.to_numpy_ndarrays()
        results["train"] = result.train_metrics_clientapp

    return app


def test_fedavg_rounds_run_in_process():
    results: dict = {}
    grid = run_inprocess(make_server(results), client_app, num_clients=3, run_config={"rounds": 2})
    # FedAvg of ids 0,1,2 weighted by 1,2,3 = (0 + 2 + 6) / 6
    np.testing.assert_allclose(results["arrays"][0], np.full(3, 8 / 6), rtol=1e-6)
    train_calls = [c for c in grid.calls if c.message_type == "train"]
    assert len(train_calls) == 6
    assert all(c.bytes_received > 0 and c.bytes_sent > 0 for c in train_calls)
    # node state persists across rounds, as under Flower's engines
    assert results["train"][2]["calls"] == pytest.approx(2)  # a weighted mean of 2s


def test_failing_client_becomes_error_reply_and_run_continues():
    results: dict = {}
    grid = run_inprocess(make_server(results), client_app, num_clients=3, run_config={"rounds": 1, "fail-client": 2})
    errors = [c for c in grid.calls if c.error]
    assert len(errors) == 1 and "simulated crash" in errors[0].error
    # Only clients 0 and 1 (weights 1, 2) are averaged: (0*1 + 1*2) / 3
    np.testing.assert_allclose(results["arrays"][0], np.full(3, 2 / 3), rtol=1e-6)
