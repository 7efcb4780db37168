"""Early-exit model: the re-run encoder loop matches HF, depth truly stops, keys and losses."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    HubertConfig,
    HubertModel,
    Wav2Vec2Config,
    Wav2Vec2Model,
    WavLMConfig,
    WavLMModel,
)

from fedspeech.models.early_exit import (
    ConfidenceExit,
    EarlyExitModel,
    FixedExit,
    early_exit_loss,
    exit_layers,
    predict,
    training_flops,
)

FAMILIES = {
    "wav2vec2": (Wav2Vec2Config, Wav2Vec2Model),
    "hubert": (HubertConfig, HubertModel),
    "wavlm": (WavLMConfig, WavLMModel),
}
TINY = dict(
    hidden_size=16,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=32,
    conv_dim=(8,) * 7,
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    layerdrop=0.0,
)
SAMPLES = 4000  # 0.25 s -> 12 frames


def tiny_backbone(family: str = "wav2vec2", stable: bool = False, **overrides):
    config_type, model_type = FAMILIES[family]
    torch.manual_seed(0)
    config = config_type(
        **{**TINY, **overrides},
        do_stable_layer_norm=stable,
        feat_extract_norm="layer" if stable else "group",
    )
    return model_type(config)


def tiny_model(task="classify", num_outputs=3, every=1, **kwargs) -> EarlyExitModel:
    return EarlyExitModel(tiny_backbone(), task, num_outputs, every=every, **kwargs)


def padded_batch(batch: int = 3, samples: int = SAMPLES) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    audio = torch.randn(batch, samples, generator=generator)
    mask = torch.ones(batch, samples, dtype=torch.long)
    mask[1, samples * 2 // 3 :] = 0
    mask[-1, samples // 2 :] = 0
    return audio * mask, mask


def count_layer_calls(model: EarlyExitModel) -> tuple[list[int], list]:
    calls = [0] * model.num_layers
    handles = [
        layer.register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(model.backbone.encoder.layers)
    ]
    return calls, handles


def test_exit_layers():
    assert exit_layers(12, every=3) == (3, 6, 9, 12)
    assert exit_layers(12, exits=(4, 2)) == (2, 4, 12)
    assert exit_layers(5, every=2) == (2, 4, 5)
    assert exit_layers(4) == (4,)
    with pytest.raises(ValueError, match="outside"):
        exit_layers(4, exits=(5,))


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("stable", [False, True], ids=["post-LN", "pre-LN"])
def test_matches_hf_forward(family, stable):
    """Guards the re-implemented encoder loop against HF's own forward (padding included)."""
    backbone = tiny_backbone(family, stable).eval()
    model = EarlyExitModel(backbone, "ctc", 5, every=1).eval()
    audio, mask = padded_batch()
    with torch.no_grad():
        reference = backbone(audio, attention_mask=mask, output_hidden_states=True)
        ours = model.exit_hidden_states(audio, mask)
    torch.testing.assert_close(ours[4], reference.last_hidden_state, rtol=1e-5, atol=1e-5)
    for layer in (1, 2, 3):  # intermediate exits: HF's hidden states (+ final norm if pre-LN)
        expected = reference.hidden_states[layer]
        if stable:
            expected = backbone.encoder.layer_norm(expected)
        torch.testing.assert_close(ours[layer], expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["wav2vec2", "wavlm"])
def test_depth_stops_at_layer_d(family):
    model = EarlyExitModel(tiny_backbone(family), "classify", 3, exits=(2,))
    calls, handles = count_layer_calls(model)
    head_calls = {e: 0 for e in model.exits}
    for e in model.exits:
        model.heads[str(e)].register_forward_hook(lambda *_, e=e: head_calls.__setitem__(e, head_calls[e] + 1))
    audio, mask = padded_batch()
    out = model(audio, mask, depth=2)
    assert calls == [1, 1, 0, 0]
    assert head_calls == {2: 1, 4: 0}
    assert sorted(out.logits) == [2]
    model(audio, mask, depth=None)
    assert calls == [2, 2, 1, 1]
    for handle in handles:
        handle.remove()


def test_logit_shapes_and_lengths():
    audio, mask = padded_batch()
    expected_lengths = tiny_backbone()._get_feat_extract_output_lengths(mask.sum(-1))
    classify = tiny_model("classify", 7, every=2)
    out = classify(audio, mask)
    assert sorted(out.logits) == [2, 4]
    assert all(v.shape == (3, 7) for v in out.logits.values())
    assert out.output_lengths.tolist() == expected_lengths.tolist()

    ctc = tiny_model("ctc", 11, every=2)
    out = ctc(audio, mask, depth=2)
    frames = int(expected_lengths.max())
    assert sorted(out.logits) == [2]
    assert out.logits[2].shape == (3, frames, 11)
    assert out.output_lengths.tolist() == expected_lengths.tolist()


