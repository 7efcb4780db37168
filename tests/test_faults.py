"""Fault injection (federated/faults.py) and what the round loop does with faulty clients:
a crashing client and a scaled-update attacker do not stop or poison a run."""

from __future__ import annotations

import numpy as np
import pytest

from fedspeech.apps.pretrain.run import run_pretraining
from fedspeech.federated.faults import parse_faults
from test_pretrain import settings


def test_spec_parsing_and_errors_name_the_entry():
    plan = parse_faults("crash=0.1, scale=100:0.05, slow=2:0.5, malicious=0:3")
    assert plan.probabilities == {"crash": 0.1, "scale": 0.05, "slow": 0.5}
    assert plan.amounts["scale"] == 100.0 and plan.amounts["slow"] == 2.0 and plan.malicious == {0, 3}
    for bad, match in (("explode=0.1", "unknown kind 'explode'"), ("nan=2", "probability"), ("scale=x:y", "scale=")):
        with pytest.raises(ValueError, match=match):
            parse_faults(bad)


def test_draws_are_reproducible_and_follow_the_probability():
    plan = parse_faults("crash=0.3")
    draws = [plan.draw(seed=1, server_round=r, client=c) for r in range(1, 101) for c in range(10)]
    assert draws == [plan.draw(seed=1, server_round=r, client=c) for r in range(1, 101) for c in range(10)]
    assert 0.25 < draws.count("crash") / len(draws) < 0.35
    attacker = parse_faults("flip=0,malicious=2")
    assert [attacker.draw(0, r, 2) for r in (1, 2, 3)] == ["flip"] * 3 and attacker.draw(0, 1, 1) is None


def test_a_crashing_client_and_a_scaling_attacker_neither_stop_nor_poison_pretraining(
    small_corpus, speaker_partition, tmp_path
):
    partition = speaker_partition(3)
    # client 2 sends 1000x updates every round; the median-relative guard refuses it
    attacked = dict(faults="scale=1000:0,malicious=2", update_norm_ratio=3.0)
    records = run_pretraining(settings(small_corpus, partition, tmp_path / "guarded", **attacked))
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        refused = record["aggregation"]["refused"]
        assert len(refused) == 1 and "median" in next(iter(refused.values()))[0]
        assert np.isfinite(record["val_loss"])
    # a client that crashes in every round is dropped; the others carry the run
    crashing = run_pretraining(
        settings(small_corpus, partition, tmp_path / "crash", faults="crash=0,malicious=0", min_replies=2)
    )
    assert all(len(r["failed"]) == 1 and r["sampled"] == [1, 2] for r in crashing)
    assert "injected fault" in crashing[0]["failed"][0]["error"]
    # min_replies above what survives: each round fails and the global model stays
    starved = run_pretraining(
        settings(small_corpus, partition, tmp_path / "starved", faults="crash=0,malicious=0", min_replies=3, rounds=1)
    )
    assert "fewer than min_replies=3" in starved[0]["round_failed"]


def test_a_client_past_the_reply_timeout_is_dropped_and_the_run_goes_on(small_corpus, speaker_partition, tmp_path):
    partition = speaker_partition(3)
    # client 1 stalls 6 s before training in every round; the round waits at most 3 s
    stalled = dict(faults="slow=6:0,malicious=1", reply_timeout=3.0, rounds=1)
    [record] = run_pretraining(settings(small_corpus, partition, tmp_path / "stalled", **stalled))
    assert record["sampled"] == [0, 2] and len(record["failed"]) == 1
    assert "timeout" in record["failed"][0]["error"]
    assert all(c["seconds"] < 3.0 for c in record["clients"]) and np.isfinite(record["val_loss"])


def test_a_node_that_never_answers_gets_an_error_reply():
    """Flower's grids return only the replies that came within the timeout; the round loop
    turns each missing one into an error reply, logged like a crash."""
    from flwr.app import ConfigRecord, Message, RecordDict

    from fedspeech.federated.round_loop import receive_replies

    class SilentNodeGrid:  # node 7 never answers; the others' replies come one per pull
        def push_messages(self, messages):
            self.waiting = []
            for i, message in enumerate(messages):
                message.metadata.__dict__["_message_id"] = f"m{i}"
                if message.metadata.dst_node_id != 7:
                    self.waiting.append(Message(RecordDict(), reply_to=message))
            return [m.metadata.message_id for m in messages]

        def pull_messages(self, message_ids):
            return [self.waiting.pop()] if self.waiting else []

    messages = [
        Message(RecordDict({"config": ConfigRecord({})}), dst_node_id=n, message_type="train") for n in (9, 7, 3)
    ]
    seen = []
    replies = receive_replies(SilentNodeGrid(), messages, reply_timeout=0.3, on_reply=seen.append)  # type: ignore[arg-type]
    assert [int(r.metadata.src_node_id) for r in replies] == [3, 7, 9]
    assert [r.has_error() for r in replies] == [False, True, False]
    assert "0.3 s reply timeout" in replies[1].error.reason
    assert [int(r.metadata.src_node_id) for r in seen] == [3, 9, 7]  # as they arrived, the late one last
