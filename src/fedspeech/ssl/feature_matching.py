"""BYOL(-A)-style feature matching on the wav2vec 2.0 backbone.

Two augmented crops of the same utterance go through an online network (backbone → mean
pooling over valid frames → projector → predictor) and a target network (EMA copy of
backbone + projector); the loss is 2 − 2·cos(prediction of one view, target of the other),
summed over both directions as in BYOL (Grill et al., 2020; BYOL-A, Niizumi et al., 2021).

Because this method has a predictor, it is the one FedU (docs/methods.md §2) applies to: the
model names its parameter groups by key prefix (online encoder, predictor, backbone, target)
so the server can aggregate encoder + predictor and the client can apply FedU's divergence
rule and ``load_global(state, keep_predictor=...)``.

The MLP heads use LayerNorm, not BatchNorm: federated clients train with batch 4 and may see
a final batch of 1, where BatchNorm fails or is useless.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import Wav2Vec2Config, Wav2Vec2Model

log = logging.getLogger(__name__)

ONLINE_ENCODER_PREFIXES = ("backbone.", "projector.")
PREDICTOR_PREFIXES = ("predictor.",)
BACKBONE_PREFIXES = ("backbone.",)
TARGET_PREFIXES = ("target_backbone.", "target_projector.")


def _mlp(in_dim: int, hidden_dim: int, out_dim: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(in_dim, hidden_dim),
        nn.LayerNorm(hidden_dim),
        nn.ReLU(inplace=True),
        nn.Linear(hidden_dim, out_dim),
    )


class FeatureMatchingModel(nn.Module):
    """Online backbone + projector + predictor, and an EMA target backbone + projector.

    The backbone is ``Wav2Vec2Model(config)`` with the same parameter names as
    ``Wav2Vec2ForPreTraining.wav2vec2``, so backbones can be swapped between the two SSL
    methods and fine-tuned downstream. Its built-in SpecAugment is switched off (on a copy
    of the config): the views are augmented on the waveform instead.
    """

    def __init__(
        self,
        config: Wav2Vec2Config,
        *,
        projector_hidden_dim: int = 1024,
        projection_dim: int = 256,
        predictor_hidden_dim: int = 1024,
    ) -> None:
        super().__init__()
        config = copy.deepcopy(config)
        config.apply_spec_augment = False
        self.config = config
        self.backbone = Wav2Vec2Model(config)
        self.projector = _mlp(config.hidden_size, projector_hidden_dim, projection_dim)
        self.predictor = _mlp(projection_dim, predictor_hidden_dim, projection_dim)
        self.target_backbone = copy.deepcopy(self.backbone)
        self.target_projector = copy.deepcopy(self.projector)
        for p in self._target_params():
            p.requires_grad_(False)

    # -- parameter groups for federated aggregation ------------------------------------
    @staticmethod
    def online_encoder_keys() -> tuple[str, ...]:
        """State-dict key prefixes of the online encoder (backbone + projector)."""
        return ONLINE_ENCODER_PREFIXES

    @staticmethod
    def predictor_keys() -> tuple[str, ...]:
        return PREDICTOR_PREFIXES

    @staticmethod
    def backbone_keys() -> tuple[str, ...]:
        """The part kept for downstream use and sent under backbone-only transmission."""
        return BACKBONE_PREFIXES

    @staticmethod
    def target_keys() -> tuple[str, ...]:
        """The EMA target: never sent, always local."""
        return TARGET_PREFIXES

    def select_state(self, prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """Detached copies of the state-dict entries under ``prefixes``."""
        return {k: v.detach().clone() for k, v in self.state_dict().items() if k.startswith(prefixes)}

    def load_global(self, state: Mapping[str, torch.Tensor], *, keep_predictor: bool) -> list[str]:
        """Load the global model's online-encoder and predictor entries found in ``state``.

        With ``keep_predictor`` the predictor entries are ignored (FedU: divergence above μ
        keeps the local predictor). ``state`` may hold only a subset (e.g. backbone only);
        target entries and unknown keys are refused. Returns the keys loaded.
        """
        own = self.state_dict()
        allowed = ONLINE_ENCODER_PREFIXES + PREDICTOR_PREFIXES
        unknown = [k for k in state if k not in own or not k.startswith(allowed)]
        if unknown:
            raise ValueError(f"load_global: keys not in the online encoder/predictor: {unknown[:5]}")
        chosen = {
            k: torch.as_tensor(v) for k, v in state.items() if not (keep_predictor and k.startswith(PREDICTOR_PREFIXES))
        }
        bad = [k for k, v in chosen.items() if tuple(v.shape) != tuple(own[k].shape)]
        if bad:
            raise ValueError(
                f"load_global: shape mismatch for {bad[0]}: {tuple(chosen[bad[0]].shape)} vs {tuple(own[bad[0]].shape)}"
            )
        self.load_state_dict(chosen, strict=False)
        return sorted(chosen)

    # -- target network -------------------------------------------------------------------
    def _online_params(self) -> list[torch.Tensor]:
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def _target_params(self) -> list[torch.Tensor]:
        return [*self.target_backbone.parameters(), *self.target_projector.parameters()]

    @torch.no_grad()
    def update_target(self, momentum: float) -> None:
        """target ← momentum · target + (1 − momentum) · online; buffers are copied."""
        if not 0.0 <= momentum <= 1.0:
            raise ValueError(f"EMA momentum must be in [0, 1], got {momentum}")
        for t, o in zip(self._target_params(), self._online_params()):
            t.lerp_(o, 1.0 - momentum)
        online_buffers = [*self.backbone.buffers(), *self.projector.buffers()]
        target_buffers = [*self.target_backbone.buffers(), *self.target_projector.buffers()]
        for t, o in zip(target_buffers, online_buffers):
            t.copy_(o)

    @torch.no_grad()
    def reset_target(self) -> None:
        """Make the target an exact copy of the online encoder."""
        self.update_target(0.0)

    # -- forward ----------------------------------------------------------------------------
    def _embed(self, backbone: Wav2Vec2Model, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Utterance embedding: mean of the last hidden states over valid frames."""
        hidden = backbone(input_values, attention_mask=attention_mask).last_hidden_state
        frames = backbone._get_feature_vector_attention_mask(hidden.shape[1], attention_mask)
        weights = frames.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weights).sum(1) / weights.sum(1).clamp_min(1.0)

    def online(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Predictor output of the online network, (B, projection_dim)."""
        embedding = self._embed(self.backbone, input_values, attention_mask)
        return self.predictor(self.projector(embedding))

    @torch.no_grad()
    def target(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Projection of the target network, (B, projection_dim), without gradient."""
        embedding = self._embed(self.target_backbone, input_values, attention_mask)
        return self.target_projector(embedding)

    def embed(self, input_values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Backbone utterance embedding (for probes), (B, hidden_size)."""
        return self._embed(self.backbone, input_values, attention_mask)


@dataclass(frozen=True)
class EmaSchedule:
    """BYOL's target momentum as a function of the global step: ``base`` → 1 by a cosine
    over ``total_steps`` (constant ``base`` when ``total_steps`` is None)."""

    base: float = 0.99
    total_steps: int | None = None

    def __call__(self, step: int) -> float:
        if self.total_steps is None:
            return self.base
        progress = min(step / max(self.total_steps, 1), 1.0)
        return 1.0 - (1.0 - self.base) * (math.cos(math.pi * progress) + 1.0) / 2.0


@dataclass
class FeatureMatchingLossOutput:
    """``cosine``: mean cosine between prediction and target (1 = perfect match);
    ``embedding_std``: mean per-dimension std of the normalised online predictions across
    the batch (≈ 0 means collapse, ≈ 1/sqrt(dim) means spread out)."""

    loss: torch.Tensor
    cosine: torch.Tensor
    embedding_std: torch.Tensor
    num_examples: int

    def logs(self) -> dict[str, float]:
        return {
            "loss": float(self.loss.detach()),
            "cosine": float(self.cosine.detach()),
            "embedding_std": float(self.embedding_std.detach()),
        }


class FeatureMatchingObjective:
    """BYOL loss on two augmented crops of each utterance; ``after_step`` updates the target.

    Augmentations on the raw waveform, cheap by design: two random crops of ``crop_seconds``
    from the same utterance (shorter utterances are used whole), mix-in of another utterance
    of the batch with ratio U(0, ``mix_ratio``) (BYOL-A's mixup, here against the batch
    rather than a memory bank), random gain within ±``gain_db``, and white noise at an SNR
    drawn from ``snr_db``. All draws come from ``rng`` (or the objective's own, ``seed``).
    """

    def __init__(
        self,
        *,
        crop_seconds: float = 1.0,
        sample_rate: int = 16_000,
        mix_ratio: float = 0.4,
        gain_db: float = 6.0,
        snr_db: tuple[float, float] = (10.0, 40.0),
        ema: EmaSchedule | None = None,
        seed: int | None = 0,
    ) -> None:
        if crop_seconds <= 0 or not 0 <= mix_ratio < 1 or snr_db[0] > snr_db[1]:
            raise ValueError("need crop_seconds > 0, 0 <= mix_ratio < 1, snr_db low <= high")
        self.crop_samples = int(round(crop_seconds * sample_rate))
        if self.crop_samples < 400:
            raise ValueError(f"crop_seconds={crop_seconds} gives fewer than 400 samples (one CNN frame)")
        self.mix_ratio = mix_ratio
        self.gain_db = gain_db
        self.snr_db = snr_db
        self.ema = ema if ema is not None else EmaSchedule()
        self.rng = np.random.default_rng(seed)
        self.min_samples = 400  # receptive field of the wav2vec 2.0 CNN: one output frame

    def after_step(self, model: FeatureMatchingModel, step: int) -> None:
        """EMA target update after the optimiser step ``step``."""
        model.update_target(self.ema(step))

    def augment(
        self, input_values: torch.Tensor, lengths: torch.Tensor, rng: np.random.Generator
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One augmented view per utterance: (B, crop) waveforms and their attention mask."""
        batch_size = input_values.shape[0]
        lengths = lengths.cpu().numpy()
        crop_lengths = np.minimum(lengths, self.crop_samples)
        width = int(crop_lengths.max())
        starts = (rng.random(batch_size) * (lengths - crop_lengths + 1)).astype(np.int64)
        positions = torch.from_numpy(starts)[:, None] + torch.arange(width)[None, :]
        valid = torch.arange(width)[None, :] < torch.from_numpy(crop_lengths)[:, None]
        positions = positions.clamp_max(input_values.shape[1] - 1).to(input_values.device)
        valid = valid.to(input_values.device)
        views = torch.gather(input_values, 1, positions) * valid

        def column(values: np.ndarray) -> torch.Tensor:
            return torch.from_numpy(values).to(input_values)[:, None]

        if batch_size > 1 and self.mix_ratio > 0:
            partner = (np.arange(batch_size) + rng.integers(1, batch_size)) % batch_size
            lam = column(rng.uniform(0, self.mix_ratio, batch_size))
            views = (1 - lam) * views + lam * views[torch.from_numpy(partner)] * valid
        views = views * column(10 ** (rng.uniform(-self.gain_db, self.gain_db, batch_size) / 20))
        power = views.pow(2).sum(1, keepdim=True) / valid.sum(1, keepdim=True).clamp_min(1)
        snr = column(rng.uniform(*self.snr_db, batch_size))
        noise_gen = torch.Generator(device=views.device).manual_seed(int(rng.integers(2**63)))
        noise = torch.randn(views.shape, generator=noise_gen, device=views.device, dtype=views.dtype)
        views = (views + noise * (power / 10 ** (snr / 10)).sqrt()) * valid
        return views, valid.long()

    def __call__(
        self,
        model: FeatureMatchingModel,
        batch: Mapping[str, Any],
        rng: np.random.Generator | None = None,
    ) -> FeatureMatchingLossOutput:
        rng = self.rng if rng is None else rng
        device = next(model.parameters()).device
        input_values = batch["input_values"].to(device)
        attention_mask = batch.get("attention_mask")
        if attention_mask is None:
            lengths = torch.full((input_values.shape[0],), input_values.shape[1], device=device)
        else:
            lengths = attention_mask.to(device).long().sum(-1)
        # The CNN needs its receptive field (400 samples) for a single frame; shorter clips
        # are dropped, and a batch of only such clips gets a NaN loss that train_local skips.
        long_enough = lengths >= self.min_samples
        if not long_enough.all():
            log.warning(
                "dropping %d utterance(s) shorter than %d samples from the batch",
                int((~long_enough).sum()),
                self.min_samples,
            )
            if not long_enough.any():
                nan = torch.tensor(math.nan, device=device)
                return FeatureMatchingLossOutput(nan, nan, nan, int(input_values.shape[0]))
            input_values, lengths = input_values[long_enough], lengths[long_enough]
        view1, mask1 = self.augment(input_values, lengths, rng)
        view2, mask2 = self.augment(input_values, lengths, rng)
        # Both views in one forward pass per network: pad to a common width.
        width = max(view1.shape[1], view2.shape[1])
        views = torch.cat([F.pad(v, (0, width - v.shape[1])) for v in (view1, view2)])
        masks = torch.cat([F.pad(m, (0, width - m.shape[1])) for m in (mask1, mask2)])

        predictions = F.normalize(model.online(views, masks), dim=-1)
        targets = F.normalize(model.target(views, masks), dim=-1)
        batch_size = input_values.shape[0]
        # Prediction from view 1 matches target of view 2 and vice versa.
        swapped = torch.cat([targets[batch_size:], targets[:batch_size]])
        cosine = (predictions * swapped).sum(-1)
        loss = (2 - 2 * cosine).view(2, batch_size).sum(0).mean()
        embedding_std = predictions.detach().std(0).mean()
        return FeatureMatchingLossOutput(
            loss=loss,
            cosine=cosine.detach().mean(),
            embedding_std=embedding_std,
            num_examples=batch_size,
        )