def test_depth_must_be_an_exit_and_backbone_supported():
    model = tiny_model(every=2)
    with pytest.raises(ValueError, match="not an exit"):
        model(torch.zeros(1, SAMPLES), depth=3)
    with pytest.raises(ValueError, match="not supported"):
        EarlyExitModel(torch.nn.Linear(2, 2), "classify", 3)
    with pytest.raises(ValueError, match="task"):
        EarlyExitModel(tiny_backbone(), "segment", 3)


def _layer_of(key: str) -> int | None:
    if key.startswith("backbone.encoder.layers."):
        return int(key.split(".")[3]) + 1
    return None


@pytest.mark.parametrize("frozen", [True, False])
def test_trainable_keys_and_partial_state_dict(frozen):
    model = tiny_model(every=2, freeze_feature_encoder=frozen)
    keys = model.trainable_keys(2)
    layers = {_layer_of(k) for k in keys} - {None}
    assert layers == {1, 2}
    assert {k.split(".")[1] for k in keys if k.startswith("heads.")} == {"2"}
    assert any(k.startswith("backbone.feature_extractor.") for k in keys) is (not frozen)
    for shared in ("feature_projection.projection.weight", "encoder.layer_norm.weight"):
        assert f"backbone.{shared}" in keys
    assert "backbone.masked_spec_embed" not in keys  # spec augment is off

    partial = model.partial_state_dict(2)
    assert list(partial) == keys
    full = model.state_dict()
    assert all(torch.equal(partial[k], full[k]) for k in keys)
    full_keys = model.trainable_keys(4)
    assert {_layer_of(k) for k in full_keys} - {None} == {1, 2, 3, 4}
    sent = sum(t.numel() for t in partial.values())
    assert sent < sum(full[k].numel() for k in full_keys)


def test_backward_leaves_deeper_layers_without_gradient():
    model = tiny_model(every=2)  # CNN frozen by default
    audio, mask = padded_batch()
    out = model(audio, mask, depth=2)
    early_exit_loss(out.logits, torch.tensor([0, 1, 2]), "classify").backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    trained = set(model.trainable_keys(2))
    for name, grad in grads.items():
        if name in trained:
            assert grad is not None, name
        else:
            assert grad is None, name
    assert any(_layer_of(n) == 3 for n in grads) and any(n.startswith("heads.4") for n in grads)


def test_freeze_beyond_matches_trainable_keys():
    model = tiny_model(every=2)
    model.freeze_beyond(2)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == set(model.trainable_keys(2)) & {n for n, _ in model.named_parameters()}
    model.freeze_beyond(4)
    assert {_layer_of(n) for n, p in model.named_parameters() if p.requires_grad} - {None} == {1, 2, 3, 4}


def test_training_flops_increase_with_depth():
    model = tiny_model(every=1)
    flops = [training_flops(model, d, seconds=0.25, batch=1) for d in model.exits]
    assert all(a < b for a, b in zip(flops, flops[1:])), flops
    assert all(p.grad is None for p in model.parameters())  # measurement leaves no grads
    assert training_flops(model, 2, seconds=0.25, batch=2) == 2 * flops[1]


def test_distillation_zero_when_exits_agree_positive_otherwise():
    torch.manual_seed(0)
    targets = torch.tensor([0, 2, 1, 1])
    same = torch.randn(4, 3)
    agree = {2: same, 4: same.clone()}
    plain = early_exit_loss(agree, targets, "classify")
    distilled = early_exit_loss(agree, targets, "classify", distill_lambda=1.0, temperature=2.0)
    torch.testing.assert_close(distilled, plain)

    differ = {2: torch.randn(4, 3), 4: torch.randn(4, 3)}
    plain = early_exit_loss(differ, targets, "classify")
    assert early_exit_loss(differ, targets, "classify", distill_lambda=0.5) > plain


def test_ctc_distillation_counts_valid_frames_only():
    torch.manual_seed(0)
    targets = torch.tensor([[1, 2, -100], [3, 1, 2]])
    lengths = torch.tensor([6, 8])
    base = torch.randn(2, 8, 5)
    other = base.clone()
    other[0, 6:] = torch.randn(2, 5)  # differs only on padded frames of item 0
    agree = {2: base, 4: other}
    plain = early_exit_loss(agree, targets, "ctc", output_lengths=lengths)
    distilled = early_exit_loss(agree, targets, "ctc", distill_lambda=1.0, output_lengths=lengths)
    torch.testing.assert_close(distilled, plain)
    other[1, 0, 0] += 3.0  # now a valid frame differs
    plain = early_exit_loss(agree, targets, "ctc", output_lengths=lengths)
    assert early_exit_loss(agree, targets, "ctc", distill_lambda=1.0, output_lengths=lengths) > plain


