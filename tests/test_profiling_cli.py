"""``fedspeech profile`` / ``fedspeech feasibility`` end to end on the tiny model."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fedspeech.profiling import cli


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_profiling_measure.py
    yield
    torch.set_num_threads(threads)


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_profile_writes_json_and_plots(tmp_path, capsys):
    out, plots = tmp_path / "tiny.json", tmp_path / "plots"
    code = run(
        "profile",
        "--model",
        "tiny",
        "--seconds",
        "1",
        "--batch",
        "1",
        "--repeats",
        "0",
        "--sweep-seconds",
        "0.5,1",
        "--json",
        str(out),
        "--plots",
        str(plots),
    )
    assert code == 0
    report = json.loads(out.read_text())
    assert {"modules", "layers", "train_step", "sweep"} <= set(report)
    assert [row["audio_seconds"] for row in report["sweep"]] == [0.5, 1.0]
    assert report["sweep"][1]["train_gflops"] > report["sweep"][0]["train_gflops"]
    assert {p.name for p in plots.iterdir()} == {"tiny_layers.png", "tiny_sweep.png"}
    assert "cnn_encoder" in capsys.readouterr().out


def test_feasibility_measures_predicts_and_reuses_the_workload(tmp_path):
    catalogue = tmp_path / "devices.json"
    catalogue.write_text(
        json.dumps(
            {
                "devices": [
                    {
                        "id": "roomy",
                        "name": "Roomy",
                        "class": "test",
                        "memory_gib": 64,
                        "headroom": 0.1,
                        "throughput_gflops": 10.0,
                    },
                    {
                        "id": "cramped",
                        "name": "Cramped",
                        "class": "test",
                        "memory_gib": 0.01,
                        "headroom": 0.1,
                        "throughput_gflops": 10.0,
                    },
                ]
            }
        )
    )
    first = tmp_path / "plan.json"
    assert (
        run(
            "feasibility",
            "--model",
            "tiny",
            "--seconds",
            "1",
            "--batch",
            "2",
            "--catalogue",
            str(catalogue),
            "--device",
            "roomy",
            "cramped",
            "--utterances-per-client",
            "10",
            "--clients",
            "2",
            "--rounds",
            "3",
            "--json",
            str(first),
        )
        == 0
    )
    result = json.loads(first.read_text())
    rows = {row["device"]: row for row in result["devices"]}
    assert rows["roomy"]["fits"] and not rows["cramped"]["fits"]
    assert rows["cramped"]["seconds_per_batch"] is None
    assert rows["roomy"]["seconds_per_batch"] == pytest.approx(result["workload"]["train_gflops_per_batch"] / 10.0)
    # 3 rounds * ceil(10 / 2) batches
    assert rows["roomy"]["fl"]["total_seconds"] == pytest.approx(3 * 5 * rows["roomy"]["seconds_per_batch"])
    measured = result["workload"]["measured"]  # (batch 1, S/2), (batch 2, S/2), (batch 1, S)
    assert [(p["batch"], p["seconds"]) for p in measured] == [(1, 0.5), (2, 0.5), (1, 1.0)]
    assert (
        measured[1]["peak_bytes"] > measured[0]["peak_bytes"] and measured[2]["peak_bytes"] > measured[0]["peak_bytes"]
    )

    second = tmp_path / "plan4.json"
    assert (
        run(
            "feasibility",
            "--model",
            "tiny",
            "--seconds",
            "1",
            "--batch",
            "4",
            "--catalogue",
            str(catalogue),
            "--device",
            "roomy",
            "--workload",
            str(first),
            "--json",
            str(second),
        )
        == 0
    )
    bigger = json.loads(second.read_text())["devices"][0]
    assert bigger["seconds_per_batch"] == pytest.approx(2 * rows["roomy"]["seconds_per_batch"])
    assert bigger["peak_bytes"] > rows["roomy"]["peak_bytes"]
    assert bigger["max_seconds_that_fit"] < rows["roomy"]["max_seconds_that_fit"]

    with pytest.raises(ValueError, match="measured at 1 s, not 2 s"):
        run("feasibility", "--model", "tiny", "--seconds", "2", "--catalogue", str(catalogue), "--workload", str(first))


def test_calibrate_local_writes_a_usable_catalogue_entry(tmp_path):
    catalogue, plan_file = tmp_path / "mine.json", tmp_path / "plan.json"
    stored = tmp_path / "stored.json"
    stored.write_text(
        json.dumps(
            {
                "workloads": {
                    "fp32": {
                        "model": "tiny",
                        "seconds": 1.0,
                        "batch": 1,
                        "precision": "fp32",
                        "savers": [],
                        "train_flops_per_utterance": 1e9,
                        "fixed_bytes": 1e7,
                        "utterance_bytes_intercept": 1e6,
                        "utterance_bytes_per_second": 1e7,
                    }
                }
            }
        )
    )
    assert (
        run(
            "feasibility",
            "--calibrate-local",
            "--calibrate-to",
            str(catalogue),
            "--calibration-seconds",
            "0.5",
            "--calibration-repeats",
            "1",
            "--model",
            "tiny",
            "--seconds",
            "1",
            "--workload",
            str(stored),
            "--device",
            "local-cpu",
            "--json",
            str(plan_file),
        )
        == 0
    )
    entry = json.loads(catalogue.read_text())["devices"][0]
    assert entry["id"] == "local-cpu" and entry["calibration"]["train_gflops"] > 0
    assert entry["mixed_precision"] == ["bf16"] and entry["mixed_precision_speedup"] > 0
    row = json.loads(plan_file.read_text())["devices"][0]
    throughput = entry["calibration"]["train_gflops"] / entry["calibration"]["seconds_per_batch"]
    assert row["seconds_per_batch"] == pytest.approx(1.0 / throughput)


def test_feasibility_with_auto_savers_names_the_devices_they_make_feasible(tmp_path, capsys):
    def catalogue_with(memory_gib: float):
        path = tmp_path / f"devices_{memory_gib:.4f}.json"
        device = {"id": "edge", "name": "Edge", "class": "test", "headroom": 0.0, "throughput_gflops": 10.0}
        path.write_text(json.dumps({"devices": [{**device, "memory_gib": memory_gib}]}))
        return str(path)

    first = tmp_path / "auto.json"
    common = (
        "feasibility",
        "--model",
        "tiny",
        "--seconds",
        "1",
        "--batch",
        "4",
        "--savers",
        "auto",
        "--device",
        "edge",
    )
    assert run(*common, "--catalogue", catalogue_with(64), "--json", str(first)) == 0
    measured = json.loads(first.read_text())
    ladder = measured["savers_auto"]["ladder"]
    assert ladder[-1] == [
        "recompute-cnn",
        "ckpt-transformer",
        "ckpt-contrastive",
        "fused-quantizer",
        "step-in-backward",
    ]
    plain_peak = measured["devices"][0]["peak_bytes"]
    rung_peaks = [rung["fp32"]["peak_bytes"] for rung in measured["savers_auto"]["ladder_workloads"]]
    assert rung_peaks[-1] < plain_peak  # the savers really lower the predicted peak
    assert measured["devices"][0]["savers_applied"] == []  # roomy: no saver needed
    between = (plain_peak + rung_peaks[-1]) / 2 / 2**30

    second = tmp_path / "auto_reused.json"
    capsys.readouterr()
    argv = (*common, "--catalogue", catalogue_with(between), "--workload", str(first), "--json", str(second))
    assert run(*argv) == 0
    entry = json.loads(second.read_text())["devices"][0]
    assert entry["fits"] and entry["savers_applied"]
    assert entry["peak_bytes"] <= between * 2**30 < plain_peak
    assert "Feasible only thanks to savers: edge (" in capsys.readouterr().out
    with pytest.raises(ValueError, match="cannot be combined"):
        run("feasibility", "--model", "tiny", "--savers", "auto", "freeze-cnn")
