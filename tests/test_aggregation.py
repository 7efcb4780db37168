"""Aggregation rules against hand-computed aggregates on tiny arrays."""

from __future__ import annotations

import logging
import math

import numpy as np
import pytest

from fedspeech.federated import aggregation as agg
from fedspeech.ssl import fedu


def f32(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float32)


def i64(value: int) -> np.ndarray:
    return np.array(value, dtype=np.int64)


# Two clients used by the FedAvg / loss / mixed tests:
#   A: w = [1, 2], count = 12, n = 1, loss = 1.0
#   B: w = [3, 6], count = 15, n = 3, loss = 2.0
GLOBAL = {"w": f32(0, 0), "count": i64(10)}
A = {"w": f32(1, 2), "count": i64(12)}
B = {"w": f32(3, 6), "count": i64(15)}
# softmax(-[1, 2]) = [1/(1+e^-1), e^-1/(1+e^-1)] = [0.7310585786, 0.2689414214]
ALPHA_A, ALPHA_B = 0.7310585786300049, 0.2689414213699951


def test_fedavg_hand_computed_and_int_buffer_rounded() -> None:
    out = agg.fedavg([A, B], [1, 3], global_state=GLOBAL)
    # w = (1*[1,2] + 3*[3,6]) / 4 = [10, 20] / 4 = [2.5, 5.0]
    np.testing.assert_allclose(out["w"], [2.5, 5.0])
    # count = (1*12 + 3*15) / 4 = 57/4 = 14.25 -> 14, still int64
    assert out["count"].dtype == np.int64 and int(out["count"]) == 14
    assert out["w"].dtype == np.float32
    assert list(out) == ["w", "count"]  # global key order


def test_fedavg_without_global_uses_first_client_as_reference() -> None:
    out = agg.fedavg([A, B], [1, 3])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])


def test_dtypes_are_kept_for_int_uint_bool_and_half() -> None:
    g = {
        "i32": np.array([0, 0], np.int32),
        "u8": np.array([0], np.uint8),
        "flag": np.array([False]),
        "h": np.array([0.0], np.float16),
    }
    a = {
        "i32": np.array([1, 10], np.int32),
        "u8": np.array([200], np.uint8),
        "flag": np.array([True]),
        "h": np.array([1.0], np.float16),
    }
    b = {
        "i32": np.array([2, 20], np.int32),
        "u8": np.array([255], np.uint8),
        "flag": np.array([False]),
        "h": np.array([2.0], np.float16),
    }
    out = agg.fedavg([a, b], [1, 3], global_state=g)
    # i32: (1*[1,10] + 3*[2,20]) / 4 = [7/4, 70/4] = [1.75, 17.5] -> [2, 18] (ties to even)
    assert out["i32"].dtype == np.int32 and out["i32"].tolist() == [2, 18]
    # u8: (200 + 765) / 4 = 241.25 -> 241, no overflow through float64
    assert out["u8"].dtype == np.uint8 and out["u8"].tolist() == [241]
    # flag: weighted vote 1/4 True -> False
    assert out["flag"].dtype == np.bool_ and out["flag"].tolist() == [False]
    # h: (1 + 6) / 4 = 1.75
    assert out["h"].dtype == np.float16 and out["h"].tolist() == [1.75]


def test_loss_weights_sign_temperature_and_stability() -> None:
    weights = agg.loss_weights([1.0, 2.0])
    np.testing.assert_allclose(weights, [ALPHA_A, ALPHA_B], rtol=1e-12)
    assert weights[0] > weights[1]  # lower loss => larger weight
    # T = 2: softmax(-[0.5, 1.0]) -> 1/(1+e^-0.5) = 0.6224593312
    np.testing.assert_allclose(agg.loss_weights([1.0, 2.0], temperature=2.0)[0], 0.6224593312018546)
    # Huge losses: a naive exp(-1000) underflows to 0/0; shifted softmax does not.
    np.testing.assert_allclose(agg.loss_weights([1000.0, 1001.0]), [ALPHA_A, ALPHA_B], rtol=1e-12)
    with pytest.raises(ValueError, match="temperature"):
        agg.loss_weights([1.0], temperature=0.0)
    with pytest.raises(ValueError, match="finite"):
        agg.loss_weights([1.0, float("nan")])


