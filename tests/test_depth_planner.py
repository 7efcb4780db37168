"""Depth planner: deepest depth within memory and deadline, measured costs, fleets."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from fedspeech.models.early_exit import EarlyExitModel, training_flops
from fedspeech.profiling.depth_planner import (
    DepthCost,
    DepthCostModel,
    Device,
    FleetConfig,
    measure_depth_costs,
    plan_depth,
)

GB = 1e9
# Step costs that grow with depth: 1/2/3 GB peak, 1/2/3 TFLOP per step.
COSTS = [DepthCost(d, train_flops=d / 2 * 1e12, peak_bytes=d / 2 * GB) for d in (2, 4, 6)]


def device(memory_gb=8.0, tflops=1.0, headroom=0.2, **kwargs) -> Device:
    return Device.from_dict(
        {"memory_bytes": memory_gb * GB, "throughput_flops": tflops * 1e12, "headroom": headroom, **kwargs}, "test"
    )


def test_picks_deepest_depth_that_fits_memory():
    plan = plan_depth(COSTS, device(memory_gb=3.0), deadline_seconds=1e6, steps_per_round=10)
    assert plan.depth == 4 and plan.feasible  # 3 GB * 0.8 = 2.4 GB usable; depth 6 needs 3
    assert plan.predicted_peak_bytes == 2 * GB
    assert plan.predicted_seconds_per_round == pytest.approx(20.0)
    assert "depth 6 needs 3.00 GB" in plan.reason
    assert [c.fits_memory for c in plan.candidates] == [True, True, False]
    no_headroom = plan_depth(COSTS, device(memory_gb=3.0, headroom=0.0), 1e6, 10)
    assert no_headroom.depth == 6


def test_respects_the_deadline():
    # 10 steps: 10/20/30 s per round at 1 TFLOP/s.
    plan = plan_depth(COSTS, device(memory_gb=64), deadline_seconds=15, steps_per_round=10)
    assert plan.depth == 2
    assert "depth 4 takes 20 s/round" in plan.reason
    faster = plan_depth(COSTS, device(memory_gb=64, tflops=2.0), 15, 10)
    assert faster.depth == 6


def test_nothing_fits():
    plan = plan_depth(COSTS, device(memory_gb=1.0), deadline_seconds=1e6, steps_per_round=1)
    assert plan.depth == 0 and not plan.feasible
    assert "nothing fits" in plan.reason and "depth 2 needs 1.00 GB" in plan.reason
    assert plan.predicted_peak_bytes == 1 * GB  # what the shallowest exit would need
    too_slow = plan_depth(COSTS, device(memory_gb=64), deadline_seconds=1, steps_per_round=10)
    assert too_slow.depth == 0 and "takes 10 s/round" in too_slow.reason


def test_mixed_precision_only_where_available():
    costs = [DepthCost(2, 1e12, GB)]
    without = plan_depth(costs, device(mixed_speedup=4.0), 1e6, 10, precision="mixed")
    assert without.precision == "fp32" and "no mixed precision" in without.reason
    assert without.predicted_seconds_per_round == pytest.approx(10.0)
    with_amp = device(mixed_precision=True, mixed_speedup=4.0)
    plan = plan_depth(costs, with_amp, 1e6, 10, precision="mixed")
    assert plan.precision == "mixed" and plan.predicted_seconds_per_round == pytest.approx(2.5)


def test_memory_only_device_and_duck_typed_device():
    class CatalogueEntry:  # what a profiling-catalogue Device looks like, attribute-wise
        name = "phone"
        memory_bytes = 2.6 * GB
        headroom = 0.2
        throughput_flops = None
        mixed_precision = ()
        mixed_precision_speedup = 1.0

    plan = plan_depth(COSTS, CatalogueEntry(), deadline_seconds=1, steps_per_round=100)
    assert plan.depth == 4  # 2 GB usable; time unknown so the deadline is not checked
    assert "deadline not checked" in plan.reason and "unknown s/round" in plan.reason


def test_cost_model_scales_linearly_in_seconds_and_batch():
    model = DepthCostModel(4, 1e9, 2e9, 1e6, 3e6, static_bytes=5e6)
    one = model.at(seconds=2.0, batch=1)
    assert one.train_flops == pytest.approx(5e9) and one.peak_bytes == pytest.approx(12e6)
    four = model.at(seconds=2.0, batch=4)
    assert four.train_flops == pytest.approx(20e9)
    assert four.peak_bytes == pytest.approx(5e6 + 4 * 7e6)  # static part is not per item
    plan = plan_depth([model], device(), 1e6, steps_per_round=3, batch=4, seconds=2.0)
    assert plan.predicted_seconds_per_round == pytest.approx(3 * 20e9 / 1e12)


def test_device_from_dict():
    d = Device.from_dict({"memory_gb": 8, "seconds_per_flop": 1e-10, "headroom": 0.3}, "rpi4")
    assert d.name == "rpi4" and d.memory_bytes == 8e9 and d.throughput_flops == pytest.approx(1e10)
    assert d.usable_bytes == pytest.approx(5.6e9)
    catalogue_style = {"memory_gib": 8, "mixed_precision": ["fp16"], "mixed_precision_speedup": 2}
    phone = Device.from_dict(catalogue_style, "phone")
    assert phone.memory_bytes == 8 * 2**30 and phone.throughput_flops is None
    assert phone.mixed_precision and phone.mixed_speedup == 2.0
    with pytest.raises(ValueError, match="rpi4.*unknown fields"):
        Device.from_dict({"memory_gb": 8, "throughput_flops": 1, "ram": 2}, "rpi4")
    with pytest.raises(ValueError, match="missing field"):
        Device.from_dict({"throughput_flops": 1e9}, "rpi4")
    with pytest.raises(ValueError, match="headroom"):
        Device("x", "x", memory_bytes=1e9, throughput_flops=1e9, headroom=1.0)


def tiny_model() -> EarlyExitModel:
    torch.manual_seed(0)
    config = Wav2Vec2Config(
        hidden_size=16,
        num_hidden_layers=4,
        num_attention_heads=2,
        intermediate_size=32,
        conv_dim=(8,) * 7,
        num_conv_pos_embeddings=8,
        num_conv_pos_embedding_groups=2,
        layerdrop=0.0,
    )
    return EarlyExitModel(Wav2Vec2Model(config), "classify", 3, every=2)


@pytest.fixture(scope="module")
def measured() -> tuple[EarlyExitModel, list[DepthCostModel]]:
    model = tiny_model()
    return model, measure_depth_costs(model, lengths=(0.25, 0.5))


def test_measured_costs_grow_with_depth_and_fit_a_line(measured):
    model, costs = measured
    assert [c.depth for c in costs] == [2, 4]
    shallow, deep = (c.at(seconds=0.5, batch=1) for c in costs)
    assert shallow.train_flops < deep.train_flops
    assert costs[0].static_bytes < costs[1].static_bytes
    assert costs[0].activation_bytes_per_second < costs[1].activation_bytes_per_second
    assert shallow.peak_bytes < deep.peak_bytes
    # The measured line agrees with the flop counter at the measured length ...
    assert deep.train_flops == pytest.approx(training_flops(model, 4, 0.5, 1), rel=1e-6)
    # ... and predicts another length and batch within a few percent.
    predicted = costs[1].at(seconds=0.375, batch=2).train_flops
    assert predicted == pytest.approx(training_flops(model, 4, 0.375, 2), rel=0.05)
    # Static bytes: held weights (all but layers 3-4 and head 4) + grads + 2 AdamW moments.
    state = model.state_dict()
    held = sum(state[k].numel() for k in model.held_keys(2)) * 4
    trained = sum(state[k].numel() for k in model.trainable_keys(2)) * 4
    assert costs[0].static_bytes == held + 3 * trained


def test_plan_from_model_builder_chooses_by_memory(measured):
    _, costs = measured
    shallow, deep = (c.at(seconds=0.5, batch=2) for c in costs)
    between = (shallow.peak_bytes + deep.peak_bytes) / 2
    budget = Device("small", "small", memory_bytes=between, throughput_flops=1e12, headroom=0.0)
    plan = plan_depth(tiny_model, budget, deadline_seconds=60, steps_per_round=1, batch=2, seconds=0.5)
    assert plan.depth == 2  # measured at (0.25 s, 0.5 s): the planned length itself
    assert plan.predicted_peak_bytes == pytest.approx(shallow.peak_bytes, rel=0.01)
    assert plan.candidates[1].peak_bytes == pytest.approx(deep.peak_bytes, rel=0.01)


def test_fleet_fractions_are_exact_and_deterministic():
    fleet = FleetConfig.from_dict({"seed": 3, "fractions": {"rpi4": 0.4, "jetson-nx": 0.3, "laptop": 0.3}})
    names = fleet.assign(10)
    assert sorted((n, names.count(n)) for n in set(names)) == [("jetson-nx", 3), ("laptop", 3), ("rpi4", 4)]
    assert fleet.assign(10) == names
    assert len(fleet.assign(7)) == 7 and fleet.assign(7).count("rpi4") == 3  # 2.8 -> 3
    other_seed = FleetConfig(fractions=fleet.fractions, seed=4).assign(10)
    assert other_seed != names and sorted(other_seed) == sorted(names)


def test_fleet_per_client_list_and_devices(tmp_path):
    spec = {
        "clients": ["rpi4", "laptop", "rpi4"],
        "devices": {
            "rpi4": {"memory_gb": 8, "throughput_flops": 2e10, "headroom": 0.3},
            "laptop": {"memory_gb": 16, "throughput_flops": 1e11},
        },
    }
    fleet = FleetConfig.from_dict(spec)
    assert fleet.assign(3) == ["rpi4", "laptop", "rpi4"]
    assert [d.memory_bytes for d in fleet.devices_for(3)] == [8e9, 16e9, 8e9]
    with pytest.raises(ValueError, match="3 devices for 4 clients"):
        fleet.assign(4)

    path = tmp_path / "fleet.json"
    path.write_text(json.dumps(spec))
    assert FleetConfig.load(path) == fleet
    toml = tmp_path / "fleet.toml"
    toml.write_text("seed = 1\n[fractions]\nrpi4 = 0.5\nlaptop = 0.5\n")
    assert FleetConfig.load(toml).assign(4).count("rpi4") == 2


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"fractions": {"a": 0.5, "b": 0.4}}, "sum to 1"),
        ({"fractions": {"a": 1.5, "b": -0.5}}, "fractions\\['b'\\]"),
        ({"fractions": {"a": 1.0}, "clients": ["a"]}, "exactly one"),
        ({"fractions": {"a": 1.0}, "size": 3}, "unknown fields"),
        ({"clients": ["a", "b"], "devices": {"a": {"memory_gb": 1, "throughput_flops": 1}}}, "missing from"),
        ({"clients": "a"}, "list of device names"),
    ],
)
def test_fleet_rejects_bad_specs(spec, message):
    with pytest.raises(ValueError, match=message):
        FleetConfig.from_dict(spec)


def test_fleet_load_names_the_file(tmp_path):
    bad = tmp_path / "fleet.json"
    bad.write_text('{"fractions": {"a": 0.2}}')
    with pytest.raises(ValueError, match="fleet.json"):
        FleetConfig.load(bad)
    with pytest.raises(FileNotFoundError):
        FleetConfig.load(tmp_path / "none.toml")


def test_a_device_without_memory_size_is_refused_by_name():
    unknown = Device("mystery", "mystery", memory_bytes=None, throughput_flops=1e12)
    with pytest.raises(ValueError, match="mystery.*no memory size"):
        plan_depth(COSTS, unknown, deadline_seconds=60, steps_per_round=1)
