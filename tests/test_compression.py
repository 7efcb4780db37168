"""16- and 8-bit transport of updates (federated/compression.py): half (a quarter) of the
upload bytes, the weights back within the precision of the *update*, and every rule sees
float32."""

from __future__ import annotations

import numpy as np
import pytest

from fedspeech.apps.pretrain.run import run_pretraining
from fedspeech.federated import strategies as st
from fedspeech.federated.compression import (
    DELTA_METRIC,
    INT8_BLOCK,
    INT8_METRIC,
    SCALE_SUFFIX,
    decode_int8_update,
    decode_update,
    encode_int8_update,
    encode_update,
)
from fedspeech.federated.rules import GuardedSettings
from test_pretrain import settings
from test_strategies import instructions, reply, task_identity, to_state  # noqa: F401 (fixture)


def test_the_update_round_trips_within_float16_precision_of_the_update():
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(0, 0.5, 10_000).astype(np.float32), "steps": np.array([3], dtype=np.int64)}
    update = rng.normal(0, 1e-3, 10_000).astype(np.float32)
    trained = {"w": start["w"] + update, "steps": np.array([4], dtype=np.int64)}
    encoded = encode_update(trained, start)
    assert encoded["w"].dtype == np.float16 and encoded["steps"].tolist() == [4]
    decoded = decode_update(encoded, start)
    assert decoded["w"].dtype == np.float32
    error = np.abs(decoded["w"].astype(np.float64) - trained["w"])
    # float16 keeps ~3 digits of the update; float16 *weights* would be off by ~1e-4 here
    assert error.max() < 2e-6 and error.max() < 0.01 * np.abs(update).max()


def test_the_strategy_decodes_float16_updates_before_screening():
    strategy = st.RobustFedAvg(update_dtype="float16", max_update_norm=1.0)
    start = {"w": np.linspace(-1, 1, 100, dtype=np.float32)}
    sent = instructions(strategy, start, [1, 2], 1)
    assert all(m.content["config"]["update-dtype"] == "float16" for m in sent.values())
    replies = []
    for node, shift in ((1, 0.01), (2, 0.03)):
        message = reply(sent[node], encode_update({"w": start["w"] + np.float32(shift)}, start), 10)
        message.content["metrics"][DELTA_METRIC] = 1
        replies.append(message)
    record, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_report.accepted == [1, 2]  # the norms were of float32 updates, not of raw deltas
    np.testing.assert_allclose(to_state(record)["w"], start["w"] + 0.02, atol=1e-5)


