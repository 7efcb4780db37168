"""CTCModel / UtteranceClassifier shapes, gradients, freezing, parameter groups, state."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForPreTraining

from fedspeech.data.manifest import Utterance
from fedspeech.downstream.heads import (
    CTCModel,
    UtteranceClassifier,
    backbone_of,
    make_optimizer,
    masked_mean,
    param_groups,
    wants_normalized_audio,
)
from fedspeech.downstream.state import (
    get_trainable_arrays,
    load_trainable_state,
    set_trainable_arrays,
    trainable_state,
)
from fedspeech.downstream.text import CharVocab
from fedspeech.models.configs import model_config
from synthetic import SMALL


def utt(i: int, *, transcript: str = "", label: str = "", speaker: str = "s0") -> Utterance:
    return Utterance(
        id=f"u{i}",
        path=f"/nowhere/u{i}.wav",
        duration=0.5,
        sample_rate=16000,
        speaker=speaker,
        transcript=transcript,
        label=label,
    )


def batch(lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    values = torch.zeros(len(lengths), max(lengths))
    mask = torch.zeros(len(lengths), max(lengths), dtype=torch.long)
    for i, n in enumerate(lengths):
        values[i, :n] = torch.randn(n, generator=g) * 0.1
        mask[i, :n] = 1
    return values, mask


def cnn_params(model) -> list[torch.nn.Parameter]:
    return list(backbone_of(model).feature_extractor.parameters())


def test_ctc_model_forward_backward_shapes_and_frozen_cnn():
    torch.manual_seed(0)
    vocab = CharVocab()
    model = CTCModel.build("tiny", vocab, **SMALL)
    values, mask = batch([8000, 5000])
    targets = model.targets([utt(0, transcript="ab c"), utt(1, transcript="Hi!")])
    assert targets.tolist() == [[3, 4, 1, 5], [10, 11, -100, -100]]
    model.train()
    out = model(values, mask, targets=targets)
    # 0.5 s -> 24 frames; 5000 samples -> 15 frames (CNN receptive field 400, hop 320).
    assert out.logits.shape == (2, 24, len(vocab))
    assert out.lengths.tolist() == [24, 15]
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert all(not p.requires_grad and p.grad is None for p in cnn_params(model))
    assert model.hf.lm_head.weight.grad is not None and model.hf.lm_head.weight.grad.abs().sum() > 0
    encoder_grad = backbone_of(model).encoder.layers[0].attention.q_proj.weight.grad
    assert encoder_grad is not None and encoder_grad.abs().sum() > 0
    assert len(model.transcribe(values, mask)) == 2
    # The fine-tuning masking setting replaces the pretraining one (0.65).
    assert model.hf.config.mask_time_prob == pytest.approx(0.05) and model.hf.config.ctc_zero_infinity


def test_ctc_model_without_freezing_trains_cnn():
    model = CTCModel.build("tiny", CharVocab(), freeze_feature_encoder=False, **SMALL)
    assert all(p.requires_grad for p in cnn_params(model))


def test_classifier_forward_backward_and_layer_weights():
    torch.manual_seed(0)
    model = UtteranceClassifier.build("tiny", ["no", "yes", "_unknown_"], layer_weighted=True, **SMALL)
    values, mask = batch([8000, 6000, 4000])
    targets = model.targets([utt(0, label="yes"), utt(1, label="no"), utt(2, label="_unknown_")])
    assert targets.tolist() == [1, 0, 2]
    model.train()
    out = model(values, mask, targets=targets)
    assert out.logits.shape == (3, 3) and torch.isfinite(out.loss)
    out.loss.backward()
    assert model.layer_weights.shape == (SMALL["num_hidden_layers"] + 1,)
    assert model.layer_weights.grad is not None and model.layer_weights.grad.abs().sum() > 0
    assert all(p.grad is None for p in cnn_params(model))
    assert model.predict(values, mask)[0] in model.labels
    with pytest.raises(ValueError, match="'maybe' is not one of the model's labels"):
        model.targets([utt(3, label="maybe")])


def test_classifier_speaker_targets():
    model = UtteranceClassifier.build("tiny", ["s0", "s1"], target_field="speaker", **SMALL)
    assert model.targets([utt(0, speaker="s1"), utt(1, speaker="s0")]).tolist() == [1, 0]


def test_masked_mean_ignores_padding_frames():
    hidden = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [100.0, 100.0]]])
    mask = torch.tensor([[True, True, False]])
    assert masked_mean(hidden, mask).tolist() == [[2.0, 3.0]]


def test_freeze_backbone_is_a_linear_probe():
    model = UtteranceClassifier.build("tiny", ["a", "b"], freeze_backbone=True, **SMALL)
    assert not any(p.requires_grad for p in backbone_of(model).parameters())
    assert all(p.requires_grad for p in model.head_parameters())
    model.train()
    assert model.training and model.head.training and not backbone_of(model).training  # no dropout in features
    groups = param_groups(model, 1e-5, 1e-3)
    assert [g["name"] for g in groups] == ["head"]
    values, mask = batch([4000, 4000])
    out = model(values, mask, targets=torch.tensor([0, 1]))
    out.loss.backward()
    assert model.head.weight.grad is not None


def test_two_param_groups_with_their_own_learning_rates():
    model = CTCModel.build("tiny", CharVocab(), **SMALL)
    optimizer = make_optimizer(model, lr_backbone=1e-5, lr_head=1e-3)
    groups = {g["name"]: g for g in optimizer.param_groups}
    assert groups["backbone"]["lr"] == 1e-5 and groups["head"]["lr"] == 1e-3
    head_ids = {id(p) for p in groups["head"]["params"]}
    backbone_ids = {id(p) for p in groups["backbone"]["params"]}
    assert head_ids == {id(model.hf.lm_head.weight), id(model.hf.lm_head.bias)}
    assert not head_ids & backbone_ids
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert head_ids | backbone_ids == trainable  # frozen CNN left out, nothing else missing


def test_trainable_state_round_trip_skips_frozen_parameters():
    torch.manual_seed(0)
    a = UtteranceClassifier.build("tiny", ["a", "b"], **SMALL)
    torch.manual_seed(1)
    b = UtteranceClassifier.build("tiny", ["a", "b"], **SMALL)
    state = trainable_state(a)
    assert not any("feature_extractor" in name for name in state)
    assert "head.weight" in state
    assert not torch.equal(a.head.weight, b.head.weight)
    set_trainable_arrays(b, get_trainable_arrays(a))
    assert all(torch.equal(v, trainable_state(b)[k]) for k, v in state.items())
    with pytest.raises(ValueError, match="got 1 arrays"):
        set_trainable_arrays(b, [np.zeros(3)])
    bad = dict(state, **{"head.weight": torch.zeros(5, 5)})
    with pytest.raises(ValueError, match="head.weight has shape"):
        load_trainable_state(b, bad)


def test_build_from_pretraining_checkpoint_folder(tmp_path):
    torch.manual_seed(0)
    pretrained = Wav2Vec2ForPreTraining(model_config("tiny", **SMALL))
    pretrained.save_pretrained(tmp_path / "ckpt")
    reference = pretrained.wav2vec2.encoder.layers[1].feed_forward.output_dense.weight
    ctc = CTCModel.build(tmp_path / "ckpt", CharVocab())
    clf = UtteranceClassifier.build(tmp_path / "ckpt", ["a", "b"])
    for model in (ctc, clf):
        loaded = backbone_of(model).encoder.layers[1].feed_forward.output_dense.weight
        assert torch.equal(loaded, reference)
    assert backbone_of(pretrained) is pretrained.wav2vec2


def test_audio_normalisation_follows_the_checkpoint(tmp_path):
    assert not wants_normalized_audio("large")  # our pretraining never normalises
    (tmp_path / "preprocessor_config.json").write_text('{"do_normalize": true}')
    assert wants_normalized_audio(tmp_path)
    assert not wants_normalized_audio(tmp_path / "elsewhere")


def test_unknown_backbone_source(tmp_path):
    with pytest.raises(ValueError, match="not a preset"):
        CTCModel.build(tmp_path / "missing", CharVocab())
    with pytest.raises(ValueError, match="not a preset"):
        UtteranceClassifier.build("huge", ["a", "b"])
