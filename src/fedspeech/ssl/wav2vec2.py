"""The complete wav2vec 2.0 pretraining objective (docs/methods.md §1) on HF ``Wav2Vec2ForPreTraining``.

What HF gives us: the model (CNN, masking embedding, Transformer, Gumbel quantizer, the two
projections), ``_compute_mask_indices`` and ``_sample_negative_indices``. What its built-in
loss lacks and why we compute the loss from its outputs instead:

- the feature penalty (mean squared CNN features, weight 10) is absent in HF;
- HF computes logits for *every* frame (B·T·101 cosines) and then drops the unmasked ones;
  we only score masked frames;
- HF's loss is a sum; we return it normalised by the number of masked frames exactly as
  fairseq's criterion does (contrastive sum + α·N·diversity + λ·N·penalty, all / N), with
  the components separated for logging.

So the model is called *without* ``sampled_negative_indices`` (HF then skips its loss) and
we use ``projected_states``, ``projected_quantized_states`` and ``codevector_perplexity``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from transformers import Wav2Vec2ForPreTraining
from transformers.models.wav2vec2.modeling_wav2vec2 import (
    _compute_mask_indices,
    _sample_negative_indices,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class GumbelSchedule:
    """Gumbel-softmax temperature as a pure function of the global optimiser step (fairseq:
    ``max(start * decay**step, end)``), so a resumed or federated run continues the schedule
    from its step count instead of restarting it."""

    start: float = 2.0
    end: float = 0.5
    decay: float = 0.999995

    def __post_init__(self) -> None:
        if not (self.start > 0 and self.end > 0 and 0 < self.decay <= 1):
            raise ValueError(f"GumbelSchedule: need start, end > 0 and 0 < decay <= 1, got {self}")

    def __call__(self, step: int) -> float:
        if step < 0:
            raise ValueError(f"GumbelSchedule: step must be >= 0, got {step}")
        return max(self.start * self.decay**step, self.end)


@dataclass
class Wav2Vec2LossOutput:
    """One batch's loss and its parts: ``contrastive`` per masked frame, ``diversity`` and
    ``feature_penalty`` unweighted, so that
    ``loss = contrastive + diversity_weight·diversity + feature_penalty_weight·feature_penalty``,
    which equals fairseq's (summed contrastive + α·N·diversity + λ·N·penalty) / N for N
    masked frames.
    """

    loss: torch.Tensor
    contrastive: torch.Tensor
    diversity: torch.Tensor
    feature_penalty: torch.Tensor
    num_masked: int
    perplexity: torch.Tensor
    num_examples: int

    def logs(self) -> dict[str, float]:
        """Plain floats for metrics/logging."""
        return {
            "loss": float(self.loss.detach()),
            "contrastive": float(self.contrastive.detach()),
            "diversity": float(self.diversity.detach()),
            "feature_penalty": float(self.feature_penalty.detach()),
            "num_masked": float(self.num_masked),
            "perplexity": float(self.perplexity.detach()),
        }


@contextmanager
def _seeded_numpy_global(seed: int) -> Iterator[None]:
    """HF's mask and negative samplers draw from numpy's *global* RNG; seed it from our own
    generator for the duration of the call and restore it afterwards, so results are
    reproducible without disturbing anyone else's use of ``np.random``."""
    saved = np.random.get_state()
    np.random.seed(seed)
    try:
        yield
    finally:
        np.random.set_state(saved)


def _model_device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