def test_pretraining_with_float16_updates_halves_the_upload_and_trains_alike(small_corpus, speaker_partition, tmp_path):
    partition = speaker_partition(3)
    [plain] = run_pretraining(settings(small_corpus, partition, tmp_path / "fp32", rounds=1))
    [half] = run_pretraining(settings(small_corpus, partition, tmp_path / "fp16", rounds=1, update_dtype="float16"))
    assert 0.45 < half["bytes_from_clients"] / plain["bytes_from_clients"] < 0.55
    assert half["bytes_to_clients"] == pytest.approx(plain["bytes_to_clients"], rel=1e-3)  # + the config key
    assert half["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-3)


def test_partial_early_exit_updates_travel_in_float16_too():
    depth = {1: 1, 2: 2}
    strategy = st.DepthAwarePartial(
        update_dtype="float16", keys_for_node=lambda node, keys: [k for k in keys if int(k[1:]) <= depth[node]]
    )
    start = {"l1": np.zeros(50, dtype=np.float32), "l2": np.ones(50, dtype=np.float32)}
    sent = instructions(strategy, start, [1, 2], 1)
    assert list(sent[1].content["arrays"].keys()) == ["l1"]
    replies = []
    for node, shift in ((1, 0.01), (2, 0.03)):
        held = {k: v.numpy() for k, v in sent[node].content["arrays"].items()}
        message = reply(sent[node], encode_update({k: v + np.float32(shift) for k, v in held.items()}, held), 10)
        message.content["metrics"][DELTA_METRIC] = 1
        replies.append(message)
    state = to_state(strategy.aggregate_train(1, replies)[0])
    np.testing.assert_allclose(state["l1"], 0.02, atol=1e-5)  # both clients trained it
    np.testing.assert_allclose(state["l2"], 1.03, atol=1e-5)  # only the deep one


def test_int8_updates_round_trip_within_a_step_of_their_block_and_are_unbiased():
    rng = np.random.default_rng(0)
    start = {"w": rng.normal(0, 0.5, 1000).astype(np.float32), "steps": np.array([3], dtype=np.int64)}
    update = rng.normal(0, 1e-3, 1000).astype(np.float32)
    update[7] = 0.05  # one outlier costs precision only in its own block of 256
    trained = {"w": start["w"] + update, "steps": np.array([4], dtype=np.int64)}
    encoded = encode_int8_update(trained, start, np.random.default_rng(1))
    assert encoded["w"].dtype == np.int8 and encoded["steps"].tolist() == [4]
    assert encoded["w" + SCALE_SUFFIX].shape == (-(-1000 // INT8_BLOCK),)
    decoded = decode_int8_update(encoded, start)
    assert set(decoded) == {"w", "steps"} and decoded["w"].dtype == np.float32
    error = np.abs(decoded["w"].astype(np.float64) - trained["w"])
    step = np.repeat(encoded["w" + SCALE_SUFFIX], INT8_BLOCK)[:1000]
    assert (error <= step * (1 + 1e-3) + 1e-7).all()  # within one quantisation step
    assert error[256:].max() < 0.1 * error[:256].max()  # the outlier's block only
    # stochastic rounding: the mean of many clients' codes converges to the true update
    draws = [
        decode_int8_update(encode_int8_update(trained, start, np.random.default_rng(s)), start)["w"] for s in range(200)
    ]
    bias = np.abs(np.mean(draws, axis=0, dtype=np.float64) - trained["w"])
    assert bias[256:].mean() < 0.2 * error[256:].mean()


def test_the_strategy_decodes_int8_updates_and_refuses_codes_without_scales():
    strategy = st.RobustFedAvg(update_dtype="int8", max_update_norm=1.0)
    start = {"w": np.linspace(-1, 1, 600, dtype=np.float32)}
    sent = instructions(strategy, start, [1, 2, 3], 1)
    assert all(m.content["config"]["update-dtype"] == "int8" for m in sent.values())
    replies = []
    for node, shift in ((1, 0.01), (2, 0.03), (3, 0.02)):
        encoded = encode_int8_update({"w": start["w"] + np.float32(shift)}, start, np.random.default_rng(node))
        if node == 3:
            del encoded["w" + SCALE_SUFFIX]  # a broken client: codes without scales
        message = reply(sent[node], encoded, 10)
        message.content["metrics"][INT8_METRIC] = 1
        replies.append(message)
    record, _ = strategy.aggregate_train(1, replies)
    assert strategy.last_report.accepted == [1, 2]
    assert "dtype" in strategy.last_report.refused[3][0]
    np.testing.assert_allclose(to_state(record)["w"], start["w"] + 0.02, atol=1e-4)


def test_int8_is_refused_with_client_side_clipping():
    with pytest.raises(ValueError, match="update_dtype: int8"):
        GuardedSettings(update_dtype="int8", dp_clipping="client", clip_norm=1.0)


def test_pretraining_with_int8_updates_quarters_the_upload(small_corpus, speaker_partition, tmp_path):
    partition = speaker_partition(3)
    [plain] = run_pretraining(settings(small_corpus, partition, tmp_path / "fp32", rounds=1))
    [low] = run_pretraining(settings(small_corpus, partition, tmp_path / "int8", rounds=1, update_dtype="int8"))
    assert 0.25 < low["bytes_from_clients"] / plain["bytes_from_clients"] < 0.30
    assert low["val_loss"] == pytest.approx(plain["val_loss"], rel=1e-2)
