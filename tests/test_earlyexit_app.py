"""Federated early-exit fine-tuning (METHODS §3) end to end with the in-process runner,
and its planning pieces on their own."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fedspeech.apps.earlyexit import task
from fedspeech.apps.earlyexit.plan import (
    ClientPlan,
    inclusive_deadline,
    parse_fleet,
    training_depths,
    with_deadline,
)
from fedspeech.apps.earlyexit.run import run_early_exit, write_flower_app
from fedspeech.apps.earlyexit.settings import EarlyExitSettings
from fedspeech.federated.checkpoints import round_dir

DEADLINE = 1.0
NUM_LAYERS = 6  # exits at 2, 4, 6


@pytest.fixture(scope="module")
def partition(speaker_partition) -> Path:
    return speaker_partition(3)


def make_settings(small_corpus: Path, partition: Path, out: Path, **kw) -> EarlyExitSettings:
    base = dict(
        manifest=str(small_corpus),
        partition=str(partition),
        out_dir=str(out),
        model="tiny",
        num_layers=NUM_LAYERS,
        exit_every=2,
        rounds=1,
        batch_size=4,
        max_seconds=1.0,
        eval_splits="dev,test",
        deadline=DEADLINE,
    )
    return EarlyExitSettings(**{**base, **kw})


def fleet_file(settings: EarlyExitSettings, target_depths: list[int], folder: Path) -> Path:
    """One made-up device per client, fast enough for exactly its target depth within the deadline.

    Times come from the same measured cost lines and workloads the clients plan with.
    """
    costs = task.depth_costs(settings)
    depths = sorted(costs)
    devices = {}
    for client, target in enumerate(target_depths):
        work = task.client_workload(settings, client, settings.manifest, settings.partition)

        def round_flops(depth: int, work=work) -> float:
            return work.steps * costs[depth].at(work.seconds, work.batch).train_flops

        deeper = [d for d in depths if d > target]
        # midway (in FLOPs) between the target depth and the next one takes exactly the deadline
        budget = (round_flops(target) + round_flops(deeper[0])) / 2 if deeper else 10 * round_flops(target)
        devices[f"dev{client}"] = {"memory_gb": 8, "headroom": 0.25, "throughput_flops": budget / DEADLINE}
    path = folder / "fleet.json"
    path.write_text(json.dumps({"clients": list(devices), "devices": devices}))
    return path


@pytest.fixture(scope="module")
def adaptive_run(small_corpus, partition, tmp_path_factory):
    """Two adaptive rounds: client 0 affords depth 2, clients 1 and 2 depth 4, nobody 6."""
    folder = tmp_path_factory.mktemp("ee-adaptive")
    settings = make_settings(small_corpus, partition, folder / "run", rounds=2)
    settings.fleet = str(fleet_file(settings, [2, 4, 4], folder))
    return settings, run_early_exit(settings)


@pytest.fixture(scope="module")
def mixed_fleet(small_corpus, partition, tmp_path_factory) -> tuple[Path, Path]:
    """A fleet with depths 2, 4 and full (6), for the baselines."""
    folder = tmp_path_factory.mktemp("ee-fleet")
    settings = make_settings(small_corpus, partition, folder)
    return fleet_file(settings, [2, 4, 6], folder), folder


def test_adaptive_plans_train_and_upload_by_depth(adaptive_run):
    settings, records = adaptive_run
    plan = json.loads((Path(settings.out_dir) / "plan.json").read_text())
    assert [c["training_depth"] for c in plan["clients"]] == [2, 4, 4]
    assert plan["clients"][0]["candidates"][1]["fits_deadline"] is False  # depth 4 too slow for dev0
    model = task.build_model(settings)
    assert [r["round"] for r in records] == [1, 2]
    for record in records:
        clients = {c["client"]: c for c in record["clients"]}
        assert {k: c["depth"] for k, c in clients.items()} == {0: 2, 1: 4, 2: 4}
        # a client sends exactly what it trained, so shallower clients send fewer arrays and bytes
        assert clients[0]["arrays_sent"] == len(model.trainable_keys(2))
        assert clients[1]["arrays_sent"] == len(model.trainable_keys(4)) > clients[0]["arrays_sent"]
        assert clients[0]["bytes_sent"] < clients[1]["bytes_sent"]
        assert record["upload_bytes"] == sum(c["bytes_sent"] for c in clients.values())
        assert record["layers_not_trained"] == [5, 6]
        # accuracy at every exit on the held-out speakers, and the confidence policy
        assert set(record["accuracy"]) == {"2", "4", "6"}
        assert all(0.0 <= a <= 1.0 for a in record["accuracy"].values())
        assert record["eval_utterances"] == 24  # dev + test speaker, 12 keywords each
        assert 2 <= record["confidence_exit"]["mean_exit_layer"] <= 6
        # simulated wall-clock: the slowest client's FLOPs over its device's throughput
        for k, c in clients.items():
            throughput = parse_fleet(settings.fleet).devices[f"dev{k}"].throughput_flops
            assert c["device_seconds"] == pytest.approx(c["train_flops"] / throughput)
            assert c["device_seconds"] <= DEADLINE * 1.5  # batches are padded to their own longest crop
        assert record["simulated_round_seconds"] == max(c["device_seconds"] for c in clients.values())
        assert sum(record["client_flops_by_device"].values()) == pytest.approx(record["client_flops"])
    assert records[1]["cumulative_client_flops"] == pytest.approx(sum(r["client_flops"] for r in records))


def test_clients_pay_for_their_cnn_features_once(adaptive_run):
    """With the frozen CNN's features cached, a client's first round includes computing them
    (counted in its FLOPs); its second round trains from the cache."""
    _, records = adaptive_run
    first, second = ({c["client"]: c for c in r["clients"]} for r in records[:2])
    assert first.keys() == second.keys() == {0, 1, 2}
    for k in first:
        assert 0 < first[k]["cnn_cache_flops"] < first[k]["train_flops"]
        assert second[k]["cnn_cache_flops"] == 0 < second[k]["train_flops"]


def test_layers_nobody_trained_keep_their_global_value(adaptive_run):
    settings, _ = adaptive_run
    initial = task.build_model(settings)
    folder = round_dir(Path(settings.out_dir), 2)
    backbone = load_file(str(folder / "model.safetensors"))
    start = initial.backbone.state_dict()
    for key in ("encoder.layers.4.attention.k_proj.weight", "encoder.layers.5.feed_forward.output_dense.bias"):
        assert torch.equal(backbone[key], start[key])
    assert not torch.equal(
        backbone["encoder.layers.0.attention.k_proj.weight"], start["encoder.layers.0.attention.k_proj.weight"]
    )
    trained = task.load_early_exit(folder)
    assert torch.equal(trained.state_dict()["heads.6.proj.weight"], initial.state_dict()["heads.6.proj.weight"])
    assert not torch.equal(trained.state_dict()["heads.4.proj.weight"], initial.state_dict()["heads.4.proj.weight"])


def test_full_depth_baseline_costs_more_per_client(adaptive_run, tmp_path):
    settings, adaptive = adaptive_run
    full = run_early_exit(
        EarlyExitSettings(**{**vars(settings), "mode": "full", "out_dir": str(tmp_path / "full"), "rounds": 1})
    )
    clients = {c["client"]: c for c in full[0]["clients"]}
    assert {c["depth"] for c in clients.values()} == {NUM_LAYERS}
    assert len({c["arrays_sent"] for c in clients.values()}) == 1
    before = {c["client"]: c for c in adaptive[0]["clients"]}
    # same client, same batches: FLOPs and device time rise with depth, past the deadline
    for k in (0, 1):
        assert clients[k]["train_flops"] > before[k]["train_flops"]
        assert clients[k]["bytes_sent"] > before[k]["bytes_sent"]
    assert clients[0]["device_seconds"] > DEADLINE
    assert full[0]["simulated_round_seconds"] > adaptive[0]["simulated_round_seconds"]
    assert full[0]["layers_not_trained"] == []
    costs = task.depth_costs(settings)
    assert [costs[d].at(1.0, 4).train_flops for d in (2, 4, 6)] == sorted(
        costs[d].at(1.0, 4).train_flops for d in (2, 4, 6)
    )


@pytest.mark.parametrize("mode, sampled, depths", [("exclusion", [2], {6}), ("smallest", [0, 1, 2], {2})])
def test_exclusion_and_smallest_baselines(small_corpus, partition, mixed_fleet, tmp_path, mode, sampled, depths):
    fleet, _ = mixed_fleet
    settings = make_settings(small_corpus, partition, tmp_path / mode, mode=mode, fleet=str(fleet))
    (record,) = run_early_exit(settings)
    assert record["sampled"] == sampled
    assert {c["depth"] for c in record["clients"]} == depths
    assert record["layers_not_trained"] == list(range(max(depths) + 1, NUM_LAYERS + 1))


def test_auto_deadline_leaves_nobody_out(small_corpus, partition, mixed_fleet, tmp_path):
    fleet, _ = mixed_fleet
    settings = make_settings(small_corpus, partition, tmp_path / "auto", deadline=0.0, fleet=str(fleet))
    (record,) = run_early_exit(settings)
    plan = json.loads((tmp_path / "auto" / "plan.json").read_text())
    assert plan["auto_deadline"] and plan["deadline"] > 0
    assert record["sampled"] == [0, 1, 2] and record["deadline"] == plan["deadline"]
    # the slowest device just makes the shallowest exit; the others go deeper
    assert plan["clients"][0]["training_depth"] == 2
    assert plan["clients"][2]["training_depth"] == NUM_LAYERS


def test_mixed_precision_where_the_device_has_it(small_corpus, partition, tmp_path):
    fleet = tmp_path / "fleet.json"
    devices = {
        "gpu": {"memory_gb": 8, "throughput_flops": 1e12, "mixed_precision": True, "mixed_speedup": 2.0},
        "cpu": {"memory_gb": 8, "throughput_flops": 1e12},
    }
    fleet.write_text(json.dumps({"clients": ["gpu", "cpu", "gpu"], "devices": devices}))
    settings = make_settings(
        small_corpus, partition, tmp_path / "mixed", precision="mixed", fleet=str(fleet), deadline=100.0
    )
    (record,) = run_early_exit(settings)
    clients = {c["client"]: c for c in record["clients"]}
    assert [clients[k]["precision"] for k in (0, 1, 2)] == ["mixed", "fp32", "mixed"]
    assert clients[0]["device_seconds"] == pytest.approx(clients[0]["train_flops"] / 2e12)
    assert clients[1]["device_seconds"] == pytest.approx(clients[1]["train_flops"] / 1e12)
    assert all(c["depth"] == NUM_LAYERS and c["train_loss"] > 0 for c in clients.values())


def test_full_depth_trains_a_client_that_would_not_fit(small_corpus, partition, tmp_path):
    fleet = tmp_path / "fleet.json"
    devices = {
        "small": {"memory_gb": 0.005, "headroom": 0.0, "throughput_flops": 1e12},
        "big": {"memory_gb": 8, "throughput_flops": 1e12},
    }
    fleet.write_text(json.dumps({"clients": ["small", "big", "big"], "devices": devices}))
    settings = make_settings(small_corpus, partition, tmp_path / "oom", mode="full", fleet=str(fleet), deadline=100.0)
    (record,) = run_early_exit(settings)
    plan = json.loads((tmp_path / "oom" / "plan.json").read_text())["clients"][0]
    assert plan["depth"] == 0 and not plan["full_depth_fits_memory"] and plan["training_depth"] == NUM_LAYERS
    small = record["clients"][0]
    assert small["depth"] == NUM_LAYERS and small["fits_memory"] is False and small["train_flops"] > 0
    assert all(c["fits_memory"] for c in record["clients"][1:])


# ----------------------------------------------------------------------------- pieces


def _plan(client: int, times: list[float | None], fits: list[bool] | None = None, cap: int | None = None) -> ClientPlan:
    fits = fits or [True] * len(times)
    candidates = tuple(
        {"depth": 2 * (i + 1), "peak_bytes": 1.0, "seconds_per_round": t, "fits_memory": f, "fits_deadline": True}
        for i, (t, f) in enumerate(zip(times, fits))
    )
    return ClientPlan(
        client=client,
        device="d",
        depth=2 * len(times),
        precision="fp32",
        reason="",
        steps_per_round=1,
        seconds=1.0,
        full_depth_seconds=times[-1],
        full_depth_fits_memory=fits[-1],
        candidates=candidates,
        max_depth=cap,
    )


def test_auto_deadline_and_replanning():
    plans = [
        _plan(0, [4.0, 8.0, 12.0]),
        _plan(1, [1.0, 2.0, 3.0]),
        _plan(2, [0.5, 1.0, 9.0], cap=4),
        _plan(3, [100.0, 200.0, 300.0], fits=[False, False, False]),
    ]  # cannot hold any depth: ignored
    deadline = inclusive_deadline(plans)
    assert deadline == 4.0
    assert [with_deadline(p, deadline).depth for p in plans] == [2, 6, 4, 0]
    assert with_deadline(plans[0], 3.9).depth == 0
    with pytest.raises(ValueError, match="deadline"):
        inclusive_deadline([plans[3]])


def test_training_depths_by_mode():
    planned = {10: 2, 11: 4, 12: 6, 13: 0}
    assert training_depths("adaptive", planned, 6) == {10: 2, 11: 4, 12: 6}
    assert training_depths("full", planned, 6) == {10: 6, 11: 6, 12: 6, 13: 6}
    assert training_depths("exclusion", planned, 6) == {12: 6}
    assert training_depths("smallest", planned, 6) == {10: 2, 11: 2, 12: 2}
    with pytest.raises(ValueError, match="full depth|all 6 layers"):
        training_depths("exclusion", {1: 2, 2: 4}, 6)
    with pytest.raises(ValueError, match="shallowest"):
        training_depths("adaptive", {1: 0}, 6)


def test_fleet_specs(tmp_path):
    fleet = parse_fleet("raspberry-pi-4:0.4,jetson-xavier-nx:0.3,macbook-pro-2019:0.3")
    assigned = fleet.assign(10)
    assert sorted(assigned).count("raspberry-pi-4") == 4 and assigned.count("macbook-pro-2019") == 3
    assert parse_fleet("a40,raspberry-pi-4").assign(2) == ["a40", "raspberry-pi-4"]
    path = tmp_path / "f.json"
    path.write_text(json.dumps({"fractions": {"x": 1.0}, "devices": {"x": {"memory_gb": 4, "throughput_flops": 1e9}}}))
    assert parse_fleet(str(path)).devices["x"].throughput_flops == 1e9
    with pytest.raises(ValueError, match="sum to 1"):
        parse_fleet("a40:0.5,raspberry-pi-4:0.2")
    with pytest.raises(ValueError, match="device:fraction"):
        parse_fleet("a40:lots")
    from fedspeech.apps.earlyexit.plan import client_device
    from fedspeech.profiling.catalogue import load_catalogue

    rpi = client_device("raspberry-pi-4:1.0", 0, "", 0, 3)
    entry = load_catalogue()["raspberry-pi-4"]
    assert rpi.name == "raspberry-pi-4" and rpi.throughput_flops == entry.throughput_flops
    assert rpi.usable_bytes == pytest.approx(entry.usable_bytes, rel=1e-6)
    assert client_device("raspberry-pi-4:1.0", 0, "", 0, 3, override="Jetson Xavier NX").name == "jetson-xavier-nx"
    with pytest.raises(ValueError, match="unknown device"):
        client_device("toaster:1.0", 0, "", 0, 3)


def test_settings_round_trip_and_errors():
    settings = EarlyExitSettings(
        mode="smallest", deadline=3.5, distill_lambda=0.3, model_overrides='{"conv_dim": [32]}', num_layers=8
    )
    config = settings.to_run_config()
    assert config["deadline"] == 3.5 and config["model-overrides"] == '{"conv_dim": [32]}'
    assert EarlyExitSettings.from_run_config(config) == settings
    assert settings.config_overrides == {"conv_dim": [32], "num_hidden_layers": 8}
    assert settings.label_names[-1] == "_unknown_" and len(settings.label_names) == 11
    assert settings.lr_at_round(1) == pytest.approx(settings.lr)
    for bad, match in [
        ({"mode": "greedy"}, "mode"),
        ({"deadline": -1.0}, "deadline"),
        ({"model_overrides": "{not json"}, "model_overrides"),
        ({"eval_splits": " , "}, "eval_splits"),
        ({"confidence_threshold": 0.0}, "confidence_threshold"),
    ]:
        with pytest.raises(ValueError, match=match):
            EarlyExitSettings(**bad)


def test_cli_report_and_flower_app(adaptive_run, tmp_path, capsys):
    from fedspeech.apps.earlyexit import cli as earlyexit_cli
    from fedspeech.federated.engines import app_config

    settings, _ = adaptive_run
    parser = argparse.ArgumentParser()
    earlyexit_cli.register(parser.add_subparsers())
    args = parser.parse_args(
        [
            "early-exit",
            "--manifest",
            "m.tsv",
            "--partition",
            "p.json",
            "--out",
            "o",
            "--modes",
            "adaptive",
            "full",
            "--deadline",
            "2.5",
            "--num-layers",
            "8",
        ]
    )
    parsed = earlyexit_cli.settings_from_args(args)
    assert (parsed.deadline, parsed.num_layers, parsed.out_dir, args.modes) == (2.5, 8, "o", ["adaptive", "full"])
    assert parsed.freeze_feature_encoder
    args = parser.parse_args(["early-exit", "--no-freeze-feature-encoder", "--out", "o"])
    assert earlyexit_cli.settings_from_args(args).freeze_feature_encoder is False

    run_folder = tmp_path / "runs"
    (run_folder / "adaptive").mkdir(parents=True)
    (run_folder / "adaptive" / "rounds.jsonl").write_text((Path(settings.out_dir) / "rounds.jsonl").read_text())
    args = parser.parse_args(["early-exit-report", str(run_folder)])
    assert args.func(args) == 0
    table = capsys.readouterr().out
    assert "| | adaptive |" in table and "accuracy % at exit 6" in table
    assert (run_folder / "accuracy_vs_exit.png").stat().st_size > 0
    assert json.loads((run_folder / "summary.json").read_text())["adaptive"]["deepest_trained_exit"] == 4

    app_dir = write_flower_app(tmp_path / "app", settings)
    assert app_config(app_dir) == settings.to_run_config()
