"""``cache-cnn``: a frozen CNN's features served from a cache are the features it computes.

The cache is only worth having if it never serves a stale or wrong row: same loss and
gradients as the frozen CNN without a cache, padding and weight changes respected.
"""

from __future__ import annotations

import pytest
import torch

from fedspeech.apps.pretrain.settings import PretrainSettings
from fedspeech.profiling.savers import FrozenCNNCache, Savers, apply_model_savers
from fedspeech.profiling.trainstep import TrainStep, build_model, synthetic_batch


@pytest.fixture(scope="module")
def tiny():
    torch.manual_seed(0)
    return build_model("tiny")


def _steps(template, tokens: list[str], steps: int = 2):
    """Losses and the last step's gradients of ``steps`` steps on one batch."""
    step = TrainStep(template, savers=Savers.parse(tokens))
    batch = synthetic_batch(step.model, 3, 1.0, seed=1)
    torch.manual_seed(7)
    losses = []
    for index in range(steps):
        loss = step.forward_loss(batch)
        losses.append(float(loss.detach()))
        loss.backward()
        if index < steps - 1:
            step.optimizer.step()
            step.optimizer.zero_grad(set_to_none=True)
    grads = {name: p.grad.clone() for name, p in step.model.named_parameters() if p.grad is not None}
    return losses, grads, step.model


def test_cache_cnn_implies_a_frozen_cnn_and_spells_back():
    savers = Savers.parse(["cache-cnn"])
    assert savers.freeze_cnn and savers.cache_cnn
    assert Savers.parse(savers.tokens()) == savers


def test_cached_features_give_the_frozen_cnn_losses_and_gradients(tiny):
    frozen_losses, frozen_grads, _ = _steps(tiny, ["freeze-cnn"])
    cached_losses, cached_grads, model = _steps(tiny, ["cache-cnn"])
    assert cached_losses == pytest.approx(frozen_losses, rel=1e-6)
    assert cached_grads.keys() == frozen_grads.keys()
    assert not any("feature_extractor" in name for name in cached_grads)  # frozen
    for name, grad in frozen_grads.items():
        torch.testing.assert_close(cached_grads[name], grad, rtol=1e-5, atol=1e-7)
    cache = model.wav2vec2.feature_extractor.cnn_cache
    assert (cache.misses, cache.hits) == (3, 3)  # computed in step 1, served in step 2


def test_padded_rows_and_new_weights_are_never_served_stale(tiny):
    model = build_model("tiny")
    model.load_state_dict(tiny.state_dict())
    apply_model_savers(model, Savers.parse(["cache-cnn"]))
    encoder = model.wav2vec2.feature_extractor
    cache: FrozenCNNCache = encoder.cnn_cache
    torch.manual_seed(3)
    wave = torch.randn(1, 16000)
    padded = torch.cat([wave, torch.cat([wave[:, :8000], torch.zeros(1, 8000)], dim=1)])
    plain = cache.plain_forward(padded)
    torch.testing.assert_close(encoder(padded), plain)
    assert cache.misses == 2  # the padded copy is another row
    torch.testing.assert_close(encoder(padded[:1]), plain[:1])
    assert cache.hits == 1

    with torch.no_grad():
        encoder.conv_layers[0].conv.weight.mul_(2.0)  # new CNN weights (e.g. the next global model)
    torch.testing.assert_close(encoder(padded), cache.plain_forward(padded))
    assert cache.hits == 1 and cache.misses == 4

    for p in encoder.parameters():
        p.requires_grad_(True)
    with pytest.raises(RuntimeError, match="trainable again"):
        encoder(padded)


def test_the_cache_stays_within_its_byte_budget():
    model = build_model("tiny")
    model.freeze_feature_encoder()
    cache = FrozenCNNCache.attach(model.wav2vec2.feature_extractor, max_bytes=1)
    for seed in range(3):
        model.wav2vec2.feature_extractor(torch.randn(2, 4000, generator=torch.Generator().manual_seed(seed)))
    assert len(cache.rows) == 1 and cache.misses == 6


def test_pretraining_takes_cache_cnn_but_the_profiler_refuses_it(tmp_path):
    from fedspeech.profiling.cli import _profiled_savers

    settings = PretrainSettings(manifest="m.tsv", out_dir=str(tmp_path), savers="cache-cnn")
    assert settings.model_savers().cache_cnn
    with pytest.raises(ValueError, match="cache-cnn"):
        _profiled_savers(["cache-cnn"])