def test_loss_weighted_hand_computed() -> None:
    out = agg.loss_weighted([A, B], [1.0, 2.0], global_state=GLOBAL)
    # 0.7310585786*[1,2] + 0.2689414214*[3,6] = [1.5378828428, 3.0757656856]
    np.testing.assert_allclose(out["w"], [1.5378828428, 3.0757656856], rtol=1e-6)
    # count: 0.731*12 + 0.269*15 = 12.8068 -> 13
    assert out["count"].dtype == np.int64 and int(out["count"]) == 13


def test_mixed_is_elementwise_beta_fedavg_plus_loss() -> None:
    out = agg.mixed([A, B], [1, 3], [1.0, 2.0], beta=0.2, global_state=GLOBAL)
    # weights: 0.2*[0.25, 0.75] + 0.8*[0.7310585786, 0.2689414214] = [0.6348468629, 0.3651531371]
    # w = 0.6348468629*[1,2] + 0.3651531371*[3,6] = [1.7303062742, 3.4606125484]
    # element-wise check: 0.2*[2.5, 5] + 0.8*[1.5378828428, 3.0757656856] gives the same
    np.testing.assert_allclose(out["w"], [1.7303062742, 3.4606125484], rtol=1e-6)
    np.testing.assert_allclose(agg.mixed_weights([1, 3], [1.0, 2.0]), [0.6348468629, 0.3651531371])
    assert out["count"].dtype == np.int64 and int(out["count"]) == 13  # 0.635*12+0.365*15=13.1
    # beta = 1 is FedAvg, beta = 0 is the loss rule
    np.testing.assert_allclose(agg.mixed([A, B], [1, 3], [1.0, 2.0], beta=1.0)["w"], [2.5, 5.0])
    np.testing.assert_allclose(
        agg.mixed([A, B], [1, 3], [1.0, 2.0], beta=0.0)["w"], [1.5378828428, 3.0757656856], rtol=1e-6
    )
    with pytest.raises(ValueError, match="beta"):
        agg.mixed([A, B], [1, 3], [1.0, 2.0], beta=1.5)


# L-DAWA, global w = [1, 0]:
#   A = [2, 0] -> cos 1, B = [0, 3] -> cos 0, C = [1, 1] -> cos 1/sqrt(2) = 0.7071067812
LD_GLOBAL = {"w": f32(1, 0), "count": i64(0)}
LD_A = {"w": f32(2, 0), "count": i64(12)}
LD_B = {"w": f32(0, 3), "count": i64(15)}
LD_C = {"w": f32(1, 1), "count": i64(18)}


def test_ldawa_divides_by_k_not_sum_of_deltas() -> None:
    out = agg.ldawa(LD_GLOBAL, [LD_A, LD_B, LD_C])
    # (1*[2,0] + 0*[0,3] + 0.7071067812*[1,1]) / 3 = [2.7071067812, 0.7071067812] / 3
    np.testing.assert_allclose(out["w"], [0.9023689271, 0.2357022604], rtol=1e-6)
    # dividing by sum(delta) = 1.7071 would give [1.5858, 0.4142]
    assert not np.allclose(out["w"], [1.5857864376, 0.4142135624], rtol=1e-3)
    # int buffer: plain mean (12 + 15 + 18) / 3 = 15, dtype kept
    assert out["count"].dtype == np.int64 and int(out["count"]) == 15
    deltas = agg.ldawa_deltas(LD_GLOBAL, [LD_A, LD_B, LD_C])
    assert [d["w"] for d in deltas] == pytest.approx([1.0, 0.0, 1 / math.sqrt(2)])
    assert all(d["count"] == 1.0 for d in deltas)


