"""Replies aggregated as they arrive give what the held path gives, and are dropped once added."""

from __future__ import annotations

import gc
import weakref

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from fedspeech.federated import strategies as st
from fedspeech.federated.inprocess import InProcessGrid
from fedspeech.federated.round_loop import receive_replies
from test_strategies import FakeGrid, error_reply, instructions, reply, task_identity, to_record, to_state

__all__ = ["task_identity"]  # the autouse fixture, imported so it applies here too

RNG = np.random.default_rng(0)
GLOBAL = {
    "enc.w": RNG.normal(size=(64, 33)).astype(np.float32),
    "pred.w": RNG.normal(size=70).astype(np.float32),
    "steps": np.array(10, dtype=np.int64),
}
NODES = [3, 5, 8, 11, 13]


def client_state(node: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(node)
    state = {k: (v + 0.3 * rng.normal(size=v.shape)).astype(np.float32) for k, v in GLOBAL.items() if v.ndim}
    state["steps"] = np.array(10 + node, dtype=np.int64)
    return state


def round_replies(strategy: st.RobustFedAvg, server_round: int, nodes: list[int] = NODES) -> list[Message]:
    """Good replies of ``nodes`` plus a crash, a NaN and a huge update (refused or clipped)."""
    msgs = instructions(strategy, GLOBAL, [*nodes, 90, 91, 92], server_round)
    replies = [reply(msgs[n], client_state(n), n, loss=1.0 + n / 10) for n in nodes]
    nan = client_state(91)
    nan["enc.w"][0, 0] = np.nan
    huge = {k: (v * 1000 if v.dtype.kind == "f" else v) for k, v in client_state(92).items()}
    return [*replies, error_reply(msgs[90]), reply(msgs[91], nan, 4), reply(msgs[92], huge, 4)]


def held_and_streamed(name: str, server_round: int = 3, **kwargs):
    held, streamed = st.make_strategy(name, **kwargs), st.make_strategy(name, **kwargs)
    for strategy in (held, streamed):
        strategy.set_global_arrays(to_record(GLOBAL))
    held_arrays, held_metrics = held.aggregate_train(server_round, round_replies(held, server_round))
    stream = streamed.reply_stream(server_round)
    assert stream is not None
    for message in round_replies(streamed, server_round)[::-1]:  # any arrival order
        stream.add(message)
    streamed_arrays, streamed_metrics = stream.finish()
    return (held, held_arrays, held_metrics), (streamed, streamed_arrays, streamed_metrics)


RULES = [
    ("fedavg", 3, {}),
    ("fedavg", 3, {"max_update_norm": 200.0, "clip_norm": 5.0}),
    ("loss", 3, {}),
    ("mixed", 3, {}),
    ("ldawa", 1, {}),  # warm-up: FedAvg
    ("ldawa", 3, {}),
    ("fedu", 3, {"encoder_prefixes": ["enc."], "predictor_prefixes": ["pred."]}),
    ("partial", 3, {}),
]


@pytest.mark.parametrize(("name", "server_round", "kwargs"), RULES)
def test_streamed_round_equals_the_held_round(name: str, server_round: int, kwargs: dict) -> None:
    (held, held_arrays, held_metrics), (streamed, arrays, metrics) = held_and_streamed(name, server_round, **kwargs)
    expected, got = to_state(held_arrays), to_state(arrays)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == value.dtype, key
        np.testing.assert_allclose(got[key], value, rtol=1e-6, atol=1e-7, err_msg=key)
    a, b = held.last_report, streamed.last_report
    assert a is not None and b is not None
    assert b.accepted == a.accepted and b.accepted  # the same clients, in node order
    assert set(b.refused) == set(a.refused) and 90 in b.refused and 91 in b.refused
    assert b.weights == pytest.approx(a.weights)
    assert b.details.keys() == a.details.keys()
    if "deltas" in a.details:
        assert b.details["deltas"].keys() == a.details["deltas"].keys()
        for node, deltas in a.details["deltas"].items():
            assert b.details["deltas"][node] == pytest.approx(deltas)
    assert metrics["clients-accepted"] == held_metrics["clients-accepted"]


def test_the_guard_refuses_or_clips_per_reply_as_the_held_path() -> None:
    (held, *_), (streamed, *_) = held_and_streamed("fedavg", max_update_norm=200.0, clip_norm=5.0)
    a, b = held.last_report, streamed.last_report
    assert 92 in b.refused and "norm" in b.refused[92][0]  # the huge update
    assert b.details["clipped"] == a.details["clipped"] and b.details["clipped"]  # the rest scaled to 5
    assert b.details["update_norms"] == a.details["update_norms"]


def test_rules_that_need_every_reply_do_not_stream() -> None:
    for name, kwargs in (("median", {}), ("trimmed", {}), ("fedavg", {"norm_median_ratio": 3.0})):
        strategy = st.make_strategy(name, **kwargs)
        strategy.set_global_arrays(to_record(GLOBAL))
        assert strategy.reply_stream(1) is None, name


def test_a_streamed_reply_keeps_its_metrics_but_not_its_arrays() -> None:
    strategy = st.make_strategy("fedavg")
    msgs = instructions(strategy, GLOBAL, [1, 2])
    message = reply(msgs[1], client_state(1), 7)
    stream = strategy.reply_stream(1)
    stream.add(message)
    assert "arrays" not in message.content and message.content["metrics"]["num-examples"] == 7
    arrays, _ = stream.finish()
    assert_close = np.testing.assert_allclose
    assert_close(to_state(arrays)["enc.w"], client_state(1)["enc.w"], rtol=1e-6)


def test_too_few_valid_streamed_replies_keep_the_global_model() -> None:
    strategy = st.make_strategy("loss", min_replies=2)
    msgs = instructions(strategy, GLOBAL, [1, 2])
    stream = strategy.reply_stream(1)
    stream.add(reply(msgs[1], client_state(1), 3))
    stream.add(error_reply(msgs[2]))
    arrays, metrics = stream.finish()
    for key, value in to_state(arrays).items():
        np.testing.assert_array_equal(value, GLOBAL[key])
    assert "failed" in strategy.last_report.details and metrics["clients-accepted"] == 0


def test_the_in_process_server_holds_one_client_model_at_a_time() -> None:
    """Each client records how many earlier replies' arrays are still alive when it runs:
    streamed, none (added and dropped before the next client starts); held, all of them."""
    alive: list[weakref.ref] = []
    seen_alive: list[int] = []
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        gc.collect()
        seen_alive.append(sum(ref() is not None for ref in alive))
        arrays = msg.content["arrays"]
        record = ArrayRecord({k: arrays[k] for k in arrays})  # the global model sent back
        alive.extend(weakref.ref(record[k]) for k in record)
        return Message(RecordDict({"arrays": record, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    def run(name: str) -> list[int]:
        alive.clear()
        seen_alive.clear()
        grid = InProcessGrid(client_app=app, node_configs=[{"partition-id": i} for i in range(4)], run_config={})
        strategy = st.make_strategy(name)
        messages = list(
            strategy.configure_train(1, to_record(GLOBAL), ConfigRecord(), FakeGrid(list(grid.get_node_ids())))
        )
        stream = strategy.reply_stream(1)
        replies = receive_replies(grid, messages, on_reply=stream.add if stream else None)
        if stream is None:
            strategy.aggregate_train(1, replies)
        return list(seen_alive)

    assert run("fedavg") == [0, 0, 0, 0]
    assert run("median") == [0, 3, 6, 9]  # three arrays per reply, every reply held
