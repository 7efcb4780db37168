"""wav2vec 2.0 objective (METHODS.md §1) and the shared local-training loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from transformers import Wav2Vec2ForPreTraining

from fedspeech.models.configs import model_config
from fedspeech.ssl.train import LRSchedule, evaluate_loss, train_local
from fedspeech.ssl.wav2vec2 import GumbelSchedule, Wav2Vec2Objective, contrastive_logits
from synthetic import synthetic_batch


@pytest.fixture(scope="module")
def config():
    return model_config("tiny")


def new_model(config, seed: int = 0) -> Wav2Vec2ForPreTraining:
    torch.manual_seed(seed)
    return Wav2Vec2ForPreTraining(config)


def test_mask_respects_padding_and_is_reproducible(config):
    model = new_model(config)
    objective = Wav2Vec2Objective.from_config(config)
    # 1.5 s, 1 s, 0.6 s and a 0.12 s utterance too short for one span of 10 frames.
    batch = synthetic_batch([24_000, 16_000, 9_600, 1_920], seed=1)
    valid = objective.frame_mask(model, batch)
    lengths = model._get_feat_extract_output_lengths(batch["attention_mask"].sum(-1))
    assert valid.shape == (4, int(model._get_feat_extract_output_lengths(24_000)))
    assert valid.sum(-1).tolist() == lengths.tolist() == [74, 49, 29, 5]

    mask = objective.sample_mask(valid, np.random.default_rng(0))
    assert not (mask & ~valid).any(), "padding frames must never be masked"
    counts = mask.sum(-1).tolist()
    assert counts[3] == 0  # too short: no mask, hence no loss from it
    for count, length in zip(counts[:3], lengths[:3].tolist()):
        assert 10 <= count <= length
    assert 0.3 < sum(counts[:3]) / sum(lengths[:3].tolist()) < 0.8

    again = objective.sample_mask(valid, np.random.default_rng(0))
    other = objective.sample_mask(valid, np.random.default_rng(1))
    assert torch.equal(mask, again) and not torch.equal(mask, other)


def test_negatives_are_other_masked_frames_of_the_same_utterance(config):
    model = new_model(config)
    objective = Wav2Vec2Objective.from_config(config)
    batch = synthetic_batch([24_000, 16_000, 9_600, 1_920], seed=2)
    rng = np.random.default_rng(3)
    mask = objective.sample_mask(objective.frame_mask(model, batch), rng)
    negatives = objective.sample_negatives(mask, rng)
    batch_size, num_frames = mask.shape
    assert negatives.shape == (batch_size, num_frames, 100)
    for b, t in mask.nonzero().tolist():
        drawn = negatives[b, t]
        assert (drawn // num_frames == b).all(), "distractor from another utterance"
        frames = drawn % num_frames
        assert mask[b, frames].all(), "distractor from an unmasked or padding frame"
        assert (frames != t).all(), "the positive itself drawn as a distractor"
    for b in range(3):  # uniform over the others: 100 draws reach every masked frame
        drawn_rows = set((negatives[b][mask[b]] % num_frames).flatten().tolist())
        assert drawn_rows == set(mask[b].nonzero().flatten().tolist())


def test_identical_distractors_get_minus_inf():
    torch.manual_seed(0)
    quantized = torch.randn(1, 6, 4)
    quantized[0, 3] = quantized[0, 1]  # frame 3 quantizes to the same vector as frame 1
    context = torch.randn(1, 6, 4)
    mask = torch.tensor([[True, True, False, True, True, False]])
    negatives = torch.tensor([[[3, 4], [3, 0], [0, 0], [1, 1], [0, 1], [0, 0]]])
    logits = contrastive_logits(context, quantized, mask, negatives, temperature=0.1)
    assert logits.shape == (4, 3)
    assert torch.isfinite(logits[:, 0]).all()
    expected_inf = torch.tensor([[False, False], [True, False], [True, True], [False, False]])
    assert torch.equal(torch.isinf(logits[:, 1:]), expected_inf)
    cos = torch.cosine_similarity(context[0, 0], quantized[0, 0], dim=0) / 0.1
    assert logits[0, 0].item() == pytest.approx(cos.item(), rel=1e-5)


def test_collapsed_codebook_gives_zero_contrastive_loss(config):
    """Every target identical → every distractor is −inf → only the positive is left."""
    model = new_model(config).eval()
    with torch.no_grad():
        model.quantizer.weight_proj.weight.zero_()
        model.quantizer.weight_proj.bias.zero_()
        model.quantizer.weight_proj.bias[:: config.num_codevectors_per_group] = 10.0
    out = Wav2Vec2Objective.from_config(config)(model, synthetic_batch([16_000, 12_000], seed=4))
    assert out.contrastive.item() == 0.0
    assert out.perplexity.item() == pytest.approx(config.num_codevector_groups)


def test_loss_components_and_feature_penalty(config):
    model = new_model(config)
    batch = synthetic_batch([20_000, 16_000, 12_000], seed=5)
    objective = Wav2Vec2Objective.from_config(config, seed=7, feature_penalty_weight=10.0)  # the paper's weight
    model.train()
    out = objective(model, batch)
    for name in ("loss", "contrastive", "diversity", "feature_penalty", "perplexity"):
        assert torch.isfinite(getattr(out, name)), name
    assert out.loss.requires_grad
    assert 0 < out.diversity.item() < 1
    assert 1 <= out.perplexity.item() <= config.num_codevector_groups * config.num_codevectors_per_group
    assert out.loss.item() == pytest.approx(
        out.contrastive.item() + 0.1 * out.diversity.item() + 10 * out.feature_penalty.item(), rel=1e-5
    )
    # The penalty is the mean square of the raw CNN output over the valid frames.
    with torch.no_grad():
        cnn = model.wav2vec2.feature_extractor(batch["input_values"]).transpose(1, 2)
    valid = objective.frame_mask(model, batch)
    assert out.feature_penalty.item() == pytest.approx(cnn.pow(2)[valid].mean().item(), rel=1e-5)
    assert out.feature_penalty.item() > 0
    # ... and it reaches the loss with weight 10 (same masks and negatives, eval mode).
    model.eval()
    with_penalty = Wav2Vec2Objective.from_config(config, seed=8, feature_penalty_weight=10.0)(model, batch)
    without = Wav2Vec2Objective.from_config(config, seed=8, feature_penalty_weight=0.0)(model, batch)
    assert with_penalty.loss.item() - without.loss.item() == pytest.approx(
        10 * with_penalty.feature_penalty.item(), rel=1e-4
    )
    assert out.logs()["num_masked"] == out.num_masked > 0


def test_gumbel_schedule_is_a_function_of_the_global_step(config):
    schedule = GumbelSchedule()
    assert schedule(0) == 2.0
    assert schedule(1) == pytest.approx(2.0 * 0.999995)
    assert schedule(100_000) == pytest.approx(2.0 * 0.999995**100_000)
    assert schedule(10_000_000) == 0.5
    model = new_model(config)
    objective = Wav2Vec2Objective.from_config(config)
    objective.before_step(model, 50_000)
    assert model.quantizer.temperature == pytest.approx(2.0 * 0.999995**50_000)
    with pytest.raises(ValueError):
        GumbelSchedule(start=-1.0)


def test_loss_is_normalised_by_masked_frames(config):
    """The same utterances twice (same masks, negatives shifted) give the same loss."""
    model = new_model(config).eval()
    objective = Wav2Vec2Objective.from_config(config)
    batch = synthetic_batch([20_000, 14_000], seed=6)
    rng = np.random.default_rng(9)
    mask = objective.sample_mask(objective.frame_mask(model, batch), rng)
    negatives = objective.sample_negatives(mask, rng)
    doubled = {k: torch.cat([v, v]) for k, v in batch.items()}
    offset = mask.shape[0] * mask.shape[1]
    with torch.no_grad():
        single = objective.compute_loss(model, batch, mask, negatives)
        double = objective.compute_loss(
            model, doubled, torch.cat([mask, mask]), torch.cat([negatives, negatives + offset])
        )
    assert double.num_masked == 2 * single.num_masked
    assert double.loss.item() == pytest.approx(single.loss.item(), rel=1e-4)
    assert double.contrastive.item() == pytest.approx(single.contrastive.item(), rel=1e-4)


def test_batch_too_short_to_mask_is_skipped_not_fatal(config, caplog):
    model = new_model(config)
    objective = Wav2Vec2Objective.from_config(config)
    short = synthetic_batch([2_000, 1_600], seed=0)  # < 10 feature frames each
    out = objective(model, short)
    assert math.isnan(out.loss.item()) and out.num_masked == 0
    assert "too short" in caplog.text
    with pytest.raises(ValueError, match="too short"):
        objective.sample_mask(objective.frame_mask(model, short))
    result = train_local(model, objective, [short, synthetic_batch([12_000], seed=1)], lr=1e-4)
    assert result.skipped_batches == 1 and result.steps == 1 and result.num_examples == 1


def test_wav2vec2_loss_falls(config):
    model = new_model(config, seed=0)
    objective = Wav2Vec2Objective.from_config(config, seed=0)
    loader = [synthetic_batch([16_000, 12_000, 14_000, 11_000], seed=s) for s in (10, 11)]
    eval_before = evaluate_loss(model, objective, loader, seed=123)
    schedule = LRSchedule(warmup_steps=5, total_steps=40, decay="linear", final_ratio=0.1)
    curve, step = [], 0
    for _ in range(4):  # four "rounds" of 5 epochs × 2 batches, continuing the schedules
        result = train_local(
            model,
            objective,
            loader,
            epochs=5,
            lr=1e-3,
            lr_schedule=schedule,
            max_grad_norm=5.0,
            start_step=step,
        )
        assert result.steps == 10 and result.skipped_batches == 0 and result.num_examples == 8
        step = result.end_step
        curve.append(result.mean_loss_last_epoch)
    eval_after = evaluate_loss(model, objective, loader, seed=123)
    print(
        f"\nwav2vec2 train loss per round (last epoch): {[round(x, 3) for x in curve]}; "
        f"eval loss {eval_before:.3f} -> {eval_after:.3f}"
    )
    assert all(math.isfinite(x) for x in curve)
    assert curve[-1] < curve[0] - 0.5
    assert eval_after < eval_before - 0.5
    assert model.quantizer.temperature == pytest.approx(GumbelSchedule()(39))
    assert evaluate_loss(model, objective, loader, seed=123) == eval_after  # reproducible
    assert model.training  # evaluate_loss restores the mode


# -- the shared training loop, on a trivial model so it runs in milliseconds ----------------


class _Out:
    def __init__(self, loss: torch.Tensor, n: int) -> None:
        self.loss, self.num_examples = loss, n


class _SquareObjective:
    """Loss = mean((w·x)^2); returns NaN for batches flagged 'poison'."""

    def __init__(self) -> None:
        self.steps_seen: list[int] = []

    def before_step(self, model, step):
        self.steps_seen.append(step)

    def __call__(self, model, batch, rng=None):
        loss = model(batch["input_values"]).pow(2).mean()
        if batch.get("poison"):
            loss = loss * float("nan")
        return _Out(loss, batch["input_values"].shape[0])


def test_train_local_skips_nonfinite_batches_and_continues_steps():
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    batch = {"input_values": torch.randn(4, 3), "utterances": ["a"] * 4}  # extra key ignored
    loader = [batch, {**batch, "poison": True}, batch]
    objective = _SquareObjective()
    result = train_local(model, objective, loader, epochs=2, lr=0.01, start_step=7)
    assert result.skipped_batches == 2 and result.steps == 4 and result.end_step == 11
    assert result.num_examples == 8 and math.isfinite(result.mean_loss_last_epoch)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert objective.steps_seen == [7, 8, 8, 9, 10, 10]  # a skipped batch uses no step
    with pytest.raises(ValueError, match="exactly one"):
        train_local(model, objective, loader, lr=0.1, optimizer_factory=torch.optim.SGD)
    with pytest.raises(ValueError, match="input_values"):
        train_local(model, objective, [{"x": 1}], lr=0.1)


def test_lr_schedule_warmup_and_decay_by_global_step():
    linear = LRSchedule(warmup_steps=4, total_steps=14, decay="linear")
    assert [linear(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert linear(9) == pytest.approx(0.5) and linear(14) == 0.0 and linear(99) == 0.0
    cosine = LRSchedule(warmup_steps=0, total_steps=10, decay="cosine", final_ratio=0.1)
    assert cosine(0) == 1.0 and cosine(5) == pytest.approx(0.55) and cosine(10) == pytest.approx(0.1)
    # A local run starting at global step 3 continues the schedule.
    seen_lrs: list[float] = []

    class RecordingSGD(torch.optim.SGD):
        def step(self, closure=None):
            seen_lrs.append(self.param_groups[0]["lr"])
            return super().step(closure)

    model = torch.nn.Linear(3, 1)
    batch = {"input_values": torch.randn(2, 3)}
    train_local(
        model,
        _SquareObjective(),
        [batch] * 3,
        optimizer_factory=lambda params: RecordingSGD(params, lr=0.2),
        lr_schedule=linear,
        start_step=3,
    )
    assert seen_lrs == pytest.approx([0.2 * linear(s) for s in (3, 4, 5)])
    with pytest.raises(ValueError):
        LRSchedule(decay="cosine")
