"""Device model, catalogue, FL wall-clock and trend arithmetic on synthetic data (no torch runs)."""

from __future__ import annotations

import json
import math

import pytest

from fedspeech.profiling.catalogue import GIB, device_from_entry, load_catalogue, select_devices, write_user_entry
from fedspeech.profiling.feasibility import parse_fleet, plan
from fedspeech.profiling.planner import (
    FLSchedule,
    Workload,
    expected_slowest,
    first_year_reaching,
    fl_wallclock,
    predict,
)


def workload(precision: str = "fp32", batch: int = 2, per_utterance_gflops: float = 25.0) -> Workload:
    # peak = 1 GiB + batch * (0.1 GiB + 0.2 GiB/s * 5 s) = 3.2 GiB at batch 2
    return Workload(
        model="synthetic",
        seconds=5.0,
        batch=batch,
        precision=precision,
        savers=(),
        train_flops_per_utterance=per_utterance_gflops * 1e9,
        fixed_bytes=1.0 * GIB,
        utterance_bytes_intercept=0.1 * GIB,
        utterance_bytes_per_second=0.2 * GIB,
        model_bytes=0.25 * GIB,
    )


def device(memory_gib=4.0, headroom=0.1, throughput_calibration=(100.0, 2.0), **extra):
    entry = {
        "id": extra.pop("id", "dev"),
        "name": "Dev",
        "class": extra.pop("cls", "test"),
        "memory_gib": memory_gib,
        "headroom": headroom,
    }
    if throughput_calibration:
        gflops, seconds = throughput_calibration
        entry["calibration"] = {
            "model": "base",
            "seconds": 5.5,
            "batch": 1,
            "precision": "fp32",
            "seconds_per_batch": seconds,
            "train_gflops": gflops,
        }
    entry.update(extra)
    return device_from_entry(entry, "test")


def test_fits_and_time_from_flops_and_calibrated_throughput():
    p = predict(device(), workload())
    assert p.peak_bytes == pytest.approx(3.2 * GIB)
    assert p.fits  # usable 3.6 GiB
    # throughput 100 GFLOPs / 2 s = 50 GFLOP/s; batch 2 * 25 GFLOPs = 50 GFLOPs -> 1 s
    assert p.seconds_per_batch == pytest.approx(1.0)
    # batch size enters through the measured FLOPs, not a lookup table
    assert predict(device(), workload(batch=1)).seconds_per_batch == pytest.approx(0.5)


def test_out_of_memory_when_memory_too_small():
    p = predict(device(headroom=0.25), workload())  # usable 3.0 GiB < 3.2 GiB
    assert not p.fits
    assert p.seconds_per_batch is None
    assert p.compute_seconds_per_batch == pytest.approx(1.0)
    assert any("out of memory" in reason for reason in p.reasons)
    # max length that fits: (3.0 - 1.0 - 2 * 0.1) / (2 * 0.2) = 4.5 s
    assert p.max_seconds_that_fit == pytest.approx(4.5)


def test_max_seconds_grows_with_memory_and_is_zero_when_nothing_fits():
    lengths = [
        predict(device(memory_gib=m, headroom=0.0), workload()).max_seconds_that_fit for m in (1.0, 1.5, 2.0, 4.0, 8.0)
    ]
    assert lengths[0] == 0.0
    assert all(a < b for a, b in zip(lengths, lengths[1:]))
    w = workload()
    for length, memory in zip(lengths[1:], (1.5, 2.0, 4.0, 8.0)):  # the solution sits on the memory limit
        assert w.peak_bytes(seconds=length) == pytest.approx(memory * GIB)


def test_mixed_precision_speedup_only_where_supported():
    fast = device(mixed_precision=["bf16"], mixed_precision_speedup=2.0)
    assert predict(fast, workload("bf16")).seconds_per_batch == pytest.approx(0.5)
    plain = device()
    with pytest.raises(ValueError):
        predict(plain, workload("bf16"))
    fallback = predict(plain, workload("bf16"), fp32_workload=workload("fp32", per_utterance_gflops=25.0))
    assert fallback.precision_used == "fp32" and fallback.seconds_per_batch == pytest.approx(1.0)
    assert any("planned as fp32" in reason for reason in fallback.reasons)


def test_memory_only_device_has_no_time():
    p = predict(device(throughput_calibration=None), workload())
    assert p.fits and p.seconds_per_batch is None and p.compute_seconds_per_batch is None
    assert any("memory-only" in reason for reason in p.reasons)


