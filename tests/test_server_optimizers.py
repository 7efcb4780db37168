"""Flower's server optimisers stepping from the aggregates our rules compute."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord

from fedspeech.federated.server_optimizers import ServerOptimizer


def record(**arrays: np.ndarray) -> ArrayRecord:
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()})


CURRENT = record(w=np.array([1.0, 2.0, 3.0], dtype=np.float32), count=np.array([4], dtype=np.int64))
AGGREGATE = record(w=np.array([1.5, 1.0, 3.0], dtype=np.float32), count=np.array([6], dtype=np.int64))


def test_fedavgm_server_lr_scales_the_step_and_momentum_accumulates():
    step = np.array([0.5, -1.0, 0.0], dtype=np.float32)
    plain = ServerOptimizer("fedavgm", lr=1.0, momentum=0.0).step(1, CURRENT, AGGREGATE)
    assert np.allclose(plain["w"].numpy(), CURRENT["w"].numpy() + step)
    doubled = ServerOptimizer("fedavgm", lr=2.0, momentum=0.0).step(1, CURRENT, AGGREGATE)
    assert np.allclose(doubled["w"].numpy(), CURRENT["w"].numpy() + 2 * step)
    assert doubled["w"].numpy().dtype == np.float32
    assert doubled["count"].numpy().tolist() == [6]  # integer buffers are the rule's, untouched

    momentum = ServerOptimizer("fedavgm", lr=1.0, momentum=0.5)
    first = momentum.step(1, CURRENT, AGGREGATE)
    moved = record(w=first["w"].numpy() + step, count=np.array([6]))  # the same displacement again
    second = momentum.step(2, first, moved)
    assert np.allclose(second["w"].numpy(), first["w"].numpy() + 1.5 * step)  # 0.5 * old + new


def test_fedadam_takes_a_normalised_step_of_about_eta():
    optimizer = ServerOptimizer("fedadam", lr=0.01, momentum=0.9, tau=1e-9)
    new = optimizer.step(1, CURRENT, AGGREGATE)["w"].numpy()
    moved = new - CURRENT["w"].numpy()
    assert moved.dtype == np.float32
    assert np.sign(moved[:2]).tolist() == [1.0, -1.0] and moved[2] == 0.0
    # Flower's bias-corrected first step: eta * sqrt(1 - b2^2) / (1 - b1^2) * (1 - b1) / sqrt(1 - b2)
    expected = 0.01 * np.sqrt(1 - 0.99**2) / (1 - 0.9**2) * 0.1 / np.sqrt(0.01)
    assert np.allclose(np.abs(moved[:2]), expected, rtol=1e-4)


@pytest.mark.parametrize("name", ["fedavgm", "fedadam", "fedyogi", "fedadagrad"])
def test_state_round_trip_continues_identically(name):
    a = ServerOptimizer(name, lr=0.5, momentum=0.5)
    b = ServerOptimizer(name, lr=0.5, momentum=0.5)
    first = a.step(1, CURRENT, AGGREGATE)
    b.load_state(a.state())
    target = record(w=first["w"].numpy() * 1.1, count=np.array([6]))
    assert np.array_equal(a.step(2, first, target)["w"].numpy(), b.step(2, first, target)["w"].numpy())


def test_bad_settings_name_the_field():
    with pytest.raises(ValueError, match="server optimizer"):
        ServerOptimizer("sgd", lr=1.0, momentum=0.0)
    with pytest.raises(ValueError, match="server_lr"):
        ServerOptimizer("fedavgm", lr=0.0, momentum=0.0)
    with pytest.raises(ValueError, match="server_momentum"):
        ServerOptimizer("fedavgm", lr=1.0, momentum=1.0)


def test_the_settings_offer_exactly_the_server_optimizers_there_are():
    from fedspeech.apps.pretrain import settings
    from fedspeech.federated import server_optimizers

    assert settings.SERVER_OPTIMIZERS == tuple(server_optimizers.SERVER_OPTIMIZERS)


def test_a_scoped_step_moves_only_the_keys_in_scope():
    current = record(cnn_w=np.array([1.0, 2.0], dtype=np.float32), head_w=np.array([1.0, 2.0], dtype=np.float32))
    aggregate = record(cnn_w=np.array([2.0, 1.0], dtype=np.float32), head_w=np.array([2.0, 1.0], dtype=np.float32))
    new = ServerOptimizer("fedavgm", lr=3.0, momentum=0.0, scope=("cnn_",)).step(1, current, aggregate)
    assert np.allclose(new["cnn_w"].numpy(), [4.0, -1.0])  # 1 + 3 * (2 - 1), 2 + 3 * (1 - 2)
    assert np.array_equal(new["head_w"].numpy(), aggregate["head_w"].numpy())  # the rule's aggregate
    with pytest.raises(ValueError, match="matches no floating-point key"):
        ServerOptimizer("fedavgm", lr=3.0, momentum=0.0, scope=("nothing.",)).step(1, current, aggregate)


def test_a_scope_without_a_server_optimizer_is_refused():
    from fedspeech.apps.pretrain.settings import PretrainSettings

    with pytest.raises(ValueError, match="server_optimizer_scope"):
        PretrainSettings(manifest="m.tsv", server_optimizer_scope="wav2vec2.feature_extractor.")
    assert PretrainSettings(
        manifest="m.tsv", server_optimizer="fedavgm", server_optimizer_scope="wav2vec2.feature_extractor."
    ).server_optimizer_scope