def test_ldawa_clips_delta_at_one() -> None:
    # Parallel vectors whose float64 cosine rounds to 1.0000000000000002.
    g = {"w": np.array([0.4, 1.3])}
    client = {"w": np.array([3.2, 10.4])}  # exactly 8 * g
    x, y = client["w"], g["w"]
    unclipped = float(np.dot(x, y)) / (float(np.linalg.norm(x)) * float(np.linalg.norm(y)))
    assert unclipped > 1.0
    assert agg.ldawa_deltas(g, [client])[0]["w"] == 1.0
    out = agg.ldawa(g, [client])
    assert np.array_equal(out["w"], client["w"])  # K = 1, delta = 1 -> exactly the client
    assert not np.array_equal(client["w"] * unclipped, client["w"])  # the clip mattered


def test_ldawa_keeps_negative_cosines_and_handles_zero_global() -> None:
    # global [1, 0]; A = [-2, 0] (delta -1), B = [2, 0] (delta 1): (2 + 2) / 2 = [2, 0]
    out = agg.ldawa({"w": f32(1, 0)}, [{"w": f32(-2, 0)}, {"w": f32(2, 0)}])
    np.testing.assert_allclose(out["w"], [2.0, 0.0])
    # zero global (zero-initialised bias): cosine undefined -> delta 1 -> plain mean [2, 2]
    out = agg.ldawa({"b": f32(0, 0)}, [{"b": f32(1, 1)}, {"b": f32(3, 3)}])
    np.testing.assert_allclose(out["b"], [2.0, 2.0])


def test_ldawa_warmup_is_plain_fedavg() -> None:
    out = agg.ldawa(LD_GLOBAL, [LD_A, LD_B], warmup=True, num_examples=[1, 3])
    # (1*[2,0] + 3*[0,3]) / 4 = [0.5, 2.25]
    np.testing.assert_allclose(out["w"], [0.5, 2.25])
    out = agg.ldawa(LD_GLOBAL, [LD_A, LD_B], warmup=True)  # equal weights
    np.testing.assert_allclose(out["w"], [1.0, 1.5])