def test_fl_wallclock_arithmetic():
    schedule = FLSchedule(clients=10, utterances_per_client=10, rounds=3, local_epochs=2)
    result = fl_wallclock([1.0] * 10, batch=4, schedule=schedule)
    # 2 epochs * ceil(10 / 4) = 3 batches * 1 s = 6 s per round, 3 rounds
    assert result["round_seconds"] == pytest.approx(6.0)
    assert result["total_seconds"] == pytest.approx(18.0)
    # the round waits for the slowest client
    assert fl_wallclock([1.0, 2.0, 3.0], 4, FLSchedule(3, 10, 1, 2))["round_seconds"] == pytest.approx(18.0)
    # communication: 2 * 100 MB * 8 bit / 8 Mbit/s = 200 s per round
    with_network = fl_wallclock([1.0], 4, FLSchedule(1, 4, 1, 1, bandwidth_mbps=8.0), model_bytes=100e6)
    assert with_network["communication_seconds_per_round"] == pytest.approx(200.0)
    assert with_network["round_seconds"] == pytest.approx(201.0)


def test_expected_slowest_of_sampled_clients():
    assert expected_slowest([1.0, 2.0, 3.0], 3) == pytest.approx(3.0)
    assert expected_slowest([3.0, 1.0, 2.0], 1) == pytest.approx(2.0)  # mean
    assert expected_slowest([1.0, 2.0, 3.0], 2) == pytest.approx((2 + 3 + 3) / 3)
    with pytest.raises(ValueError):
        expected_slowest([1.0], 2)


def test_trend_year_arithmetic():
    assert first_year_reaching(8.0, 1.0, 18) == 2027  # 3 doublings * 1.5 years = 4.5 -> 2027
    assert first_year_reaching(2.0, 1.0, 12) == 2023  # exactly one doubling
    assert first_year_reaching(1.0, 1.0, 18) == 2022
    assert first_year_reaching(0.5, 1.0, 18) == 2022
    assert first_year_reaching(3.0, 1.0, 18) == 2022 + math.ceil(math.log2(3) * 1.5)


def test_packaged_catalogue_is_seeded_from_devices_md():
    catalogue = load_catalogue(include_user=False)
    published = {
        "a40": (48, 0.12),
        "macbook-pro-2019": (16, 3.76),
        "raspberry-pi-4": (8, 16.60),
        "jetson-xavier-agx": (16, 0.38),
        "jetson-xavier-nx": (8, 0.67),
    }
    for key, (memory, seconds) in published.items():
        d = catalogue[key]
        assert d.memory_bytes == memory * GIB
        assert d.calibration["seconds_per_batch"] == seconds and d.calibration["model"] == "base"
        assert d.throughput_flops == pytest.approx(d.calibration["train_gflops"] * 1e9 / seconds)
    for phone in ("snapdragon-870", "google-tensor", "apple-a15"):
        assert catalogue[phone].memory_only and catalogue[phone].headroom > 0
    assert catalogue["local-cpu"].memory_bytes > 0  # "auto": this machine
    # published ordering survives calibration: the A40 is the fastest, the Pi the slowest
    speeds = {k: catalogue[k].throughput_flops for k in published}
    assert max(speeds, key=speeds.get) == "a40" and min(speeds, key=speeds.get) == "raspberry-pi-4"


def test_user_catalogue_overrides_and_validates(tmp_path):
    user = tmp_path / "devices.json"
    user.write_text(json.dumps({"devices": [{"id": "a40", "headroom": 0.5}]}))
    merged = load_catalogue([user], include_user=False)
    assert merged["a40"].headroom == 0.5 and merged["a40"].memory_bytes == 48 * GIB
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"devices": [{"id": "x", "name": "X", "class": "c", "headroom": 1.5}]}))
    with pytest.raises(ValueError, match="bad.json.*headroom"):
        load_catalogue([bad], include_user=False)
    with pytest.raises(ValueError, match="unknown device"):
        select_devices(merged, ["no-such-device"])
    write_user_entry(
        user, {"id": "mine", "name": "Mine", "class": "c", "memory_gib": 2, "headroom": 0.1, "throughput_gflops": 5.0}
    )
    again = load_catalogue([user], include_user=False)
    assert again["mine"].throughput_flops == 5e9 and again["a40"].headroom == 0.5


