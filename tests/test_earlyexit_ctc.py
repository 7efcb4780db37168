"""Federated early-exit fine-tuning with CTC exits (``task = "asr"``), in-process: WER and
CER per exit, partial upload by depth, untouched deep layers, checkpoints and the report."""

from __future__ import annotations

import json
import math
import uuid
from pathlib import Path

import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MessageType, RecordDict
from safetensors.torch import load_file

from fedspeech.apps.earlyexit import client_app, task
from fedspeech.apps.earlyexit.report import comparison_table, summarize
from fedspeech.apps.earlyexit.run import run_early_exit
from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.data.audio import AudioDataset, make_loader
from fedspeech.data.manifest import read_manifest
from fedspeech.data.partition import Partition, client_utterances
from fedspeech.downstream.metrics import cer, wer
from fedspeech.downstream.tasks import asr_utterances
from fedspeech.downstream.text import ctc_greedy_decode, normalize_transcript
from fedspeech.federated.checkpoints import round_dir

EXITS = (1, 2, 4)  # the tiny preset's 4 layers
DEPTH_CAPS = [1, 2, 2]  # each client's own cap: nobody trains layers 3 and 4


@pytest.fixture(scope="module")
def partition(speaker_partition) -> Path:
    return speaker_partition(3)


def make_settings(small_corpus: Path, partition: Path, out: Path, **kw) -> EarlyExitSettings:
    base = dict(
        manifest=str(small_corpus),
        partition=str(partition),
        out_dir=str(out),
        task="asr",
        model="tiny",
        exits=",".join(map(str, EXITS)),
        rounds=1,
        batch_size=4,
        lr=2e-3,
        eval_splits="dev,test",
        deadline=100.0,
    )
    return EarlyExitSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def asr_run(small_corpus, partition, tmp_path_factory):
    """Two adaptive rounds on fast made-up devices; clients cap their own depth at 1, 2, 2."""
    folder = tmp_path_factory.mktemp("ctc-run")
    fleet = folder / "fleet.json"
    fleet.write_text(
        json.dumps({"clients": ["fast"] * 3, "devices": {"fast": {"memory_gb": 8, "throughput_flops": 1e12}}})
    )
    settings = make_settings(small_corpus, partition, folder / "run", rounds=2, fleet=str(fleet))
    records = run_early_exit(settings, node_configs=[{"max-depth": cap} for cap in DEPTH_CAPS])
    return settings, records


def test_round_log_has_wer_and_cer_at_every_exit(asr_run, small_corpus):
    settings, records = asr_run
    held_out = [u for u in asr_utterances(read_manifest(small_corpus)) if u.split in ("dev", "test")]
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        assert record["task"] == "asr" and "accuracy" not in record
        assert {c["client"]: c["depth"] for c in record["clients"]} == dict(enumerate(DEPTH_CAPS))
        assert all(math.isfinite(c["train_loss"]) and c["train_loss"] > 0 for c in record["clients"])
        assert record["eval_utterances"] == len(held_out) == 6  # 3 sentences of the dev and the test speaker
        for score in ("wer", "cer"):
            assert set(record[score]) == {str(e) for e in EXITS}
            assert all(v >= 0 and math.isfinite(v) for v in record[score].values())
            assert record[f"{score}_deepest"] == record[score]["4"]
            assert record["confidence_exit"][score] >= 0
        assert 1 <= record["confidence_exit"]["mean_exit_layer"] <= 4
        assert record["layers_not_trained"] == [3, 4]
        assert record["example"]["reference"] in {normalize_transcript(u.transcript) for u in held_out}


def test_logged_wer_matches_the_checkpoint(asr_run, small_corpus):
    """The round's checkpoint, decoded greedily at every exit, scores what the log says."""
    settings, records = asr_run
    folder = round_dir(Path(settings.out_dir), 2)
    model, vocab = task.load_early_exit(folder).eval(), task.load_vocab(folder)
    assert model.task == "ctc" and model.exits == EXITS and vocab == task.run_vocab(settings)
    held_out = sorted(
        (u for u in asr_utterances(read_manifest(small_corpus)) if u.split in ("dev", "test")), key=lambda u: u.id
    )
    references = [normalize_transcript(u.transcript) for u in held_out]
    hypotheses = {e: [] for e in EXITS}
    with torch.no_grad():
        # one sentence at a time (no crop, no padding): the run's frozen-CNN feature cache
        # computes every utterance's features alone too
        for batch in make_loader(AudioDataset(held_out), 1):
            out = model(batch["input_values"], batch["attention_mask"])
            for e in EXITS:
                hypotheses[e] += [vocab.decode(t) for t in ctc_greedy_decode(out.logits[e], out.output_lengths)]
    for e in EXITS:
        assert records[-1]["wer"][str(e)] == pytest.approx(wer(references, hypotheses[e]))
        assert records[-1]["cer"][str(e)] == pytest.approx(cer(references, hypotheses[e]))


def test_shallow_client_uploads_no_deep_layers(asr_run):
    settings, records = asr_run
    model = task.build_model(settings)
    clients = {c["client"]: c for c in records[0]["clients"]}
    assert clients[0]["arrays_sent"] == len(model.trainable_keys(1)) < clients[1]["arrays_sent"]
    assert clients[0]["bytes_sent"] < clients[1]["bytes_sent"]

    # Client 0's reply itself, called as the runner calls it: only layer 1, the shared trunk and head 1.
    context = Context(
        run_id=0,
        node_id=1,
        node_config={"partition-id": 0, "num-partitions": 3},
        state=RecordDict(),
        run_config=settings.to_run_config(),
    )
    state = model.state_dict()
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: state[k] for k in model.held_keys(1)}),
            "config": ConfigRecord({"depth": 1, "server-round": 1, "lr": 1e-3}),
        }
    )
    message = Message(content, 1, MessageType.TRAIN)
    message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
    sent = set(client_app.client_train(message, context).content["arrays"].keys())
    assert sent == set(model.trainable_keys(1))
    assert any(k.startswith("backbone.encoder.layers.0.") for k in sent) and "heads.1.proj.weight" in sent
    assert not any(
        k.startswith(("backbone.encoder.layers.1.", "backbone.encoder.layers.3.", "heads.2.", "heads.4.")) for k in sent
    )
    assert not any(k.startswith("backbone.feature_extractor.") for k in sent)  # frozen CNN: never sent


