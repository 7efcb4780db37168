"""Secure aggregation (Flower's SecAgg+ through federated/secagg.py): a round gives the same
global model as plain FedAvg up to the protocol's fixed-point quantisation, a client that
drops out mid-protocol does not stop the round, and rules that need individual updates are
refused with an error naming the field."""

from __future__ import annotations

import numpy as np
import pytest
from safetensors.numpy import load_file

from fedspeech.apps.pretrain.run import run_pretraining
from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.federated.secagg import MODULUS_RANGE, quantization_range
from fedspeech.ssl.methods import get_method
from test_pretrain import settings


def round_model(out) -> dict[str, np.ndarray]:
    return load_file(str(out / "checkpoints" / "round_0001" / "model.safetensors"))


def test_a_secagg_round_matches_plain_fedavg(small_corpus, speaker_partition, tmp_path):
    partition = speaker_partition(3)
    plain = run_pretraining(settings(small_corpus, partition, tmp_path / "plain", rounds=1))
    secure = run_pretraining(settings(small_corpus, partition, tmp_path / "secure", rounds=1, secure_aggregation=True))
    assert secure[0]["sampled"] == plain[0]["sampled"] == [0, 1, 2]
    # the clients' own metrics still reach the round log
    assert [c["examples"] for c in secure[0]["clients"]] == [c["examples"] for c in plain[0]["clients"]]
    a, b = round_model(tmp_path / "plain"), round_model(tmp_path / "secure")
    assert a.keys() == b.keys()
    start = {
        k: v.numpy()
        for k, v in get_method(settings(small_corpus, partition, tmp_path)).fresh_model().state_dict().items()
    }
    moved = max(float(np.abs(a[k].astype(np.float64) - start[k]).max()) for k in a)
    worst = max(float(np.abs(a[k].astype(np.float64) - b[k]).max()) for k in a)
    # the round moved the model by far more than SecAgg+'s fixed-point error
    assert moved > 1e-3 and worst < 1e-6, f"moved {moved}, SecAgg+ differs from FedAvg by {worst}"
    assert secure[0]["val_loss"] == pytest.approx(plain[0]["val_loss"], abs=1e-4)


def test_a_client_crashing_inside_the_protocol_is_dropped_and_the_round_completes(
    small_corpus, speaker_partition, tmp_path
):
    partition = speaker_partition(4)
    crashing = dict(rounds=1, secure_aggregation=True, faults="crash=0,malicious=1")
    [record] = run_pretraining(settings(small_corpus, partition, tmp_path / "crash", **crashing))
    assert record["sampled"] == [0, 2, 3] and len(record["failed"]) == 1
    assert "secure aggregation: dropped out" in record["failed"][0]["error"]
    assert np.isfinite(record["val_loss"])


def test_the_server_receives_only_masked_vectors_and_unmasks_the_weighted_mean():
    """The protocol alone, with Flower's apps: four clients move a weight to distinct values
    and report unequal example counts; nothing that leaves a node holds its plain update, and
    the server gets FedAvg's weighted mean back."""
    from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
    from flwr.clientapp import ClientApp
    from flwr.serverapp import Grid, ServerApp

    from fedspeech.federated.inprocess import run_inprocess
    from fedspeech.federated.secagg import secagg_mod, secure_replies

    sent_arrays: list[int] = []

    def spy_mod(msg, context, call_next):  # outermost: sees exactly what the node sends
        reply = call_next(msg, context)
        sent_arrays.extend(sum(a.numpy().size for a in r.values()) for r in reply.content.array_records.values())
        return reply

    client_app = ClientApp(mods=[spy_mod, secagg_mod])

    @client_app.train()
    def train(msg: Message, context: Context) -> Message:
        pid = int(context.node_config["partition-id"])
        start = msg.content["arrays"]["w"].numpy()
        new = ArrayRecord({"w": Array(start + np.float32(0.01 * (pid + 1)))})
        return Message(
            RecordDict({"arrays": new, "metrics": MetricRecord({"num-examples": 10 * (pid + 1)})}), reply_to=msg
        )

    results: dict = {}
    server_app = ServerApp()

    @server_app.main()
    def main(grid: Grid, context: Context) -> None:
        start = ArrayRecord({"w": Array(np.linspace(-1, 1, 1000, dtype=np.float32))})
        messages = [
            Message(RecordDict({"arrays": start, "config": ConfigRecord({"server-round": 1})}), n, "train")
            for n in grid.get_node_ids()
        ]
        results["replies"] = secure_replies(grid, messages, 1)
        results["start"] = start["w"].numpy()

    grid = run_inprocess(server_app, client_app, 4, {"secure-aggregation": True})
    weights = np.array([10, 20, 30, 40])
    expected = results["start"] + float((weights * 0.01 * np.arange(1, 5)).sum() / weights.sum())
    for reply in results["replies"]:
        np.testing.assert_allclose(reply.content["arrays"]["w"].numpy(), expected, atol=1e-6)
    assert sent_arrays and not any(sent_arrays), "a node sent a plain array"
    assert len([c for c in grid.calls if c.message_type == "train"]) == 4 * 4  # the protocol's four stages


def test_rules_that_need_individual_updates_are_refused_naming_the_field():
    for kwargs, field in (
        ({"strategy": "loss"}, "strategy"),
        ({"strategy": "median"}, "strategy"),
        ({"update_norm_ratio": 3.0}, "update_norm_ratio"),
        ({"clip_norm": 1.0}, "clip_norm"),
        ({"optimizer_state": "server"}, "optimizer_state"),
    ):
        with pytest.raises(ValueError, match=f"secure_aggregation: .*{field}"):
            PretrainSettings(secure_aggregation=True, **kwargs)


def test_the_quantisation_range_leaves_no_wrap_around():
    for clients in (3, 4, 5, 20, 100):
        assert clients * quantization_range(clients) <= MODULUS_RANGE
        assert 2 * clients * quantization_range(clients) > MODULUS_RANGE  # and is the widest such power of two
