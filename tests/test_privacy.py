"""Differential privacy (central DP-FedAvg with Flower's accountant): clipping and noise are
actually applied, integer buffers are never noised, epsilon grows as the accountant says,
resumed accounting continues, and rules that cannot run under DP say so."""

from __future__ import annotations

import numpy as np
import pytest
from flwr.supercore.privacy_accounting import (
    GaussianPrivacyEvent,
    NeighboringRelation,
    PrivacyConfig,
    SamplingMethod,
)
from flwr.supercore.privacy_accounting.rdp_accountant import RdpAccountant

from fedspeech.federated import strategies as st
from fedspeech.federated.clipping import CLIP_NORM_KEY, clipping_mod
from test_strategies import instructions, reply, task_identity, to_state  # noqa: F401 (fixture)

SIZE = 200_000
GLOBAL = {"w": np.zeros(SIZE, dtype=np.float32), "steps": np.array([7], dtype=np.int64)}


def dp_round(strategy: st.RobustFedAvg, server_round: int, scale: float = 10.0, clients: int = 4):
    nodes = list(range(1, clients + 1))
    sent = instructions(strategy, GLOBAL, nodes, server_round)
    update = {"w": np.full(SIZE, scale / np.sqrt(SIZE), dtype=np.float32), "steps": np.array([7], dtype=np.int64)}
    replies = [reply(sent[n], update, n * 10) for n in nodes]  # unequal example counts: ignored under DP
    record, _ = strategy.aggregate_train(server_round, replies)
    return to_state(record), strategy.last_report


def test_updates_are_clipped_averaged_equally_and_noised_with_the_expected_std():
    strategy = st.RobustFedAvg(clip_norm=1.0, dp_noise_multiplier=2.0, dp_seed=0)
    state, report = dp_round(strategy, 1)  # every update has norm 10, clipped to 1
    clipped_mean = 1.0 / np.sqrt(SIZE)
    noise = state["w"].astype(np.float64) - clipped_mean
    expected_std = 2.0 * 1.0 / 4  # z * C / K
    assert report.details["dp"]["noise_std"] == pytest.approx(expected_std)
    assert noise.std() == pytest.approx(expected_std, rel=0.01) and abs(noise.mean()) < 0.01
    assert state["steps"].tolist() == [7]  # integer buffers are never noised
    assert list(report.details["clipped"].values()) == pytest.approx([0.1] * 4)


def test_epsilon_grows_as_flowers_accountant_says_and_resumes():
    strategy = st.RobustFedAvg(clip_norm=1.0, dp_noise_multiplier=1.5, dp_delta=1e-5, dp_seed=1)
    strategy.dp_population = 4
    epsilons = [dp_round(strategy, r)[1].details["dp"]["epsilon"] for r in (1, 2, 3)]
    assert epsilons[0] < epsilons[1] < epsilons[2]
    reference = RdpAccountant(
        PrivacyConfig(1e-5, 4, NeighboringRelation.ADD_OR_REMOVE_ONE, SamplingMethod.NO_AMPLIFICATION)
    )
    for _ in range(3):
        reference.compose(GaussianPrivacyEvent(1.5, 4, 4))
    assert epsilons[2] == pytest.approx(reference.get_privacy_spent().epsilon)
    resumed = st.RobustFedAvg(clip_norm=1.0, dp_noise_multiplier=1.5, dp_delta=1e-5, dp_seed=1)
    resumed.load_privacy_state(strategy.privacy_state())
    assert dp_round(resumed, 4)[1].details["dp"]["releases"] == 4


def test_rules_that_cannot_run_under_dp_and_missing_clipping_are_refused():
    with pytest.raises(ValueError, match="equal-weight FedAvg.*loss rule"):
        st.make_strategy("loss", clip_norm=1.0, dp_noise_multiplier=1.0)
    with pytest.raises(ValueError, match="needs clip_norm"):
        st.RobustFedAvg(dp_noise_multiplier=1.0)
    from fedspeech.apps.pretrain.settings import PretrainSettings

    with pytest.raises(ValueError, match="dp_noise: needs clip_norm"):
        PretrainSettings(dp_noise=1.0)