def test_exit_weights():
    torch.manual_seed(0)
    logits = {2: torch.randn(4, 3), 4: torch.randn(4, 3)}
    targets = torch.tensor([0, 1, 2, 0])
    only_deepest = early_exit_loss({4: logits[4]}, targets, "classify")
    weighted = early_exit_loss(logits, targets, "classify", weights={2: 0.0, 4: 1.0})
    torch.testing.assert_close(weighted, only_deepest)
    summed = early_exit_loss(logits, targets, "classify")
    torch.testing.assert_close(summed, early_exit_loss(logits, targets, "classify", weights=[1.0, 1.0]))


def test_confidence_policy_on_crafted_logits():
    sure, unsure = 10.0, 0.0
    # item 0 confident at exit 2, item 1 only at exit 4, item 2 never (falls back to 6).
    logits = {
        2: torch.tensor([[sure, 0, 0], [unsure, 0, 0], [unsure, 0, 0]]),
        4: torch.tensor([[0, sure, 0], [0, sure, 0], [unsure, 0, 0]]),
        6: torch.tensor([[0, 0, sure], [0, 0, sure], [0, 0, unsure]]),
    }
    chosen, answer = ConfidenceExit(0.9).select(logits)
    assert chosen.tolist() == [2, 4, 6]
    assert answer.argmax(-1).tolist() == [0, 1, 0]
    ctc = torch.zeros(1, 4, 3)
    ctc[0, :2, 0] = sure  # confident on the 2 valid frames, not on the padding
    assert ConfidenceExit(0.9).confidence(ctc, torch.tensor([2])).item() > 0.99
    assert ConfidenceExit(0.9).confidence(ctc).item() < 0.9


def test_predict_stops_where_the_policy_says():
    model = tiny_model("classify", 3, every=1)
    audio, mask = padded_batch()
    batch = {"input_values": audio, "attention_mask": mask}
    calls, _ = count_layer_calls(model)

    fixed = predict(model, batch, FixedExit(2))
    assert calls == [1, 1, 0, 0] and fixed.layers_run == 2
    assert fixed.exit_layer.tolist() == [2, 2, 2] and fixed.logits.shape == (3, 3)
    with torch.no_grad():
        expected = model.eval()(audio, mask, depth=2).logits[2]
    torch.testing.assert_close(fixed.logits, expected)

    calls[:] = [0] * 4
    eager = predict(model, batch, ConfidenceExit(0.0))  # everyone confident at once
    assert calls == [1, 0, 0, 0] and eager.exit_layer.tolist() == [1, 1, 1]

    calls[:] = [0] * 4
    never = predict(model, batch, ConfidenceExit(1.01), max_depth=3)  # deepest allowed
    assert calls == [1, 1, 1, 0] and never.exit_layer.tolist() == [3, 3, 3]
    with pytest.raises(ValueError, match="max_depth"):
        predict(model, batch, FixedExit(4), max_depth=2)


def test_build_from_preset_and_local_folder(tmp_path):
    model = EarlyExitModel.build("tiny", "ctc", 8, every=2)
    assert model.exits == (2, 4) and model.backbone.config.model_type == "wav2vec2"
    backbone = tiny_backbone("hubert")
    backbone.save_pretrained(tmp_path)
    loaded = EarlyExitModel.build(tmp_path, "classify", 3, exits=(1,))
    assert loaded.backbone.config.model_type == "hubert" and loaded.exits == (1, 4)
    torch.testing.assert_close(
        loaded.backbone.encoder.layers[0].attention.q_proj.weight,
        backbone.encoder.layers[0].attention.q_proj.weight,
    )
    with pytest.raises(ValueError, match="config.json"):
        EarlyExitModel.build(tmp_path / "missing", "ctc", 8)


def test_step_flops_count_grouped_conv_backward_correctly():
    """torch 2.13's FlopCounterMode counts a grouped conv's weight gradient as if it were not
    grouped; early-exit steps count with the profiler's corrected formula, so halving the
    positional conv's work (twice the groups) removes 3x its forward FLOPs from a step."""
    from fedspeech.models.accounting import flop_counter

    def step_and_pos_conv(groups: int) -> tuple[int, float]:
        model = EarlyExitModel(tiny_backbone(num_conv_pos_embedding_groups=groups), "classify", 3, every=1)
        counter = flop_counter()
        hidden = torch.zeros(1, 12, model.backbone.config.hidden_size)
        with torch.no_grad(), counter:
            model.backbone.encoder.pos_conv_embed(hidden)
        return training_flops(model, 2, seconds=0.25, batch=1), counter.get_total_flops()

    step_1, forward_1 = step_and_pos_conv(1)
    step_2, forward_2 = step_and_pos_conv(2)
    assert forward_2 == forward_1 / 2
    assert step_1 - step_2 == 3 * (forward_1 - forward_2)