def test_plan_reports_required_keys_fleet_and_trend():
    catalogue = {
        "big": device(memory_gib=16, id="big", cls="gpu", throughput_calibration=(100.0, 0.5)),
        "small": device(memory_gib=2, id="small", cls="board"),
        "slow": device(memory_gib=16, id="slow", cls="board", throughput_calibration=(100.0, 8.0)),
        "phone": device(memory_gib=8, id="phone", cls="phone", throughput_calibration=None),
    }
    schedule = FLSchedule(clients=4, utterances_per_client=8, rounds=10)
    result = plan(
        list(catalogue.values()),
        {"fp32": workload()},
        "fp32",
        catalogue,
        schedule,
        fleet="big:1,small:2,slow:1",
        trend_months=18,
        trend_target="big",
    )
    rows = {row["device"]: row for row in result["devices"]}
    for row in rows.values():
        assert set(row) >= {"device", "fits", "seconds_per_batch", "max_seconds_that_fit", "peak_bytes"}
    assert rows["big"]["fits"] and not rows["small"]["fits"] and rows["phone"]["seconds_per_batch"] is None
    # big: 50 GFLOPs at 200 GFLOP/s = 0.25 s/batch, 4 batches per round, 10 rounds
    assert rows["big"]["fl"]["total_seconds"] == pytest.approx(10.0)
    assert rows["small"]["fl"] is None
    # all 4 fleet clients train each round (default: all sampled); the two "small" ones cannot
    # and drop out, so the round waits for "slow": 4 batches * 4 s
    assert result["fleet"]["unable_to_train"] == {"small": 2}
    assert result["fleet"]["wallclock"]["round_seconds"] == pytest.approx(4 * 4.0)
    sampled_one = plan(
        list(catalogue.values()),
        {"fp32": workload()},
        "fp32",
        catalogue,
        FLSchedule(clients=4, utterances_per_client=8, rounds=10, clients_per_round=1),
        fleet="big:1,small:2,slow:1",
    )
    # one client per round: big (1 s), small (drops out, 0 s) twice, slow (16 s) -> mean
    assert sampled_one["fleet"]["wallclock"]["round_seconds"] == pytest.approx((1.0 + 0 + 0 + 16.0) / 4)
    # slow is 16x slower than the target: 4 doublings * 1.5 years = 6 -> 2028
    assert rows["slow"]["trend"]["first_year_reaching_target"] == 2028
    # the class year is its fastest member's: small is 4x slower (2 doublings, 3 years)
    assert result["trend"]["first_year_by_class"] == {"gpu": 2022, "board": 2025}
    assert "doubles every 18 months" in result["trend"]["assumption"]
    with pytest.raises(ValueError):
        parse_fleet("big:0", catalogue)


def test_optimizer_step_peak_is_a_floor_independent_of_length():
    from dataclasses import replace

    w = replace(workload(), optimizer_peak_bytes=3.5 * GIB)
    assert w.peak_bytes(seconds=0.5) == pytest.approx(3.5 * GIB)  # AdamW temporaries dominate short inputs
    assert w.peak_bytes(seconds=10.0) == pytest.approx((1.0 + 2 * (0.1 + 2.0)) * GIB)
    assert w.max_seconds(3.6 * GIB) == pytest.approx(6.0)  # the activation line decides
    assert w.max_seconds(3.4 * GIB) == 0.0  # the optimizer step alone does not fit
    p = predict(device(memory_gib=3.4, headroom=0.0), w)
    assert not p.fits and p.max_seconds_that_fit == 0.0


