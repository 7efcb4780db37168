"""Robust aggregation: the norm guard (absolute and relative to the round's median), norm
clipping, the minimum of valid replies, and the coordinate-wise median and trimmed mean,
through ``aggregate_train`` with hand-built replies."""

from __future__ import annotations

import numpy as np
import pytest

from fedspeech.federated import aggregation as agg
from fedspeech.federated import strategies as st
from test_strategies import f32, instructions, reply, task_identity, to_state  # noqa: F401 (fixture)

GLOBAL = {"w": f32(0.0, 0.0), "steps": np.array(3, dtype=np.int64)}


def run_round(strategy: st.RobustFedAvg, client_states: list[dict], counts: list[int] | None = None):
    nodes = list(range(1, len(client_states) + 1))
    sent = instructions(strategy, GLOBAL, nodes)
    counts = counts or [1] * len(nodes)
    replies = [reply(sent[n], s, c) for n, s, c in zip(nodes, client_states, counts)]
    record, _ = strategy.aggregate_train(1, replies)
    return to_state(record), strategy.last_report


def honest(x: float, y: float) -> dict:
    return {"w": f32(x, y), "steps": np.array(3, dtype=np.int64)}


def test_update_norm_skips_integer_buffers():
    assert agg.update_norm(honest(3.0, 4.0), GLOBAL) == pytest.approx(5.0)


def test_a_scaled_update_is_refused_relative_to_the_median_and_the_rest_averaged():
    clients = [honest(1.0, 0.0), honest(0.0, 1.0), honest(1.0, 1.0), honest(100.0, -100.0)]
    state, report = run_round(st.RobustFedAvg(norm_median_ratio=3.0), clients)
    assert 4 in report.refused and "median" in report.refused[4][0]
    np.testing.assert_allclose(state["w"], [2 / 3, 2 / 3], rtol=1e-6)
    plain, _ = run_round(st.RobustFedAvg(), clients)
    assert plain["w"][0] > 20  # without the guard the attacker drags the average


def test_absolute_bound_and_clipping():
    _, report = run_round(st.RobustFedAvg(max_update_norm=2.0), [honest(1.0, 0.0), honest(3.0, 4.0)])
    assert list(report.refused) == [2] and "above the bound" in report.refused[2][0]
    state, report = run_round(st.RobustFedAvg(clip_norm=1.0), [honest(3.0, 4.0), honest(0.0, 0.5)])
    assert report.details["clipped"] == {"1": pytest.approx(0.2)}
    np.testing.assert_allclose(state["w"], [(0.6 + 0.0) / 2, (0.8 + 0.5) / 2], rtol=1e-6)
    assert np.asarray(state["steps"]).ravel().tolist() == [3]  # integer buffers are never scaled


def test_too_few_valid_replies_keep_the_global_model_and_the_round_is_failed():
    strategy = st.RobustFedAvg(min_replies=3, norm_median_ratio=2.0)
    state, report = run_round(strategy, [honest(1.0, 1.0), honest(1.0, 1.0), honest(50.0, 50.0)])
    np.testing.assert_array_equal(state["w"], GLOBAL["w"])
    assert "fewer than min_replies=3" in report.details["failed"] and report.accepted == []
    assert 3 in report.refused


def test_coordinate_median_and_trimmed_mean_ignore_a_minority_of_extreme_values():
    clients = [honest(1.0, 2.0), honest(2.0, 3.0), honest(3.0, 4.0), honest(4.0, 5.0), honest(1e6, -1e6)]
    median, _ = run_round(st.make_strategy("median"), clients)
    np.testing.assert_allclose(median["w"], [3.0, 3.0])
    trimmed, report = run_round(st.make_strategy("trimmed", trim=0.2), clients)
    np.testing.assert_allclose(trimmed["w"], [(2 + 3 + 4) / 3, (2 + 3 + 4) / 3], rtol=1e-6)
    assert report.details["trim"] == 0.2 and report.weights[1] == pytest.approx(0.2)


def test_bad_screening_settings_are_refused_by_name():
    from fedspeech.apps.pretrain.settings import PretrainSettings

    with pytest.raises(ValueError, match="update_norm_ratio"):
        PretrainSettings(update_norm_ratio=-1.0)
    with pytest.raises(ValueError, match="min_replies"):
        PretrainSettings(min_replies=0)
    with pytest.raises(ValueError, match="trim_fraction"):
        PretrainSettings(trim_fraction=0.5)
