"""Counting conventions of the module table (``complete`` vs the reference study's ``gao2022``),
checked against parameter and FLOP counts worked out by hand from the tiny config."""

from __future__ import annotations

import argparse
import json

import pytest
import torch

from fedspeech.profiling import cli
from fedspeech.profiling.measure import inference_flops
from fedspeech.profiling.report import modules_table
from fedspeech.profiling.trainstep import build_model

SAMPLE_RATE = 16000


@pytest.fixture(scope="module")
def tiny():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # see test_profiling_measure.py
    torch.manual_seed(0)
    yield build_model("tiny")
    torch.set_num_threads(threads)


def conv_frames(config, seconds: float) -> list[int]:
    """Output length of each CNN layer: floor((n - kernel) / stride) + 1, no padding."""
    n, frames = int(seconds * SAMPLE_RATE), []
    for kernel, stride in zip(config.conv_kernel, config.conv_stride):
        n = (n - kernel) // stride + 1
        frames.append(n)
    return frames


def hand_params(config) -> dict[str, int]:
    """Parameters per part, from the config's dimensions (weights + biases, norms' scale + shift)."""
    d, ffn, c = config.hidden_size, config.intermediate_size, list(config.conv_dim)
    channels_in = [1, *c[:-1]]
    conv = sum(
        cin * cout * k + (cout if config.conv_bias else 0) for cin, cout, k in zip(channels_in, c, config.conv_kernel)
    )
    conv_norms = 2 * c[0] if config.feat_extract_norm == "group" else sum(2 * cout for cout in c)
    feature_projection = 2 * c[-1] + c[-1] * d + d  # layer norm + linear
    k, groups = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    pos_conv = d * (d // groups) * k + k + d  # weight norm over dim 2: v, g (one per tap), bias
    layer = 4 * (d * d + d) + 2 * d + (d * ffn + ffn) + (ffn * d + d) + 2 * d  # q,k,v,out, LN, FFN, LN
    entries = config.num_codevector_groups * config.num_codevectors_per_group
    quantizer = c[-1] * entries + entries + entries * (config.codevector_dim // config.num_codevector_groups)
    p = config.proj_codevector_dim
    projections = (d * p + p) + (config.codevector_dim * p + p)  # project_hid, project_q
    return {
        "cnn_encoder": conv + conv_norms + feature_projection,
        "transformer": pos_conv + 2 * d + config.num_hidden_layers * layer,  # + encoder layer norm
        "quantizer": quantizer,
        "projections": projections,
        "other": d,  # masked_spec_embed
    }


def test_hand_counted_params_per_group_under_both_conventions(tiny):
    hand = hand_params(tiny.config)
    assert hand["cnn_encoder"] == 72_672 and hand["quantizer"] == 12_416 and hand["projections"] == 10_368
    layers, other = inference_flops(tiny, 1.0)

    complete = modules_table(layers, other, "complete")
    assert complete["cnn_encoder"]["params"] == hand["cnn_encoder"]
    assert complete["transformer"]["params"] == hand["transformer"]
    assert complete["quantization"]["params"] == hand["quantizer"] + hand["projections"]
    assert "projections" not in complete
    assert complete["total"]["params"] == sum(hand.values()) == sum(p.numel() for p in tiny.parameters())

    gao = modules_table(layers, other, "gao2022")
    assert gao["cnn_encoder"]["params"] == hand["cnn_encoder"]
    assert gao["transformer"]["params"] == hand["transformer"]
    assert gao["quantization"]["params"] == hand["quantizer"]
    assert gao["projections"]["params"] == hand["projections"]
    assert gao["other"]["params"] == hand["other"]
    # the published total is the three modules: no projections, no mask embedding
    assert gao["total"]["params"] == hand["cnn_encoder"] + hand["transformer"] + hand["quantizer"]


@pytest.mark.parametrize("seconds", [1.0, 2.0])
def test_conventions_differ_by_the_attention_matmuls_and_the_projections(tiny, seconds):
    config = tiny.config
    d, layers_n = config.hidden_size, config.num_hidden_layers
    t = conv_frames(config, seconds)[-1]
    complete_layers, complete_other = inference_flops(tiny, seconds, convention="complete")
    gao_layers, gao_other = inference_flops(tiny, seconds, convention="gao2022")
    complete = {layer.name: layer.forward_flops for layer in complete_layers}
    gao = {layer.name: layer.forward_flops for layer in gao_layers}

    attention = 4 * t * t * d  # Q·Kᵀ and A·V: T²·d multiply-adds each, 2 FLOPs per multiply-add
    for index in range(layers_n):
        assert complete[f"encoder.layers.{index}"] - gao[f"encoder.layers.{index}"] == attention
    for name in complete:  # nothing else in the model is an attention product
        if not name.startswith("encoder.layers."):
            assert complete[name] == gao[name], name

    complete_table = modules_table(complete_layers, complete_other, "complete")
    gao_table = modules_table(gao_layers, gao_other, "gao2022")
    assert complete_table["transformer"]["flops"] - gao_table["transformer"]["flops"] == layers_n * attention
    assert complete_table["cnn_encoder"]["flops"] == gao_table["cnn_encoder"]["flops"]
    projections = gao_table["projections"]["flops"]
    assert complete_table["quantization"]["flops"] - gao_table["quantization"]["flops"] == projections
    assert complete_table["total"]["flops"] - gao_table["total"]["flops"] == layers_n * attention + projections


@pytest.mark.parametrize("seconds", [1.0, 2.0])
def test_gao2022_flops_are_the_hand_counted_conv_and_linear_layers(tiny, seconds):
    config = tiny.config
    d, ffn, c = config.hidden_size, config.intermediate_size, list(config.conv_dim)
    frames = conv_frames(config, seconds)
    t = frames[-1]
    layers, other = inference_flops(tiny, seconds, convention="gao2022")
    table = modules_table(layers, other, "gao2022")

    convs = sum(2 * n * cout * cin * k for n, cin, cout, k in zip(frames, [1, *c[:-1]], c, config.conv_kernel))
    assert table["cnn_encoder"]["flops"] == convs + 2 * t * c[-1] * d
    k, groups = config.num_conv_pos_embeddings, config.num_conv_pos_embedding_groups
    pos_frames = t + 2 * (k // 2) - k + 1  # padded by k // 2; the extra frame is cut after the conv
    layer = 2 * t * (4 * d * d + 2 * d * ffn)  # q, k, v, out and the two FFN linears
    transformer = 2 * pos_frames * d * (d // groups) * k + config.num_hidden_layers * layer
    assert table["transformer"]["flops"] == transformer
    entries = config.num_codevector_groups * config.num_codevectors_per_group
    assert table["quantization"]["flops"] == 2 * t * c[-1] * entries  # weight projection
    p = config.proj_codevector_dim
    assert table["projections"]["flops"] == 2 * t * (d * p + config.codevector_dim * p)
    assert table["total"]["flops"] == table["cnn_encoder"]["flops"] + transformer + table["quantization"]["flops"]


def test_unknown_convention_is_refused(tiny):
    with pytest.raises(ValueError, match="convention"):
        inference_flops(tiny, 1.0, convention="gao")
    layers, other = inference_flops(tiny, 1.0)
    with pytest.raises(ValueError, match="convention"):
        modules_table(layers, other, "gao")


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    cli.register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(list(argv))
    return args.func(args)


def test_profile_command_names_the_convention(tiny, tmp_path, capsys):
    common = ("profile", "--model", "tiny", "--seconds", "1", "--repeats", "0")
    assert run(*common, "--convention", "gao2022", "--json", str(tmp_path / "gao.json")) == 0
    printed = capsys.readouterr().out
    assert "convention gao2022" in printed and "projections" in printed
    report = json.loads((tmp_path / "gao.json").read_text())
    assert report["convention"]["name"] == "gao2022"
    assert list(report["modules"]) == ["cnn_encoder", "transformer", "quantization", "projections", "other", "total"]

    assert run(*common, "--json", str(tmp_path / "complete.json")) == 0
    assert "convention complete" in capsys.readouterr().out
    default = json.loads((tmp_path / "complete.json").read_text())
    assert default["convention"]["name"] == "complete"
    assert list(default["modules"]) == ["cnn_encoder", "transformer", "quantization", "other", "total"]
    layers, other = inference_flops(tiny, 1.0)
    assert default["modules"] == json.loads(json.dumps(modules_table(layers, other)))