@pytest.mark.parametrize(
    ("bad", "reason"),
    [
        ({"w": f32(np.nan, 1), "count": i64(1)}, "non-finite"),
        ({"w": f32(np.inf, 1), "count": i64(1)}, "non-finite"),
        ({"w": f32(1, 2, 3), "count": i64(1)}, "shape"),
        ({"w": f32(1, 2)}, "missing key 'count'"),
        ({"w": f32(1, 2), "count": i64(1), "extra": f32(0)}, "unexpected key 'extra'"),
        ({"w": np.array(["a", "b"]), "count": i64(1)}, "dtype"),
    ],
)
def test_bad_clients_are_refused_with_a_named_warning(
    bad: dict[str, np.ndarray], reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    assert any(reason in r for r in agg.validate_update(GLOBAL, bad))
    with caplog.at_level(logging.WARNING, logger="fedspeech.federated.aggregation"):
        out = agg.fedavg([A, bad, B], [1, 100, 3], global_state=GLOBAL, client_ids=["a", "evil", "b"])
    np.testing.assert_allclose(out["w"], [2.5, 5.0])  # as if "evil" never came
    messages = [r.getMessage() for r in caplog.records]
    assert any("evil" in m and reason in m for m in messages)


def test_all_refused_keeps_global_for_every_rule() -> None:
    nan = {"w": f32(np.nan, 0), "count": i64(1)}
    wrong = {"w": f32(1), "count": i64(1)}
    results = [
        agg.fedavg([nan, wrong], [1, 1], global_state=GLOBAL),
        agg.loss_weighted([nan, wrong], [1.0, 1.0], global_state=GLOBAL),
        agg.mixed([nan, wrong], [1, 1], [1.0, 1.0], global_state=GLOBAL),
        agg.ldawa(GLOBAL, [nan, wrong]),
        agg.partial_average(GLOBAL, [nan, wrong], [1, 1]),
    ]
    for out in results:
        assert list(out) == list(GLOBAL)
        for key in GLOBAL:
            assert np.array_equal(out[key], GLOBAL[key]) and out[key].dtype == GLOBAL[key].dtype
            assert out[key] is not GLOBAL[key]  # a copy, not the caller's array
    with pytest.raises(ValueError, match="no global_state"):
        agg.fedavg([nan], [1])


def test_refused_client_is_left_out_of_the_loss_softmax() -> None:
    nan = {"w": f32(np.nan, 0), "count": i64(1)}
    out = agg.loss_weighted([A, nan, B], [1.0, -50.0, 2.0], global_state=GLOBAL)
    np.testing.assert_allclose(out["w"], [1.5378828428, 3.0757656856], rtol=1e-6)


def test_fedu_divergence_and_predictor_rule() -> None:
    before = {"enc.w": f32(0, 0), "enc.b": f32(1), "enc.n": i64(5), "pred.w": f32(9)}
    after = {"enc.w": f32(3, 4), "enc.b": f32(1), "enc.n": i64(7), "pred.w": f32(0)}
    # encoder float tensors: ||[3,4]|| = 5, ||[0]|| = 0 -> mean 2.5 (int buffer skipped)
    assert fedu.fedu_divergence(before, after, prefixes="enc.") == pytest.approx(2.5)

    local = {"enc.w": f32(0, 0), "pred.w": f32(1, 1), "target.w": f32(9, 9)}
    glob = {"enc.w": f32(0.3, 0.4), "pred.w": f32(2, 2)}
    # divergence = ||[0.3, 0.4]|| = 0.5
    keep = fedu.fedu_client_update(local, glob, encoder_prefixes="enc.", predictor_prefixes="pred.", mu=0.4)
    assert keep.divergence == pytest.approx(0.5) and not keep.took_global_predictor
    np.testing.assert_allclose(keep.state["enc.w"], [0.3, 0.4])  # encoder always global
    np.testing.assert_allclose(keep.state["pred.w"], [1, 1])  # 0.5 >= 0.4: own predictor
    np.testing.assert_allclose(keep.state["target.w"], [9, 9])  # target stays local
    take = fedu.fedu_client_update(local, glob, encoder_prefixes="enc.", predictor_prefixes="pred.", mu=0.6)
    assert take.took_global_predictor
    np.testing.assert_allclose(take.state["pred.w"], [2, 2])
    assert list(take.state) == list(local)
    with pytest.raises(ValueError, match="encoder keys differ"):
        fedu.fedu_client_update(local, {"enc.x": f32(1)}, encoder_prefixes="enc.", predictor_prefixes="pred.")


# Heterogeneous depth: l3 is trained by nobody, n by nobody.
P_GLOBAL = {"l1": f32(0, 0), "l2": f32(0, 0), "l3": f32(7, 7), "n": i64(4)}
P_A = {"l1": f32(1, 1)}  # depth 1, n = 1
P_B = {"l1": f32(3, 3), "l2": f32(4, 8)}  # depth 2, n = 3
P_C = {"l1": f32(5, 5), "l2": f32(1, 2)}  # depth 2, n = 2


def test_partial_average_hand_computed() -> None:
    out = agg.partial_average(P_GLOBAL, [P_A, P_B, P_C], [1, 3, 2])
    # l1 over {A,B,C}: (1*1 + 3*3 + 2*5) / 6 = 20/6 = 3.3333
    np.testing.assert_allclose(out["l1"], [20 / 6, 20 / 6], rtol=1e-6)
    # l2 over {B,C}: (3*[4,8] + 2*[1,2]) / 5 = [14, 28] / 5 = [2.8, 5.6]
    np.testing.assert_allclose(out["l2"], [2.8, 5.6], rtol=1e-6)
    # l3 and n: nobody sent them -> global values, dtype kept
    np.testing.assert_allclose(out["l3"], [7, 7])
    assert out["n"].dtype == np.int64 and int(out["n"]) == 4
    assert agg.key_coverage(P_GLOBAL, [P_A, P_B, P_C]) == {"l1": 3, "l2": 2, "l3": 0, "n": 0}


def test_partial_average_refuses_unknown_keys_bad_shapes_and_nan() -> None:
    out = agg.partial_average(
        P_GLOBAL,
        [P_A, {"l9": f32(1, 1)}, {"l2": f32(1, 2, 3)}, {"l2": f32(np.nan, 0)}, P_B],
        [1, 50, 50, 50, 3],
    )
    np.testing.assert_allclose(out["l1"], [2.5, 2.5])  # (1*1 + 3*3) / 4
    np.testing.assert_allclose(out["l2"], [4, 8])  # B alone


def test_backbone_only_composes_with_every_rule() -> None:
    g = {"backbone.w": f32(1, 0), "backbone.n": i64(0), "head.w": f32(5, 5)}
    clients = [
        {"backbone.w": f32(2, 0), "backbone.n": i64(12), "head.w": f32(-100, -100)},
        {"backbone.w": f32(0, 3), "backbone.n": i64(15), "head.w": f32(100, 100)},
    ]
    sent = [agg.select_keys(c, ["backbone."]) for c in clients]
    assert all(list(s) == ["backbone.w", "backbone.n"] for s in sent)
    g_bb = agg.select_keys(g, "backbone.")
    expected_w = {
        # (1*[2,0] + 3*[0,3]) / 4
        "fedavg": [0.5, 2.25],
        # 0.731*[2,0] + 0.269*[0,3]
        "loss": [2 * ALPHA_A, 3 * ALPHA_B],
        # 0.6348*[2,0] + 0.3652*[0,3]
        "mixed": [2 * 0.6348468629, 3 * 0.3651531371],
        # deltas 1 and 0: ([2,0] + 0) / 2
        "ldawa": [1.0, 0.0],
        "partial": [0.5, 2.25],
    }
    outputs = {
        "fedavg": agg.fedavg(sent, [1, 3], global_state=g_bb),
        "loss": agg.loss_weighted(sent, [1.0, 2.0], global_state=g_bb),
        "mixed": agg.mixed(sent, [1, 3], [1.0, 2.0], global_state=g_bb),
        "ldawa": agg.ldawa(g_bb, sent),
        "partial": agg.partial_average(g_bb, sent, [1, 3]),
    }
    for name, out in outputs.items():
        merged = agg.merge_state(g, out)
        assert list(merged) == list(g), name
        np.testing.assert_allclose(merged["backbone.w"], expected_w[name], rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(merged["head.w"], [5, 5], err_msg=name)  # heads untouched
        assert merged["backbone.n"].dtype == np.int64


def test_key_helpers() -> None:
    state = {"encoder.a": f32(1), "encoder_head.b": f32(2), "head.c": f32(3)}
    assert list(agg.select_keys(state, "encoder.")) == ["encoder.a"]  # not "encoder_head."
    assert list(agg.select_keys(state, ("encoder.", "head."))) == ["encoder.a", "head.c"]
    assert list(agg.select_keys(state, None)) == list(state)
    assert list(agg.exclude_keys(state, "encoder.")) == ["encoder_head.b", "head.c"]
    with pytest.raises(ValueError, match="lacks"):
        agg.merge_state(state, {"other": f32(0)})
    with pytest.raises(ValueError, match="non-empty"):
        agg.select_keys(state, [""])


def test_input_errors_are_clear() -> None:
    with pytest.raises(ValueError, match="num_examples"):
        agg.fedavg([A, B], [1])
    with pytest.raises(ValueError, match="num_examples"):
        agg.fedavg([A, B], [1, 0])
    with pytest.raises(ValueError, match="no client states"):
        agg.fedavg([], [])
