"""Streaming averages equal the textbook formulas, whatever order the replies arrive in."""

from __future__ import annotations

import numpy as np
import pytest

from fedspeech.federated.aggregation import ldawa, loss_weights
from fedspeech.federated.streaming import StreamingAverage, StreamingSoftmaxAverage


def _states(count: int, seed: int = 0) -> tuple[dict[str, np.ndarray], list[dict[str, np.ndarray]]]:
    rng = np.random.default_rng(seed)
    reference = {
        "w": rng.normal(size=(5, 3)).astype(np.float32),
        "b": rng.normal(size=(3,)).astype(np.float32),
        "steps": np.array(10, dtype=np.int64),
        "mask": np.array([True, False, True]),
    }
    states = [
        {
            "w": (reference["w"] + rng.normal(scale=0.1, size=(5, 3))).astype(np.float32),
            "b": (reference["b"] + rng.normal(scale=0.1, size=(3,))).astype(np.float32),
            "steps": np.array(10 + k, dtype=np.int64),
            "mask": np.array([k % 2 == 0, True, False]),
        }
        for k in range(count)
    ]
    return reference, states


def test_weighted_average_matches_the_float64_formula_with_partial_keys():
    reference, states = _states(4)
    states[3] = {"w": states[3]["w"]}  # an early-exit client sends only some keys
    weights = [1.0, 2.0, 3.0, 4.0]
    average = StreamingAverage(reference)
    for state, weight in zip(states, weights):
        average.add(state, weight)
    out = average.result()
    for key in reference:
        pairs = [(s[key].astype(np.float64), w) for s, w in zip(states, weights) if key in s]
        expected = sum(v * w for v, w in pairs) / sum(w for _, w in pairs)
        if reference[key].dtype.kind == "f":
            np.testing.assert_allclose(out[key], expected.astype(np.float32), rtol=1e-6)
        elif reference[key].dtype.kind == "b":
            np.testing.assert_array_equal(out[key], expected >= 0.5)
        else:
            assert out[key] == np.rint(expected)
        assert out[key].dtype == reference[key].dtype
    assert StreamingAverage(reference).result()["w"] is not reference["w"]  # nobody sent: a copy


@pytest.mark.parametrize("order", [[0, 1, 2, 3], [3, 2, 1, 0], [2, 0, 3, 1]])
def test_softmax_average_is_order_free_and_never_overflows(order):
    reference, states = _states(4, seed=1)
    losses = [900.0, 3.0, 2.5, 1000.0]  # exp(-L) of the plain formula underflows to 0 for two
    expected_weights = loss_weights(losses)
    softmax = StreamingSoftmaxAverage(reference)
    for k in order:
        softmax.add(states[k], -losses[k])
    out = softmax.result()
    expected = sum(w * s["w"].astype(np.float64) for w, s in zip(expected_weights, states))
    np.testing.assert_allclose(out["w"], expected.astype(np.float32), rtol=1e-6)
    with pytest.raises(ValueError, match="finite"):
        StreamingSoftmaxAverage(reference).add(states[0], float("nan"))


def test_ldawa_one_client_at_a_time_matches_the_paper_formula():
    reference, states = _states(3, seed=2)
    out = ldawa(reference, states)
    for key in ("w", "b"):
        y = reference[key].astype(np.float64).ravel()
        terms = []
        for state in states:
            x = state[key].astype(np.float64).ravel()
            delta = min(float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y))), 1.0)
            terms.append(delta * state[key].astype(np.float64))
        np.testing.assert_allclose(out[key], (sum(terms) / len(states)).astype(np.float32), rtol=1e-5)
    assert out["steps"] == np.rint(np.mean([int(s["steps"]) for s in states]))


def test_unknown_client_keys_are_refused():
    reference, states = _states(1)
    with pytest.raises(KeyError, match="extra"):
        StreamingAverage(reference).add({**states[0], "extra": np.zeros(2, np.float32)}, 1.0)


def test_the_fast_finiteness_check_agrees_with_isfinite():
    from fedspeech.federated.aggregation import all_finite

    rng = np.random.default_rng(3)
    for dtype in (np.float16, np.float32, np.float64):
        x = rng.normal(size=1000).astype(dtype)
        assert all_finite(x)
        assert all_finite(np.full(1000, np.finfo(dtype).max, dtype=dtype))  # huge but finite
        for bad in (np.nan, np.inf, -np.inf):
            y = x.copy()
            y[17] = bad
            assert not all_finite(y)
