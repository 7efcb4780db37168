"""Profiler measurements on the tiny model: JSON schema, sums, coverage, scaling, savers."""

from __future__ import annotations

import pytest
import torch

from fedspeech.profiling.measure import inference_flops, measure_step
from fedspeech.profiling.report import modules_table, profile
from fedspeech.profiling.savers import Savers
from fedspeech.profiling.trainstep import build_model

TINY_CONV_LAYERS = 7
TINY_TRANSFORMER_LAYERS = 4


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


@pytest.fixture(scope="module")
def report(tiny):
    return profile(tiny, "tiny", seconds=1.0, batch=2, repeats=1)


def test_report_has_the_documented_schema(report):
    for group in ("cnn_encoder", "transformer", "quantization", "total"):
        assert set(report["modules"][group]) >= {"params", "gflops"}
        assert report["modules"][group]["params"] > 0 and report["modules"][group]["gflops"] > 0
    for layer in report["layers"]:
        assert set(layer) >= {"name", "params", "forward_gflops", "train_gflops", "activation_bytes"}
    step = report["train_step"]
    assert set(step) >= {"seconds", "activation_bytes", "peak_bytes"}
    assert step["seconds"] > 0 and step["batch"] == 2 and step["precision"] == "fp32"
    assert step["peak_bytes"] > step["activation_bytes"] > 0


def test_modules_add_up_to_total(report, tiny):
    modules = report["modules"]
    parts = ("cnn_encoder", "transformer", "quantization", "other")
    assert sum(modules[p]["params"] for p in parts) == modules["total"]["params"]
    assert modules["total"]["params"] == sum(p.numel() for p in tiny.parameters())
    assert sum(modules[p]["flops"] for p in parts) == modules["total"]["flops"]
    assert sum(modules[p]["gflops"] for p in parts) == pytest.approx(modules["total"]["gflops"], rel=1e-9)
    # the only parameter outside METHODS.md's three groups is the learned mask embedding
    assert modules["other"]["params"] == tiny.config.hidden_size
    assert "masked_spec_embed" in modules["other"]["includes"]


def test_layers_cover_every_layer_and_all_parameters(report, tiny):
    names = [layer["name"] for layer in report["layers"]]
    expected = [f"conv_layers.{i}" for i in range(TINY_CONV_LAYERS)] + ["feature_projection", "pos_conv_embed"]
    expected += [f"encoder.layers.{i}" for i in range(TINY_TRANSFORMER_LAYERS)] + ["quantizer"]
    for name in expected:
        assert name in names
    layer_params = sum(layer["params"] for layer in report["layers"])
    assert layer_params + report["unattributed"]["params"] == sum(p.numel() for p in tiny.parameters())
    assert report["unattributed"]["params"] == tiny.config.hidden_size


def test_train_flops_are_measured_forward_plus_backward(report):
    step = report["train_step"]
    layers = report["layers"]
    assert sum(layer["train_gflops"] for layer in layers) + report["unattributed"]["train_gflops"] == pytest.approx(
        step["train_gflops"], rel=1e-6
    )
    for layer in layers:
        if layer["name"].startswith(("conv_layers", "encoder.layers", "pos_conv_embed")):
            # grad wrt input and wrt weights each cost one forward (grouped pos conv included)
            assert layer["train_gflops"] == pytest.approx(3 * layer["forward_gflops"], rel=0.02), layer["name"]
    # per-layer activations are the step's total minus what runs outside the layers
    assert (
        sum(layer["activation_bytes"] for layer in layers) + report["unattributed"]["activation_bytes"]
        == step["activation_bytes"]
    )
    # the CNN's first layers dominate activation memory (DEVICES.md)
    biggest = max(layers, key=lambda layer: layer["activation_bytes"])
    assert biggest["group"] == "cnn_encoder"


def test_inference_flops_of_a_transformer_layer_include_attention(tiny):
    """24·T·d² for the projections and FFN plus 4·T²·d for Q·Kᵀ and A·V, whichever SDPA
    kernel PyTorch picks (on CPU in eval: a fused kernel torch's counter has no formula for)."""
    d, ffn = tiny.config.hidden_size, tiny.config.intermediate_size
    for seconds in (1.0, 4.0):
        layers, _ = inference_flops(tiny, seconds)
        layer = next(x for x in layers if x.name == "encoder.layers.0")
        t = int(tiny.wav2vec2._get_feat_extract_output_lengths(int(seconds * 16000)))
        assert layer.forward_flops == 2 * t * (4 * d * d + 2 * d * ffn) + 4 * t * t * d, seconds