def test_pretraining_logs_epsilon_per_round_and_a_resumed_run_keeps_counting(small_corpus, speaker_partition, tmp_path):
    from fedspeech.apps.pretrain.run import run_pretraining
    from test_pretrain import settings

    dp = dict(dp_noise=0.5, clip_norm=1.0)
    partition = speaker_partition(2)
    first = run_pretraining(settings(small_corpus, partition, tmp_path / "run", rounds=1, **dp))
    resumed = run_pretraining(settings(small_corpus, partition, tmp_path / "run", rounds=2, resume=True, **dp))
    epsilons = [r["aggregation"]["dp"]["epsilon"] for r in resumed]
    assert epsilons[0] == first[0]["aggregation"]["dp"]["epsilon"] and epsilons[1] > epsilons[0]
    assert resumed[1]["aggregation"]["dp"]["releases"] == 2


# --------------------------------------------------------------- client-side clipping


def test_client_clipping_asks_the_clients_and_refuses_an_unclipped_update():
    strategy = st.RobustFedAvg(clip_norm=1.0, dp_clipping="client")
    sent = instructions(strategy, GLOBAL, [1, 2], 1)
    assert all(float(m.content["config"][CLIP_NORM_KEY]) == 1.0 for m in sent.values())
    small = {"w": np.full(SIZE, 0.5 / np.sqrt(SIZE), dtype=np.float32), "steps": GLOBAL["steps"]}
    large = {"w": np.full(SIZE, 10 / np.sqrt(SIZE), dtype=np.float32), "steps": GLOBAL["steps"]}
    record, _ = strategy.aggregate_train(1, [reply(sent[1], small, 10), reply(sent[2], large, 10)])
    report = strategy.last_report
    assert report.accepted == [1] and "not clipped" in report.refused[2][0]
    np.testing.assert_allclose(to_state(record)["w"], small["w"])  # accepted as sent: never rescaled


def test_the_clipping_mod_clips_float_tensors_to_the_asked_norm_and_leaves_integers():
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict

    start = {"w": np.zeros(1000, dtype=np.float32), "steps": np.array([7], dtype=np.int64)}

    def train(msg, context):
        moved = ArrayRecord({"w": Array(np.full(1000, 0.1, dtype=np.float32)), "steps": Array(np.array([9]))})
        return Message(RecordDict({"arrays": moved, "metrics": MetricRecord({"num-examples": 1})}), reply_to=msg)

    def message(config):
        arrays = ArrayRecord({k: Array(v) for k, v in start.items()})
        return Message(RecordDict({"arrays": arrays, "config": ConfigRecord(config)}), 1, "train")

    context = Context(run_id=0, node_id=1, node_config={}, state=RecordDict(), run_config={})
    clipped = clipping_mod(message({CLIP_NORM_KEY: 0.5}), context, train).content["arrays"]
    assert np.linalg.norm(clipped["w"].numpy().astype(np.float64)) == pytest.approx(0.5, rel=1e-6)
    assert clipped["steps"].numpy().tolist() == [9]
    untouched = clipping_mod(message({}), context, train).content["arrays"]
    assert np.linalg.norm(untouched["w"].numpy().astype(np.float64)) == pytest.approx(0.1 * np.sqrt(1000))


def test_client_clipped_dp_runs_under_secagg_and_an_unclipped_attacker_is_refused(
    small_corpus, speaker_partition, tmp_path
):
    from fedspeech.apps.pretrain.run import run_pretraining
    from test_pretrain import settings

    partition = speaker_partition(3)
    dp = dict(rounds=1, clip_norm=0.05, dp_clipping="client")
    # plain transport: every honest update arrives at most clip_norm long; the attacker
    # (x100 after its clipping, as a client that skips it) is refused
    [record] = run_pretraining(
        settings(small_corpus, partition, tmp_path / "attacked", faults="scale=100:0,malicious=1", **dp)
    )
    norms = record["aggregation"]["update_norms"]
    assert all(norms[n] <= 0.05 * (1 + 1e-4) for n in norms if n not in record["aggregation"]["refused"])
    [(_, reasons)] = record["aggregation"]["refused"].items()
    assert "not clipped" in reasons[0]
    # under SecAgg+ the server sees only the (equal-weight) sum and adds the noise
    [secure] = run_pretraining(
        settings(small_corpus, partition, tmp_path / "secure", secure_aggregation=True, dp_noise=0.5, **dp)
    )
    assert secure["aggregation"]["dp"]["epsilon"] > 0 and np.isfinite(secure["val_loss"])