class Wav2Vec2Objective:
    """wav2vec 2.0 loss: ``objective(model, batch) -> Wav2Vec2LossOutput``.

    ``batch`` needs ``input_values`` (B, T) and optionally ``attention_mask`` (B, T); other
    keys are ignored. Masks and negatives come from ``rng`` (or the objective's own generator
    seeded with ``seed``), so a fixed seed gives the same masks and negatives every time.
    Gumbel noise and dropout still use torch's global RNG (HF offers no generator there).
    """

    def __init__(
        self,
        *,
        mask_prob: float = 0.65,
        mask_length: int = 10,
        min_masks: int = 2,
        num_negatives: int = 100,
        logit_temperature: float = 0.1,
        diversity_weight: float = 0.1,
        feature_penalty_weight: float = 10.0,
        gumbel: GumbelSchedule | None = None,
        seed: int | None = 0,
    ) -> None:
        if not 0 < mask_prob <= 1:
            raise ValueError(f"mask_prob must be in (0, 1], got {mask_prob}")
        if mask_length < 1 or num_negatives < 1 or logit_temperature <= 0:
            raise ValueError("mask_length and num_negatives must be >= 1 and logit_temperature > 0")
        self.mask_prob = mask_prob
        self.mask_length = mask_length
        self.min_masks = min_masks
        self.num_negatives = num_negatives
        self.logit_temperature = logit_temperature
        self.diversity_weight = diversity_weight
        self.feature_penalty_weight = feature_penalty_weight
        self.gumbel = gumbel if gumbel is not None else GumbelSchedule()
        self.rng = np.random.default_rng(seed)

    @classmethod
    def from_config(cls, config: Any, **overrides: Any) -> Wav2Vec2Objective:
        """Take masking/negative/loss settings from a ``Wav2Vec2Config`` (e.g. a preset from
        ``fedspeech.models.configs``); ``overrides`` win.

        The feature-penalty weight is not a standard HF config field, but a run builds its
        objective from the checkpoint's config alone, so without reading it here no run could
        change it: an optional ``feature_penalty_weight`` attribute on the config (saved in
        ``config.json``) sets it; absent, the paper's 10 applies. Tiny models need this: at
        weight 10 (and 1) their group-norm CNN output is driven towards zero, the context
        network collapses to a constant and the contrastive loss stays at chance.
        """
        settings = dict(
            mask_prob=config.mask_time_prob,
            mask_length=config.mask_time_length,
            min_masks=config.mask_time_min_masks,
            num_negatives=config.num_negatives,
            logit_temperature=config.contrastive_logits_temperature,
            diversity_weight=config.diversity_loss_weight,
        )
        penalty = getattr(config, "feature_penalty_weight", None)
        if penalty is not None:
            if not (isinstance(penalty, (int, float)) and penalty >= 0):
                raise ValueError(f"config.feature_penalty_weight must be a number >= 0, got {penalty!r}")
            settings["feature_penalty_weight"] = float(penalty)
        settings.update(overrides)
        return cls(**settings)

    # -- hooks called by fedspeech.ssl.train.train_local ------------------------------------
    def before_step(self, model: Wav2Vec2ForPreTraining, step: int) -> None:
        """Set the Gumbel temperature for global optimiser step ``step``."""
        model.set_gumbel_temperature(self.gumbel(step))

    # -- sampling -------------------------------------------------------------------------------
    def frame_mask(self, model: Wav2Vec2ForPreTraining, batch: Mapping[str, Any]) -> torch.Tensor:
        """Boolean (B, T') mask of valid (non-padding) feature frames for ``batch``."""
        input_values = batch["input_values"]
        num_frames = int(model._get_feat_extract_output_lengths(input_values.shape[1]))
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            return torch.ones(input_values.shape[0], num_frames, dtype=torch.bool)
        return model._get_feature_vector_attention_mask(num_frames, attention_mask.cpu()).bool()

    def sample_mask(self, valid: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        """Span mask (B, T') over valid frames; utterances with fewer than 2 masked frames
        (shorter than ``mask_length`` frames) get no mask and so no loss."""
        rng = self.rng if rng is None else rng
        batch_size, num_frames = valid.shape
        if num_frames < self.mask_length:
            raise ValueError(
                f"batch too short for masking: {num_frames} feature frames < mask_length "
                f"{self.mask_length} (utterances under ~{self.mask_length / 49:.2f} s)"
            )
        with _seeded_numpy_global(int(rng.integers(2**32))):
            mask = _compute_mask_indices(
                (batch_size, num_frames),
                mask_prob=self.mask_prob,
                mask_length=self.mask_length,
                attention_mask=valid.long(),
                min_masks=self.min_masks,
            )
        # HF pads short rows with a dummy index that can land on padding; never mask padding.
        mask = torch.from_numpy(mask) & valid.cpu()
        mask[mask.sum(-1) < 2] = False
        return mask

    def sample_negatives(self, mask: torch.Tensor, rng: np.random.Generator | None = None) -> torch.Tensor:
        """(B, T', K) flat indices into the (B·T') frames: for each masked frame, K distractors
        drawn uniformly, with replacement, from the *other* masked frames of the same utterance.

        HF 5.23's ``_sample_negative_indices`` does exactly this when given the mask (draws in
        [0, n−1) and shifts indices ≥ the positive by one, maps to that row's masked frames and
        offsets by row), so padding and other utterances are never drawn because they are not
        masked in that row. It fails on rows with < 2 masked frames, so we call it on the
        eligible rows only and move their offsets back. Unmasked frames' entries are unused.
        """
        rng = self.rng if rng is None else rng
        batch_size, num_frames = mask.shape
        rows = torch.nonzero(mask.sum(-1) >= 2).flatten()
        negatives = torch.zeros(batch_size, num_frames, self.num_negatives, dtype=torch.long)
        if len(rows) == 0:
            return negatives
        with _seeded_numpy_global(int(rng.integers(2**32))):
            sampled = _sample_negative_indices((len(rows), num_frames), self.num_negatives, mask[rows].cpu().numpy())
        sampled = torch.from_numpy(sampled.astype(np.int64))
        sub_row = torch.arange(len(rows))[:, None, None]
        negatives[rows] = sampled - sub_row * num_frames + rows[:, None, None] * num_frames
        return negatives

    # -- loss -----------------------------------------------------------------------------------
    def __call__(
        self,
        model: Wav2Vec2ForPreTraining,
        batch: Mapping[str, Any],
        rng: np.random.Generator | None = None,
    ) -> Wav2Vec2LossOutput:
        valid = self.frame_mask(model, batch)
        lengths = valid.sum(-1)
        if int(lengths.max()) < self.mask_length:
            # A whole batch of sub-0.2 s clips (e.g. a last batch of one short clip): a NaN
            # loss makes train_local skip and count it rather than stop a federated run.
            log.warning(
                "batch too short to mask (feature frames per utterance: %s < mask_length %d); "
                "returning a NaN loss so it is skipped",
                lengths.tolist(),
                self.mask_length,
            )
            return _unusable_batch(int(batch["input_values"].shape[0]), _model_device(model))
        mask = self.sample_mask(valid, rng)
        negatives = self.sample_negatives(mask, rng)
        return self.compute_loss(model, batch, mask, negatives)

    def compute_loss(
        self,
        model: Wav2Vec2ForPreTraining,
        batch: Mapping[str, Any],
        mask: torch.Tensor,
        negatives: torch.Tensor,
    ) -> Wav2Vec2LossOutput:
        """Loss for given masks and negatives (public so tests can fix them)."""
        if not getattr(model.config, "apply_spec_augment", True):
            raise ValueError("model.config.apply_spec_augment is False: masking would be skipped")
        device = _model_device(model)
        input_values = batch["input_values"].to(device)
        attention_mask = batch.get("attention_mask")
        if attention_mask is not None:
            attention_mask = attention_mask.to(device)
        mask = mask.to(device)
        negatives = negatives.to(device)

        # Raw CNN output (before the feature projection's layer norm) for the feature penalty:
        # HF only exposes the layer-normed ``extract_features``.
        captured: list[torch.Tensor] = []
        hook = model.wav2vec2.feature_projection.register_forward_pre_hook(
            lambda _module, args: captured.append(args[0])
        )
        try:
            out = model(input_values, attention_mask=attention_mask, mask_time_indices=mask)
        finally:
            hook.remove()

        num_masked = int(mask.sum())
        logits = contrastive_logits(
            out.projected_states,
            out.projected_quantized_states,
            mask,
            negatives,
            self.logit_temperature,
        )
        target = torch.zeros(num_masked, dtype=torch.long, device=device)
        contrastive = F.cross_entropy(logits, target, reduction="sum") / num_masked

        num_codes = model.config.num_codevector_groups * model.config.num_codevectors_per_group
        perplexity = out.codevector_perplexity
        diversity = (num_codes - perplexity) / num_codes

        cnn_features = captured[0]  # (B, T', C)
        valid = self.frame_mask(model, batch).to(device)
        # fairseq averages over all frames; we skip padding frames (identical without padding).
        feature_penalty = cnn_features.float().pow(2)[valid].mean()

        loss = contrastive + self.diversity_weight * diversity + self.feature_penalty_weight * feature_penalty
        return Wav2Vec2LossOutput(
            loss=loss,
            contrastive=contrastive,
            diversity=diversity,
            feature_penalty=feature_penalty,
            num_masked=num_masked,
            perplexity=perplexity,
            num_examples=int(input_values.shape[0]),
        )


def _unusable_batch(num_examples: int, device: torch.device) -> Wav2Vec2LossOutput:
    nan = torch.tensor(math.nan, device=device)
    return Wav2Vec2LossOutput(
        loss=nan,
        contrastive=nan,
        diversity=nan,
        feature_penalty=nan,
        num_masked=0,
        perplexity=nan,
        num_examples=num_examples,
    )


def contrastive_logits(
    context: torch.Tensor,
    quantized: torch.Tensor,
    mask: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
) -> torch.Tensor:
    """(N, 1+K) logits for the N masked frames: cosine(c_t, [q_t, distractors]) / κ, with
    the positive at index 0 and every distractor identical to the positive set to −inf
    (it would otherwise count as a wrong answer that cannot be told apart)."""
    batch_size, num_frames, dim = quantized.shape
    positives = quantized[mask]  # (N, D)
    distractors = quantized.reshape(batch_size * num_frames, dim)[negatives[mask]]  # (N, K, D)
    candidates = torch.cat([positives[:, None], distractors], dim=1)
    logits = torch.cosine_similarity(context[mask][:, None].float(), candidates.float(), dim=-1) / temperature
    same = (distractors == positives[:, None]).all(-1)
    if same.any():
        logits = torch.cat([logits[:, :1], logits[:, 1:].masked_fill(same, -math.inf)], dim=1)
    return logits
