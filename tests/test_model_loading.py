"""Loading our pretraining checkpoints for fine-tuning: the intended differences (pretraining
heads dropped, a new task head) load silently; anything else is named in a warning."""

from __future__ import annotations

import logging

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCTC, Wav2Vec2ForPreTraining

from fedspeech.models.configs import model_config
from fedspeech.models.loading import from_pretrained, load_backbone
from synthetic import SMALL


def pretraining_checkpoint(folder):
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(model_config("tiny", **SMALL))
    model.save_pretrained(folder)
    return model


def test_backbone_of_a_pretraining_checkpoint_loads_quietly(tmp_path, caplog, capfd):
    saved = pretraining_checkpoint(tmp_path)
    with caplog.at_level(logging.INFO):
        backbone = load_backbone(tmp_path)
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert "LOAD REPORT" not in capfd.readouterr().err
    for name, value in backbone.state_dict().items():
        torch.testing.assert_close(value, saved.wav2vec2.state_dict()[name])


def test_a_new_ctc_head_is_expected_but_a_missing_backbone_key_is_named(tmp_path, caplog):
    pretraining_checkpoint(tmp_path)
    with caplog.at_level(logging.WARNING):
        from_pretrained(AutoModelForCTC, tmp_path, new_parts=("lm_head.",), vocab_size=8)
    assert not caplog.records

    weights = load_file(str(tmp_path / "model.safetensors"))
    dropped = "wav2vec2.encoder.layers.0.attention.q_proj.weight"
    del weights[dropped]
    save_file(weights, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING):
        load_backbone(tmp_path)
    (record,) = caplog.records
    assert "1 missing keys" in record.getMessage() and "encoder.layers.0.attention.q_proj.weight" in record.getMessage()