def test_untrained_deep_layer_keeps_its_global_value(asr_run):
    settings, _ = asr_run
    initial = task.build_model(settings)
    folder = round_dir(Path(settings.out_dir), 2)
    backbone, start = load_file(str(folder / "model.safetensors")), initial.backbone.state_dict()
    for key in ("encoder.layers.2.attention.q_proj.weight", "encoder.layers.3.feed_forward.output_dense.weight"):
        assert torch.equal(backbone[key], start[key])
    for key in ("encoder.layers.0.attention.q_proj.weight", "encoder.layers.1.attention.q_proj.weight"):
        assert not torch.equal(backbone[key], start[key])
    heads, initial_heads = task.load_early_exit(folder).state_dict(), initial.state_dict()
    assert torch.equal(heads["heads.4.proj.weight"], initial_heads["heads.4.proj.weight"])
    assert heads["heads.1.proj.weight"].shape[0] == len(task.run_vocab(settings))  # CTC outputs: the characters
    assert not torch.equal(heads["heads.2.proj.weight"], initial_heads["heads.2.proj.weight"])


def test_report_table_and_plots_say_lower_is_better(asr_run, tmp_path):
    from fedspeech.apps.earlyexit.cli import write_report

    settings, records = asr_run
    summary = summarize(records)
    assert summary["task"] == "asr" and summary["deepest_trained_exit"] == 2
    assert summary["wer_deepest_trained"] == records[-1]["wer"]["2"]
    table = comparison_table({"adaptive": summary})
    assert table.splitlines()[0].startswith("| WER / CER: lower is better | adaptive |")
    for row in (
        "WER % at exit 1",
        "CER % at exit 4",
        "WER % at deepest trained exit",
        "confidence exit: WER % / mean exit",
    ):
        assert row in table
    assert "accuracy" not in table
    _, plots = write_report({"adaptive": records}, tmp_path)
    assert [p.name for p in plots] == ["wer_vs_exit.png", "wer_vs_compute.png"]
    assert all(p.stat().st_size > 0 for p in plots)
    kws = {**summary, "accuracy": {"1": 0.5}}
    kws.pop("task")
    with pytest.raises(ValueError, match="different tasks"):
        comparison_table({"asr": summary, "kws": kws})


def test_cost_lines_are_measured_at_the_clients_sentence_lengths(asr_run):
    """Self-attention makes cost superlinear in length: lines fitted at the 16 s cap would
    mispredict 2-4 s sentences, so each client measures at its own shortest and longest."""
    settings, records = asr_run
    assert settings.asr_max_seconds == 16.0
    for client in range(3):
        dataset = task.task_dataset(settings, settings.manifest, settings.partition, client)
        durations = [u.duration for u in dataset.utterances]
        assert task.cost_lengths(settings, dataset) == (min(min(durations), max(durations) / 2), max(durations))
        work = task.client_workload(settings, client, settings.manifest, settings.partition)
        costs = task.client_costs(settings, client, settings.manifest, settings.partition)
        step_flops = [costs[d].at(s, work.batch).train_flops for d in EXITS for s in (min(durations), work.seconds)]
        assert all(f > 0 for f in step_flops) and step_flops == sorted(step_flops)  # deeper and longer cost more
    assert all(c["train_flops"] > 0 and c["device_seconds"] > 0 for c in records[0]["clients"])


def test_asr_settings(small_corpus, partition, tmp_path):
    settings = make_settings(small_corpus, partition, tmp_path, letters="zyx abc")
    assert EarlyExitSettings.from_run_config(settings.to_run_config()) == settings
    assert settings.train_seconds == 16.0 and settings.letter_set == "abcxyz"
    assert task.run_vocab(settings).tokens[3:] == list("abcxyz")
    assert EarlyExitSettings().task == "kws" and EarlyExitSettings().train_seconds == 1.0
    for bad, match in [
        ({"task": "nlu"}, "task"),
        ({"letters": "ab1"}, "letters"),
        ({"asr_max_seconds": 0.0}, "asr_max_seconds"),
    ]:
        with pytest.raises(ValueError, match=match):
            EarlyExitSettings(**bad)
    # sentences longer than asr_max_seconds are dropped, not cropped; none left is a clear error
    durations = sorted(
        u.duration for u in asr_utterances(client_utterances(Partition.load(partition), read_manifest(small_corpus), 0))
    )
    limit = (durations[0] + durations[-1]) / 2
    short = make_settings(small_corpus, partition, tmp_path, asr_max_seconds=limit)
    kept = task.task_dataset(short, short.manifest, short.partition, 0)
    assert 0 < len(kept) == sum(d <= limit for d in durations) < len(durations)
    assert max(len(wave) for wave, _ in kept) > 16_000  # whole sentences
    assert task.client_workload(short, 0, short.manifest, short.partition).seconds == max(
        d for d in durations if d <= limit
    )
    with pytest.raises(ValueError, match="asr-max-seconds"):
        task.client_workload(
            make_settings(small_corpus, partition, tmp_path, asr_max_seconds=0.5), 0, str(small_corpus), str(partition)
        )
