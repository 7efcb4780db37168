"""Flower strategies: hand-built reply Messages through ``aggregate_train``.

Replies are built the way a ClientApp does: ``Message(content, reply_to=instruction)``
(or ``Message(Error(...), reply_to=instruction)``), so ``metadata.src_node_id`` is the
node the instruction went to.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable, Iterable, Mapping

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Error, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedspeech.federated import aggregation as agg
from fedspeech.federated import strategies as st


@pytest.fixture(autouse=True)
def task_identity() -> Iterable[None]:
    """Outside a running ServerApp, ``Message(...)`` needs the task identity set."""
    names = ("run_id", "node_id", "task_id")
    saved = {n: vars(TaskIdentity).get(f"_{n}") for n in names}
    for name in names:
        setattr(TaskIdentity, name, 1)
    yield
    for name, value in saved.items():
        setattr(TaskIdentity, name, value)


class FakeGrid:
    """The two Grid methods FedAvg/Strategy.start use; replies come from ``client_fn``."""

    def __init__(self, node_ids: list[int], client_fn: Callable[[Message], Message] | None = None):
        self.node_ids = node_ids
        self.client_fn = client_fn

    def get_node_ids(self) -> list[int]:
        return list(self.node_ids)

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> list[Message]:
        assert self.client_fn is not None
        return [self.client_fn(m) for m in messages]


def to_record(state: Mapping[str, np.ndarray]) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in state.items()})


def to_state(record: ArrayRecord) -> dict[str, np.ndarray]:
    return {k: v.numpy() for k, v in record.items()}


def reply(instruction: Message, state: Mapping[str, np.ndarray], n: int, loss: float | None = 1.0) -> Message:
    metrics: dict[str, float | int] = {"num-examples": n}
    if loss is not None:
        metrics["train_loss"] = loss
    content = RecordDict({"arrays": to_record(state), "metrics": MetricRecord(metrics)})
    return Message(content, reply_to=instruction)


def error_reply(instruction: Message) -> Message:
    return Message(Error(code=1, reason="client crashed"), reply_to=instruction)


def instructions(
    strategy: st.RobustFedAvg, global_state: Mapping[str, np.ndarray], nodes: list[int], server_round: int = 1
) -> dict[int, Message]:
    grid = FakeGrid(nodes)
    messages = strategy.configure_train(server_round, to_record(global_state), ConfigRecord(), grid)
    return {m.metadata.dst_node_id: m for m in messages}


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


GLOBAL = {"w": f32(0, 0), "count": np.array(10, dtype=np.int64)}
A = {"w": f32(1, 2), "count": np.array(12, dtype=np.int64)}
B = {"w": f32(3, 6), "count": np.array(15, dtype=np.int64)}
NAN = {"w": f32(np.nan, 1), "count": np.array(1, dtype=np.int64)}


def assert_state_equal(record: ArrayRecord, expected: Mapping[str, np.ndarray]) -> None:
    got = to_state(record)
    assert list(got) == list(expected)
    for key, value in expected.items():
        assert got[key].dtype == np.asarray(value).dtype, key
        np.testing.assert_allclose(got[key], value, rtol=1e-6, err_msg=key)


def test_fedavg_drops_error_nan_shape_and_missing_weight_replies() -> None:
    strategy = st.RobustFedAvg()
    msgs = instructions(strategy, GLOBAL, [1, 2, 3, 4, 5, 6])
    replies = [
        reply(msgs[1], A, 1),
        reply(msgs[2], B, 3),
        reply(msgs[3], NAN, 1000),
        error_reply(msgs[4]),
        reply(msgs[5], {"w": f32(1, 2, 3), "count": A["count"]}, 1000),
        Message(RecordDict({"arrays": to_record(A), "metrics": MetricRecord({"train_loss": 0.1})}), reply_to=msgs[6]),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    # (1*[1,2] + 3*[3,6]) / 4 = [2.5, 5]; count 57/4 -> 14
    assert_state_equal(arrays, {"w": f32(2.5, 5.0), "count": np.array(14, dtype=np.int64)})
    assert_state_equal(arrays, agg.fedavg([A, B], [1, 3], global_state=GLOBAL))
    report = strategy.last_report
    assert report is not None and report.accepted == [1, 2]
    assert set(report.refused) == {3, 4, 5, 6}
    assert "non-finite" in report.refused[3][0]
    assert "client crashed" in report.refused[4][0]
    assert "shape" in report.refused[5][0]
    assert "num-examples" in report.refused[6][0]
    assert report.weights == pytest.approx({1: 0.25, 2: 0.75})
    # metrics: Flower's weighted average over accepted replies (loss 1.0), plus counts
    assert metrics["train_loss"] == pytest.approx(1.0)
    assert metrics["clients-accepted"] == 2 and metrics["clients-refused"] == 4
    json.dumps(dataclasses.asdict(report))  # loggable as JSON


@pytest.mark.parametrize("rule", ["fedavg", "loss", "mixed", "ldawa"])
def test_aggregate_is_bitwise_independent_of_reply_order(rule: str) -> None:
    """Flower samples nodes in random order and replies arrive in any order; float sums in
    arrival order made two runs of one seed differ in the last bit."""
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(size=4096).astype(np.float32)}
    clients = {n: {"w": (start["w"] + rng.normal(size=4096)).astype(np.float32)} for n in range(1, 8)}
    results = []
    for order in ([1, 2, 3, 4, 5, 6, 7], [7, 3, 5, 1, 6, 2, 4]):
        strategy = st.make_strategy(rule)
        msgs = instructions(strategy, start, order, server_round=3)
        assert [
            m.metadata.dst_node_id
            for m in strategy.configure_train(3, to_record(start), ConfigRecord(), FakeGrid(order))
        ] == sorted(order)
        replies = [reply(msgs[n], clients[n], n, loss=1.0 + n / 10) for n in order]
        arrays, _ = strategy.aggregate_train(3, replies)
        results.append(to_state(arrays)["w"])
    assert results[0].tobytes() == results[1].tobytes()


def test_all_refused_returns_the_unchanged_global() -> None:
    strategy = st.make_strategy("mixed")
    msgs = instructions(strategy, GLOBAL, [1, 2])
    arrays, metrics = strategy.aggregate_train(1, [reply(msgs[1], NAN, 1), error_reply(msgs[2])])
    assert_state_equal(arrays, GLOBAL)
    assert metrics["clients-accepted"] == 0 and metrics["clients-refused"] == 2
    assert strategy.aggregate_train(1, []) == (None, None)


def test_loss_weighted_matches_pure_rule_and_needs_train_loss() -> None:
    strategy = st.make_strategy("loss", temperature=1.0)
    msgs = instructions(strategy, GLOBAL, [1, 2, 3, 4])
    replies = [
        reply(msgs[1], A, 1, loss=1.0),
        reply(msgs[2], B, 3, loss=2.0),
        reply(msgs[3], A, 5, loss=None),  # no train_loss -> refused
        reply(msgs[4], A, 5, loss=float("nan")),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # 0.7310585786*[1,2] + 0.2689414214*[3,6]
    assert_state_equal(arrays, {"w": f32(1.5378828428, 3.0757656856), "count": np.array(13, dtype=np.int64)})
    assert_state_equal(arrays, agg.loss_weighted([A, B], [1.0, 2.0], global_state=GLOBAL))
    report = strategy.last_report
    assert report.weights[1] > report.weights[2]  # lower loss, larger weight
    assert set(report.refused) == {3, 4} and "train_loss" in report.refused[3][0]


def test_mixed_matches_pure_rule() -> None:
    strategy = st.make_strategy("mixed", beta=0.2)
    msgs = instructions(strategy, GLOBAL, [1, 2])
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[1], A, 1, 1.0), reply(msgs[2], B, 3, 2.0)])
    assert_state_equal(arrays, agg.mixed([A, B], [1, 3], [1.0, 2.0], 0.2, global_state=GLOBAL))
    np.testing.assert_allclose(to_state(arrays)["w"], [1.7303062742, 3.4606125484], rtol=1e-6)
    assert strategy.last_report.weights == pytest.approx({1: 0.6348468629, 2: 0.3651531371})


def test_ldawa_warmup_then_cosine_rule_against_the_sent_global() -> None:
    strategy = st.make_strategy("ldawa", warmup_rounds=2)
    g = {"w": f32(1, 0)}
    ca, cb, cc = {"w": f32(2, 0)}, {"w": f32(0, 3)}, {"w": f32(1, 1)}
    for server_round in (1, 2):
        msgs = instructions(strategy, g, [1, 2], server_round)
        arrays, _ = strategy.aggregate_train(server_round, [reply(msgs[1], ca, 1), reply(msgs[2], cb, 3)])
        # warm-up: FedAvg (1*[2,0] + 3*[0,3]) / 4 = [0.5, 2.25]
        np.testing.assert_allclose(to_state(arrays)["w"], [0.5, 2.25])
        assert strategy.last_report.details["warmup"] is True
    msgs = instructions(strategy, g, [1, 2, 3], 3)
    arrays, _ = strategy.aggregate_train(3, [reply(msgs[1], ca, 1), reply(msgs[2], cb, 3), reply(msgs[3], cc, 100)])
    # deltas 1, 0, 1/sqrt(2); sample counts ignored; / K = 3
    np.testing.assert_allclose(to_state(arrays)["w"], [0.9023689271, 0.2357022604], rtol=1e-6)
    assert_state_equal(arrays, agg.ldawa(g, [ca, cb, cc]))
    details = strategy.last_report.details
    assert details["warmup"] is False
    assert details["deltas"][2]["w"] == pytest.approx(0.0)


def test_fedu_sends_encoder_predictor_and_mu_keeps_target_local() -> None:
    g = {"enc.w": f32(1, 1), "pred.w": f32(2, 2), "target.w": f32(9, 9)}
    strategy = st.make_strategy("fedu", encoder_prefixes=["enc."], predictor_prefixes=["pred."], mu=0.3)
    msgs = instructions(strategy, g, [1, 2])
    sent = msgs[1].content
    assert list(sent["arrays"].keys()) == ["enc.w", "pred.w"]  # target never leaves
    config = sent["config"]
    assert config["fedu-mu"] == pytest.approx(0.3)
    assert config["fedu-encoder-prefixes"] == ["enc."] and config["fedu-predictor-prefixes"] == ["pred."]
    assert config["server-round"] == 1
    ca = {"enc.w": f32(0, 0), "pred.w": f32(4, 4)}
    cb = {"enc.w": f32(4, 8), "pred.w": f32(0, 0)}
    arrays, _ = strategy.aggregate_train(1, [reply(msgs[1], ca, 1), reply(msgs[2], cb, 3)])
    # enc: (0 + 3*[4,8]) / 4 = [3, 6]; pred: (1*[4,4] + 0) / 4 = [1, 1]; target unchanged
    assert_state_equal(arrays, {"enc.w": f32(3, 6), "pred.w": f32(1, 1), "target.w": f32(9, 9)})


def test_backbone_only_transmission_ignores_heads_in_replies() -> None:
    g = {"backbone.w": f32(0, 0), "head.w": f32(5, 5)}
    strategy = st.make_strategy("loss", backbone_prefixes=("backbone.",))
    msgs = instructions(strategy, g, [1, 2])
    assert list(msgs[1].content["arrays"].keys()) == ["backbone.w"]
    # node 2 wrongly sends its head too: the head is ignored, the backbone still counts
    replies = [
        reply(msgs[1], {"backbone.w": f32(1, 2)}, 1, loss=1.0),
        reply(msgs[2], {"backbone.w": f32(3, 6), "head.w": f32(-1e9, 1e9)}, 3, loss=2.0),
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    assert_state_equal(arrays, {"backbone.w": f32(1.5378828428, 3.0757656856), "head.w": f32(5, 5)})
    assert strategy.last_report.details["ignored_non_backbone_keys"] == {2: 1}
    with pytest.raises(ValueError, match="match no key"):
        st.make_strategy("fedavg", backbone_prefixes="nothing.").set_global_arrays(to_record(g))


def test_partial_aggregates_heterogeneous_key_sets() -> None:
    g = {"l1": f32(0, 0), "l2": f32(0, 0), "l3": f32(7, 7), "n": np.array(4, dtype=np.int64)}
    strategy = st.make_strategy("partial")
    msgs = instructions(strategy, g, [1, 2, 3, 4])
    pa, pb, pc = {"l1": f32(1, 1)}, {"l1": f32(3, 3), "l2": f32(4, 8)}, {"l1": f32(5, 5), "l2": f32(1, 2)}
    replies = [
        reply(msgs[1], pa, 1),
        reply(msgs[2], pb, 3),
        reply(msgs[3], pc, 2),
        reply(msgs[4], {"l2": f32(1, 2, 3)}, 10),  # wrong shape -> refused
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    # l1: (1 + 9 + 10)/6; l2: (3*[4,8] + 2*[1,2]) / 5 = [2.8, 5.6]; l3, n: untouched
    expected = {"l1": f32(20 / 6, 20 / 6), "l2": f32(2.8, 5.6), "l3": f32(7, 7), "n": g["n"]}
    assert_state_equal(arrays, expected)
    assert_state_equal(arrays, agg.partial_average(g, [pa, pb, pc], [1, 3, 2]))
    report = strategy.last_report
    assert report.details["keys_not_trained"] == ["l3", "n"]
    assert report.details["keys_sent"] == {1: 1, 2: 2, 3: 2}
    assert list(report.refused) == [4]


def test_partial_sends_per_node_sub_models() -> None:
    g = {"l1": f32(0, 0), "l2": f32(0, 0), "l3": f32(7, 7)}
    depth = {1: 1, 2: 3}
    strategy = st.DepthAwarePartial(keys_for_node=lambda node, keys: [k for k in keys if int(k[1:]) <= depth[node]])
    msgs = instructions(strategy, g, [1, 2])
    assert list(msgs[1].content["arrays"].keys()) == ["l1"]
    assert list(msgs[2].content["arrays"].keys()) == ["l1", "l2", "l3"]
    assert msgs[1].content["config"]["server-round"] == 1
    assert msgs[1].metadata.message_type == "train"


def test_aggregate_without_configure_is_a_clear_error() -> None:
    with pytest.raises(RuntimeError, match="configure_train"):
        st.RobustFedAvg().aggregate_train(1, [])


def test_make_strategy_names_and_errors() -> None:
    kinds = {
        name: type(
            st.make_strategy(name, **({"encoder_prefixes": "e.", "predictor_prefixes": "p."} if name == "fedu" else {}))
        )
        for name in ("fedavg", "loss", "mixed", "ldawa", "fedu", "partial")
    }
    assert kinds == {
        "fedavg": st.RobustFedAvg,
        "loss": st.LossWeighted,
        "mixed": st.MixedFedAvgLoss,
        "ldawa": st.LDAWA,
        "fedu": st.FedU,
        "partial": st.DepthAwarePartial,
    }
    assert st.make_strategy("fedavg", fraction_train=0.5).fraction_train == 0.5  # FedAvg kwargs pass
    with pytest.raises(ValueError, match="unknown aggregation strategy 'krum'"):
        st.make_strategy("krum")
    with pytest.raises(ValueError, match="bad arguments"):
        st.make_strategy("fedavg", beta=0.3)
    with pytest.raises(ValueError, match="beta"):
        st.make_strategy("mixed", beta=2.0)


def test_start_runs_rounds_with_a_faulty_client() -> None:
    """Strategy.start end to end: node 3 always sends NaNs, the rounds go on without it."""
    g = {"backbone.w": f32(0, 0), "head.w": f32(5, 5)}

    def client(message: Message) -> Message:
        node = message.metadata.dst_node_id
        received = to_state(message.content["arrays"])
        assert list(received) == ["backbone.w"]
        if node == 3:
            return reply(message, {"backbone.w": f32(np.nan, 0)}, 10)
        return reply(message, {"backbone.w": received["backbone.w"] + node}, node)

    strategy = st.make_strategy("fedavg", backbone_prefixes="backbone.", fraction_evaluate=0.0)
    result = strategy.start(grid=FakeGrid([1, 2, 3], client), initial_arrays=to_record(g), num_rounds=2)
    # each round adds (1*1 + 2*2) / 3 = 5/3 to the backbone; the head never changes
    assert_state_equal(result.arrays, {"backbone.w": f32(10 / 3, 10 / 3), "head.w": f32(5, 5)})
    assert [r.refused.keys() for r in strategy.reports] == [{3}, {3}]
    assert result.train_metrics_clientapp[2]["clients-refused"] == 1
