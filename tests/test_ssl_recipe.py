"""The wav2vec 2.0 recipe knobs a run can set, and a sanity check that the objective learns.

Why these tests exist (benchmarks/ssl_quality.py, docs/evaluation.md): with the paper's
feature-penalty weight of 10 a tiny model's contrastive loss stays at chance, and the only
way to change the weight for a run is the checkpoint's config, which the objective must read.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForPreTraining

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.models.configs import model_config
from fedspeech.ssl.methods import Wav2Vec2Method
from fedspeech.ssl.wav2vec2 import Wav2Vec2Objective
from synthetic import synthetic_batch

SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32,) * 7,
    codevector_dim=32,
    proj_codevector_dim=32,
    num_codevectors_per_group=16,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    num_negatives=10,
    mask_time_length=5,
)


def test_feature_penalty_weight_comes_from_the_config():
    assert Wav2Vec2Objective.from_config(model_config("base")).feature_penalty_weight == 10.0  # paper default
    assert Wav2Vec2Objective.from_config(model_config("tiny")).feature_penalty_weight == 0.0  # our tiny preset
    assert Wav2Vec2Objective.from_config(model_config("tiny", feature_penalty_weight=0.5)).feature_penalty_weight == 0.5
    # explicit overrides still win over the config
    objective = Wav2Vec2Objective.from_config(
        model_config("tiny", feature_penalty_weight=0.5), feature_penalty_weight=2.0
    )
    assert objective.feature_penalty_weight == 2.0
    for bad in (-1.0, "ten"):
        with pytest.raises(ValueError, match="feature_penalty_weight"):
            Wav2Vec2Objective.from_config(model_config("tiny", feature_penalty_weight=bad))


def test_a_runs_objective_uses_the_weight_saved_in_its_checkpoint(tmp_path):
    torch.manual_seed(0)
    Wav2Vec2ForPreTraining(model_config("tiny", **SMALL, feature_penalty_weight=0.0)).save_pretrained(tmp_path)
    method = Wav2Vec2Method(PretrainSettings(model=str(tmp_path), seed=3))
    assert method.objective.feature_penalty_weight == 0.0
    assert method.objective.num_negatives == 10 and method.objective.mask_length == 5

    model = method.fresh_model()
    out = method.objective(model, synthetic_batch([16_000, 16_000], seed=1))
    assert out.feature_penalty > 0  # still measured and logged, just not weighted into the loss
    expected = out.contrastive + method.objective.diversity_weight * out.diversity
    assert torch.allclose(out.loss, expected)


def test_objective_can_fit_one_batch_below_chance():
    """With masks and negatives fixed, a few dozen steps must take the contrastive loss far
    below its chance level ln(1 + K): if not, the loss or its gradients are broken."""
    config = model_config("tiny", **SMALL)
    torch.manual_seed(0)
    model = Wav2Vec2ForPreTraining(config)
    objective = Wav2Vec2Objective.from_config(config, seed=0)
    batch = synthetic_batch([16_000, 16_000, 16_000], seed=5)
    rng = np.random.default_rng(0)
    mask = objective.sample_mask(objective.frame_mask(model, batch), rng)
    negatives = objective.sample_negatives(mask, rng)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3)
    model.train()
    chance = math.log(1 + objective.num_negatives)
    first = None
    for step in range(60):
        objective.before_step(model, step)
        out = objective.compute_loss(model, batch, mask, negatives)
        first = float(out.contrastive.detach()) if first is None else first
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
    assert first > 0.8 * chance
    last = float(out.contrastive.detach())
    assert last < 0.5 * chance, (first, last, chance)
