"""Frozen-CNN feature caching: the cached path computes what the audio path computes, the
cache pays for each utterance once (and counts it), and cost lines drop exactly the CNN."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
import torch
from transformers import Wav2Vec2Config, Wav2Vec2Model

from fedspeech.models.accounting import flop_counter
from fedspeech.models.early_exit import EarlyExitModel, step_inputs
from fedspeech.models.feature_cache import FrozenFeatureCache
from fedspeech.profiling.depth_planner import measure_depth_costs

TINY = dict(
    hidden_size=16,
    num_hidden_layers=4,
    num_attention_heads=2,
    intermediate_size=32,
    conv_dim=(8, 8),
    conv_kernel=(10, 4),
    conv_stride=(5, 4),
    num_conv_pos_embeddings=8,
    num_conv_pos_embedding_groups=2,
    feat_extract_norm="group",
    hidden_dropout=0.0,
    attention_dropout=0.0,
    activation_dropout=0.0,
    feat_proj_dropout=0.0,
    layerdrop=0.0,
)


@dataclass(frozen=True)
class Utt:
    id: str


def model(**kwargs) -> EarlyExitModel:
    torch.manual_seed(0)
    return EarlyExitModel(Wav2Vec2Model(Wav2Vec2Config(**TINY)), "classify", 3, every=1, **kwargs).eval()


def batch_of(waves: list[torch.Tensor], ids: list[str]) -> dict:
    longest = max(len(w) for w in waves)
    audio = torch.zeros(len(waves), longest)
    mask = torch.zeros(len(waves), longest, dtype=torch.long)
    for row, wave in enumerate(waves):
        audio[row, : len(wave)], mask[row, : len(wave)] = wave, 1
    return {"input_values": audio, "attention_mask": mask, "utterances": [Utt(i) for i in ids]}


def waves(*lengths: int) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(3)
    return [torch.randn(n, generator=generator) for n in lengths]


def cnn_flops(m: EarlyExitModel, samples: int) -> float:
    counter = flop_counter()
    with torch.no_grad(), counter:
        m.cnn_features(torch.zeros(1, samples))
    return float(counter.get_total_flops())


def test_features_path_equals_audio_path():
    m = model()
    (wave,) = waves(4000)
    with torch.no_grad():
        from_audio = m(wave[None], depth=3).logits
        from_features = m(features=m.cnn_features(wave[None]), depth=3).logits
    assert from_audio.keys() == from_features.keys() == {1, 2, 3}
    for layer in from_audio:
        torch.testing.assert_close(from_features[layer], from_audio[layer])


def test_padded_cached_batch_scores_every_item_as_alone():
    """Items of different lengths, padded in feature space, each get the logits they get alone
    (the frame mask keeps padding out of attention and pooling)."""
    m, cache = model(), FrozenFeatureCache()
    items = waves(4000, 2600, 1800)
    features, lengths = cache.features(m, batch_of(items, ["a", "b", "c"]))
    assert lengths.tolist() == [m.cnn_features(w[None]).shape[1] for w in items]
    with torch.no_grad():
        batched = m(features=features, frame_lengths=lengths).logits[4]
        for row, wave in enumerate(items):
            torch.testing.assert_close(batched[row], m(wave[None]).logits[4][0], atol=1e-5, rtol=1e-4)


def test_cache_computes_each_utterance_once_and_counts_its_flops():
    m, cache = model(), FrozenFeatureCache()
    a, b = waves(4000, 2600)
    cache.features(m, batch_of([a, b], ["a", "b"]))
    assert (cache.computed, cache.reused, len(cache)) == (2, 0, 2)
    assert cache.flops_spent == pytest.approx(cnn_flops(m, 4000) + cnn_flops(m, 2600))
    spent = cache.flops_spent
    first, _ = cache.features(m, batch_of([b, a], ["b", "a"]))
    assert (cache.computed, cache.reused) == (2, 2) and cache.flops_spent == spent
    # a different crop of utterance "a" is recomputed, not served stale, and replaces it
    crop = a[1000:3600]
    got, _ = cache.features(m, batch_of([crop], ["a"]))
    assert cache.computed == 3 and len(cache) == 2
    torch.testing.assert_close(got[0], m.cnn_features(crop[None])[0].detach())


def test_cache_drops_everything_when_the_cnn_changes():
    m, cache = model(), FrozenFeatureCache()
    (a,) = waves(4000)
    before, _ = cache.features(m, batch_of([a], ["a"]))
    with torch.no_grad():
        next(m.backbone.feature_extractor.parameters()).mul_(2.0)
    after, _ = cache.features(m, batch_of([a], ["a"]))
    assert cache.computed == 2
    assert not torch.allclose(before, after)


def test_cache_refuses_a_trainable_cnn():
    m = model(freeze_feature_encoder=False)
    with pytest.raises(ValueError, match="frozen feature encoder"):
        FrozenFeatureCache().features(m, batch_of(waves(4000), ["a"]))
    with pytest.raises(ValueError, match="frozen feature encoder"):
        step_inputs(m, torch.zeros(1, 4000), cached_cnn=True)


def test_frame_lengths_are_checked():
    m = model()
    features = m.cnn_features(torch.zeros(2, 4000))
    with pytest.raises(ValueError, match="frame_lengths"):
        m(features=features, frame_lengths=torch.tensor([3, features.shape[1] + 1]))
    with pytest.raises(ValueError, match="either input_values or features"):
        m(torch.zeros(1, 4000), features=features)


def test_cached_cost_lines_drop_exactly_the_cnn_forward():
    """Every depth's step costs the CNN's forward pass less when the features are cached."""
    m = model()
    lengths = (0.25, 0.5)
    plain = {c.depth: c for c in measure_depth_costs(m, lengths=lengths)}
    cached = {c.depth: c for c in measure_depth_costs(m, lengths=lengths, cached_cnn=True)}
    for seconds in lengths:
        cnn = cnn_flops(m, int(seconds * 16_000))
        for depth in m.exits:
            saved = plain[depth].at(seconds, 1).train_flops - cached[depth].at(seconds, 1).train_flops
            assert saved == pytest.approx(cnn, rel=1e-6)
    # what is left still grows with depth
    assert [cached[d].at(0.5, 1).train_flops for d in m.exits] == sorted(
        cached[d].at(0.5, 1).train_flops for d in m.exits
    )


def test_exported_cache_serves_the_same_features_after_restore():
    m, cache = model(), FrozenFeatureCache()
    a, b = waves(4000, 2600)
    before, _ = cache.features(m, batch_of([a, b], ["a", "b"]))
    restored = FrozenFeatureCache.restore(*cache.export())
    after, _ = restored.features(m, batch_of([a, b], ["a", "b"]))
    assert (restored.computed, restored.reused, len(restored)) == (0, 2, 2)
    torch.testing.assert_close(after, before)
    with torch.no_grad():  # the restored CNN digest still guards against changed weights
        next(m.backbone.feature_extractor.parameters()).mul_(2.0)
    restored.features(m, batch_of([a], ["a"]))
    assert restored.computed == 1 and len(restored) == 1


def test_cache_notices_weights_loaded_with_load_state_dict():
    """Clients load each round's weights with load_state_dict: new CNN weights drop the
    cache, the same weights loaded again keep it."""
    m, cache = model(), FrozenFeatureCache()
    (a,) = waves(4000)
    cache.features(m, batch_of([a], ["a"]))
    cnn = m.backbone.feature_extractor
    cnn.load_state_dict(cnn.state_dict())  # same values, written again
    cache.features(m, batch_of([a], ["a"]))
    assert (cache.computed, cache.reused) == (1, 1)
    cnn.load_state_dict({k: v * 2 for k, v in cnn.state_dict().items()})
    cache.features(m, batch_of([a], ["a"]))
    assert cache.computed == 2


def test_cache_notices_another_model_with_other_cnn_weights():
    """One cache used with a second model object (e.g. a fresh client model per round):
    its CNN's tensors are other tensors, so their weights are hashed again."""
    first, cache = model(), FrozenFeatureCache()
    (a,) = waves(4000)
    cache.features(first, batch_of([a], ["a"]))
    second = model()
    with torch.no_grad():
        next(second.backbone.feature_extractor.parameters()).mul_(2.0)
    del first
    cache.features(second, batch_of([a], ["a"]))
    assert cache.computed == 2 and len(cache) == 1
