"""Safe loading: checkpoints load from safetensors only; a folder whose weights are only
pickle files is refused by name unless FEDSPEECH_ALLOW_PICKLE=1."""

from __future__ import annotations

import pytest
import torch
from transformers import Wav2Vec2ForPreTraining

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.models.configs import model_config
from fedspeech.models.loading import load_backbone
from fedspeech.ssl.methods import Wav2Vec2Method


@pytest.fixture
def pickle_only(tmp_path):
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(model_config("tiny"))
    model.config.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "pytorch_model.bin")  # what older tools and hubs ship
    assert not list(tmp_path.glob("*.safetensors")) and (tmp_path / "pytorch_model.bin").is_file()
    return tmp_path, model


def test_pickle_only_checkpoints_are_refused_naming_the_file(pickle_only, monkeypatch):
    folder, _ = pickle_only
    monkeypatch.delenv("FEDSPEECH_ALLOW_PICKLE", raising=False)
    with pytest.raises(ValueError, match="pytorch_model.bin.*FEDSPEECH_ALLOW_PICKLE"):
        load_backbone(folder)
    with pytest.raises(ValueError, match="pytorch_model.bin"):
        Wav2Vec2Method(PretrainSettings(model=str(folder)))


def test_opting_in_loads_the_pickle_and_safetensors_need_no_opt_in(pickle_only, monkeypatch, tmp_path_factory):
    folder, model = pickle_only
    monkeypatch.setenv("FEDSPEECH_ALLOW_PICKLE", "1")
    loaded = Wav2Vec2Method(PretrainSettings(model=str(folder))).fresh_model()
    assert torch.equal(loaded.project_q.weight, model.project_q.weight)
    monkeypatch.delenv("FEDSPEECH_ALLOW_PICKLE")
    safe = tmp_path_factory.mktemp("safe")
    model.save_pretrained(safe)
    assert torch.equal(load_backbone(safe).feature_projection.projection.weight,
                       model.wav2vec2.feature_projection.projection.weight)  # fmt: skip