def test_memory_model_is_fitted_from_three_runs():
    from fedspeech.profiling.measure import LayerFigures, StepMeasurement
    from fedspeech.profiling.savers import Savers
    from fedspeech.profiling.workload import workload_from_measurements

    def run(batch: int, seconds: float, forward: int, forward_backward: int) -> StepMeasurement:
        other = LayerFigures("other", "-", "other", 0)
        phases = {
            "forward": forward,
            "backward": forward_backward,
            "forward_backward": forward_backward,
            "optimizer": 90,
        }
        return StepMeasurement(
            model="m",
            seconds=seconds,
            batch=batch,
            precision="fp32",
            savers=[],
            device_type="cpu",
            step_seconds=[],
            step_cpu_seconds=[],
            forward_flops=10 * batch,
            train_flops=30 * batch,
            activation_bytes=0,
            peak_bytes=forward_backward,
            peak_breakdown={},
            peak_by_phase=phases,
            static_bytes={"params": 40, "grads": 40, "optimizer_state": 80},
            layers=[],
            other=other,
        )

    # activation regime: forward + backward peak = 100 + B * (10 + 5 S), forward peak 5 lower
    w = workload_from_measurements(
        run(1, 2.0, 115, 120), run(1, 1.0, 110, 115), run(2, 1.0, 125, 130), batch=4, savers=Savers()
    )
    assert (w.fixed_bytes, w.utterance_bytes_intercept, w.utterance_bytes_per_second) == pytest.approx((100, 10, 5))
    assert w.backward_extra_bytes == pytest.approx(5)
    assert w.peak_bytes() == pytest.approx(100 + 4 * (10 + 5 * 2))
    assert w.optimizer_peak_bytes == 90 and w.train_flops() == 4 * 30
    assert w.max_seconds(200) == pytest.approx((200 - 100 - 4 * 10) / (4 * 5))

    # gradient plateau: the backward peak (all gradients alive) is flat at the measured points,
    # but the activations behind the forward peak still grow with batch and length
    w = workload_from_measurements(
        run(1, 2.0, 120, 200), run(1, 1.0, 115, 200), run(2, 1.0, 130, 200), batch=4, savers=Savers()
    )
    assert w.utterance_bytes_per_second == pytest.approx(0) and w.backward_extra_bytes == pytest.approx(70)
    assert w.peak_bytes(seconds=2.0, batch=1) == pytest.approx(200)  # plateau
    assert w.peak_bytes(seconds=2.0, batch=4) == pytest.approx(100 + 4 * 20 + 70)  # activations take over
    assert w.max_seconds(300, batch=4) == pytest.approx((300 - 170 - 4 * 10) / (4 * 5))  # finite despite the flat term


def test_auto_savers_apply_the_cheapest_rung_that_fits_and_say_so():
    from dataclasses import replace

    from fedspeech.profiling.feasibility import render_plan

    plain = workload()  # 3.2 GiB at batch 2
    # rungs: less memory, more FLOPs (recomputation), as measured savers behave
    light = replace(plain, savers=("step-in-backward",), fixed_bytes=0.8 * GIB)  # 3.0 GiB
    strong = replace(
        plain,
        savers=("recompute-cnn", "step-in-backward"),
        utterance_bytes_per_second=0.05 * GIB,
        train_flops_per_utterance=30e9,
    )  # 1.0 + 2 * (0.1 + 0.05 * 5) = 1.7 GiB
    catalogue = {
        "roomy": device(memory_gib=8, id="roomy"),
        "mid": device(memory_gib=3.1, headroom=0.0, id="mid"),
        "small": device(memory_gib=2.0, headroom=0.0, id="small"),
        "tiny": device(memory_gib=1.0, headroom=0.0, id="tiny"),
    }
    ladder = [{"fp32": light}, {"fp32": strong}]
    schedule = FLSchedule(clients=3, utterances_per_client=8, rounds=10)
    result = plan(
        list(catalogue.values()),
        {"fp32": plain},
        "fp32",
        catalogue,
        schedule,
        fleet="tiny:1,small:1",
        saver_ladder=ladder,
    )
    rows = {row["device"]: row for row in result["devices"]}
    assert rows["roomy"]["fits"] and rows["roomy"]["savers_applied"] == []
    assert rows["mid"]["fits"] and rows["mid"]["savers_applied"] == ["step-in-backward"]
    assert rows["small"]["fits"] and rows["small"]["savers_applied"] == ["recompute-cnn", "step-in-backward"]
    # the stronger rung recomputes: its time is its own FLOPs, 60 GFLOPs at 50 GFLOP/s
    assert rows["small"]["seconds_per_batch"] == pytest.approx(60 / 50)
    assert rows["small"]["fl"] is not None
    assert not rows["tiny"]["fits"] and rows["tiny"]["savers_applied"] == []
    assert "does not fit even with savers" in "; ".join(rows["tiny"]["reasons"])
    assert result["savers_auto"]["feasible_only_with_savers"] == {
        "mid": ["step-in-backward"],
        "small": ["recompute-cnn", "step-in-backward"],
    }
    assert result["fleet"]["unable_to_train"] == {"tiny": 1}  # small trains thanks to savers
    text = render_plan(result)
    assert "Feasible only thanks to savers: mid (step-in-backward), small (recompute-cnn step-in-backward)" in text
    without = plan(list(catalogue.values()), {"fp32": plain}, "fp32", catalogue)
    assert [r["device"] for r in without["devices"] if r["fits"]] == ["roomy"] and "savers_auto" not in without