def test_flops_and_memory_grow_about_linearly_with_seconds(tiny):
    totals, cnn = [], []
    for seconds in (1.0, 2.0, 4.0):
        layers, other = inference_flops(tiny, seconds)
        table = modules_table(layers, other)
        totals.append(table["total"]["gflops"])
        cnn.append(table["cnn_encoder"]["gflops"])
    assert cnn[1] / cnn[0] == pytest.approx(2.0, rel=0.02) and cnn[2] / cnn[1] == pytest.approx(2.0, rel=0.02)
    # attention adds a small quadratic term
    assert 1.95 <= totals[1] / totals[0] <= 2.3 and 1.95 <= totals[2] / totals[1] <= 2.3
    short = measure_step(tiny, "tiny", 1.0, 1, repeats=0, with_layers=False)
    long = measure_step(tiny, "tiny", 2.0, 1, repeats=0, with_layers=False)
    assert long.activation_bytes / short.activation_bytes == pytest.approx(2.0, rel=0.15)


def test_savers_reduce_activation_memory(tiny):
    def run(*tokens: str):
        return measure_step(tiny, "tiny", 1.0, 1, savers=Savers.parse(list(tokens)), repeats=0, with_layers=False)

    baseline = run()
    saved = {name: run(name) for name in ("ckpt-cnn", "ckpt-transformer", "freeze-cnn")}
    for name, measurement in saved.items():
        assert measurement.activation_bytes < baseline.activation_bytes, name
        assert measurement.peak_bytes < baseline.peak_bytes, name
    # checkpointing pays with recomputation; a frozen CNN skips its backward and its AdamW state
    assert saved["ckpt-cnn"].train_flops > baseline.train_flops
    assert saved["ckpt-transformer"].train_flops > baseline.train_flops
    assert saved["freeze-cnn"].train_flops < baseline.train_flops
    assert saved["freeze-cnn"].static_bytes["optimizer_state"] < baseline.static_bytes["optimizer_state"]


def test_local_folder_without_quantizer_reports_zero_quantization(tmp_path):
    from transformers import HubertConfig

    HubertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        conv_dim=(16,) * 7,
        num_conv_pos_embeddings=16,
        num_conv_pos_embedding_groups=4,
    ).save_pretrained(tmp_path)
    model = build_model(str(tmp_path))
    layers, other = inference_flops(model, 1.0)
    table = modules_table(layers, other)
    assert table["quantization"]["params"] == 0 and table["quantization"]["gflops"] == 0.0
    assert table["total"]["params"] == sum(p.numel() for p in model.parameters())
    step = measure_step(model, str(tmp_path), 1.0, 1, repeats=0)  # surrogate loss still trains everything
    assert step.train_flops > 2 * step.forward_flops
    assert [layer.name for layer in step.layers][-1] == "encoder.layers.1"


def test_savers_parse_and_spell_back():
    savers = Savers.parse(["ckpt-cnn,freeze-cnn", "crop=2.5", "amp=bf16"])
    assert savers.tokens() == ["ckpt-cnn", "freeze-cnn", "crop=2.5", "amp=bf16"]
    assert savers.effective_seconds(5.0) == 2.5 and savers.effective_seconds(1.0) == 1.0
    assert savers.effective_precision("fp32") == "bf16"
    assert [s.tokens() for s in savers.singles()] == [["ckpt-cnn"], ["freeze-cnn"], ["crop=2.5"], ["amp=bf16"]]
    for bad in ("ckpt", "crop=x", "crop=-1", "amp=int8"):
        with pytest.raises(ValueError):
            Savers.parse([bad])


def test_peak_tensor_memory_follows_allocations_and_frees():
    from fedspeech.profiling.memory import PeakTensorMemory

    existing = torch.zeros(1024)  # 4 KiB held before the step
    with PeakTensorMemory([existing]) as tracker:
        a = torch.ones(256 * 1024)  # 1 MiB
        b = a * 2  # +1 MiB -> 2 MiB live
        view = b[10:]  # a view allocates nothing
        del a
        c = torch.ones(128 * 1024)  # 0.5 MiB, reusing nothing we count
        assert tracker.current_bytes == 4096 + 2**20 + 2**19
    assert tracker.peak_bytes == 4096 + 2 * 2**20
    assert tracker.breakdown() == {"existing_before_step": 4096, "allocated_during_step": 2 * 2**20}
    del b, view, c


def test_mixed_precision_steps_keep_the_optimizer_state(tiny):
    # fp16 uses a GradScaler; a skipped (overflowing) step would leave out the AdamW state
    fp32 = measure_step(tiny, "tiny", 0.5, 1, "fp32", repeats=0, with_layers=False)
    for precision in ("bf16", "fp16"):
        mixed = measure_step(tiny, "tiny", 0.5, 1, precision, repeats=0, with_layers=False)
        assert mixed.precision == precision
        assert mixed.static_bytes == fp32.static_bytes  # autocast keeps fp32 weights, grads, AdamW state
        assert mixed.train_flops == fp32.train_flops
