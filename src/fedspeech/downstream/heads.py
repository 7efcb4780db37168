"""Downstream models: a speech backbone plus a small task head.

``CTCModel`` (character ASR) is a thin wrapper around transformers' ``AutoModelForCTC``
(``Wav2Vec2ForCTC`` for our presets). We build on it rather than writing our own
backbone + linear + ``ctc_loss``: it already has exactly that (final dropout, linear
``lm_head``, ``ctc_loss`` with output lengths from ``_get_feat_extract_output_lengths`` of
the attention mask, ``zero_infinity``), it loads the backbone of any local checkpoint
folder (our pretraining checkpoints are ``Wav2Vec2ForPreTraining`` folders; HuBERT and
WavLM folders map to their own CTC class), and it keeps the HF SpecAugment used in
fine-tuning. The wrapper adds the character vocabulary and the freezing/param-group
options shared with the classifier.

``UtteranceClassifier`` (keyword spotting, speaker ID) has no HF equivalent that pools
only over valid frames of a padded batch with an optional learned layer mix (SUPERB's
weighted sum), so it is written here.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModelForCTC, PreTrainedModel

from fedspeech.data.manifest import Utterance
from fedspeech.downstream.text import CharVocab, ctc_greedy_decode, pad_targets
from fedspeech.models.configs import PRESETS, model_config
from fedspeech.models.loading import from_pretrained, load_backbone

# SpecAugment-style time masking during fine-tuning (HF's fine-tuning default). Our presets
# and pretraining checkpoints carry the pretraining value 0.65, far too strong here.
FINETUNE_MASK_TIME_PROB = 0.05


def is_preset(source: str | Path) -> bool:
    return str(source) in PRESETS


def _check_source(source: str | Path) -> Path:
    folder = Path(source)
    if not (folder / "config.json").is_file():
        raise ValueError(
            f"backbone {str(source)!r}: not a preset ({', '.join(PRESETS)}) and no config.json in that folder"
        )
    return folder


def wants_normalized_audio(source: str | Path) -> bool:
    """Whether inputs should be zero-mean/unit-variance per utterance.

    Only a folder whose ``preprocessor_config.json`` says ``do_normalize`` (e.g. HF's
    wav2vec 2.0 large checkpoints) gets it; our own pretraining never normalises, so
    presets and our checkpoints must not either.
    """
    if is_preset(source):
        return False
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        return False
    return bool(json.loads(path.read_text(encoding="utf-8")).get("do_normalize", False))


def backbone_of(model: nn.Module) -> nn.Module:
    """The bare speech encoder inside any of our models or any HF speech model."""
    if isinstance(model, DownstreamModel):
        return model.backbone
    base = getattr(model, "base_model", None)  # HF: e.g. Wav2Vec2ForPreTraining.wav2vec2
    return base if isinstance(base, nn.Module) else model


def frame_mask(backbone: nn.Module, num_frames: int, attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor:
    """(B, frames) bool, True on frames computed from real (non-padding) samples."""
    if attention_mask is None:
        return torch.ones(batch, num_frames, dtype=torch.bool)
    return backbone._get_feature_vector_attention_mask(num_frames, attention_mask).bool()


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over valid frames: (B, T, D), (B, T) -> (B, D); padding frames never count."""
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp_min(1.0)


@dataclass
class ModelOutput:
    logits: torch.Tensor
    loss: torch.Tensor | None = None
    lengths: torch.Tensor | None = None  # valid output frames per row (CTC only)


class DownstreamModel(nn.Module):
    """What the training loop and the federated client rely on: freezing options, the
    backbone/head parameter split, ``targets(utterances)`` and ``forward(...)->ModelOutput``."""

    backbone_frozen: bool = False

    @property
    def backbone(self) -> nn.Module:
        raise NotImplementedError

    def targets(self, utterances: Sequence[Utterance]) -> torch.Tensor:
        raise NotImplementedError

    def freeze_feature_encoder(self) -> None:
        """Freeze the CNN feature encoder (standard for wav2vec 2.0 fine-tuning)."""
        backbone = self.backbone
        if hasattr(backbone, "freeze_feature_encoder"):
            backbone.freeze_feature_encoder()
        else:
            backbone.feature_extractor.requires_grad_(False)

    def freeze_backbone(self) -> None:
        """Freeze the whole backbone (linear probe); it then also stays in eval mode, so
        dropout and SpecAugment do not perturb the frozen features."""
        self.backbone.requires_grad_(False)
        self.backbone_frozen = True
        self.backbone.eval()

    def train(self, mode: bool = True) -> DownstreamModel:
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def backbone_parameters(self) -> list[nn.Parameter]:
        return list(self.backbone.parameters())

    def head_parameters(self) -> list[nn.Parameter]:
        in_backbone = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in in_backbone]


class CTCModel(DownstreamModel):
    """Character CTC ASR on any HF CTC model (see module docstring for why HF's)."""

    def __init__(self, hf_model: PreTrainedModel, vocab: CharVocab):
        super().__init__()
        if hf_model.config.vocab_size != len(vocab):
            raise ValueError(f"CTC head has {hf_model.config.vocab_size} outputs but the vocabulary has {len(vocab)}")
        self.hf = hf_model
        self.vocab = vocab

    @classmethod
    def build(
        cls,
        source: str | Path,
        vocab: CharVocab,
        *,
        freeze_feature_encoder: bool = True,
        freeze_backbone: bool = False,
        mask_time_prob: float = FINETUNE_MASK_TIME_PROB,
        **config_overrides: Any,
    ) -> CTCModel:
        settings = dict(
            vocab_size=len(vocab),
            pad_token_id=vocab.blank_id,  # HF uses pad_token_id as the CTC blank
            ctc_loss_reduction="mean",
            ctc_zero_infinity=True,  # an utterance too short for its transcript adds 0, not inf
            mask_time_prob=mask_time_prob,
            **config_overrides,
        )
        if is_preset(source):
            hf = AutoModelForCTC.from_config(model_config(source, **settings))
        else:
            hf = from_pretrained(
                AutoModelForCTC,
                _check_source(source),
                new_parts=("lm_head.",),
                ignore_mismatched_sizes=True,
                **settings,
            )
        model = cls(hf, vocab)
        if freeze_feature_encoder:
            model.freeze_feature_encoder()
        if freeze_backbone:
            model.freeze_backbone()
        return model

    @property
    def backbone(self) -> nn.Module:
        return self.hf.base_model

    def targets(self, utterances: Sequence[Utterance]) -> torch.Tensor:
        return pad_targets([self.vocab.encode(u.transcript) for u in utterances])

    def output_lengths(self, attention_mask: torch.Tensor | None, input_values: torch.Tensor) -> torch.Tensor:
        samples = (
            attention_mask.sum(-1)
            if attention_mask is not None
            else torch.full((input_values.shape[0],), input_values.shape[1], dtype=torch.long)
        )
        return self.hf._get_feat_extract_output_lengths(samples).long()

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> ModelOutput:
        out = self.hf(input_values, attention_mask=attention_mask, labels=targets)
        return ModelOutput(out.logits, out.loss, self.output_lengths(attention_mask, input_values))

    @torch.no_grad()
    def transcribe(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        out = self(input_values, attention_mask)
        return [self.vocab.decode(ids) for ids in ctc_greedy_decode(out.logits, out.lengths, self.vocab.blank_id)]


class UtteranceClassifier(DownstreamModel):
    """Backbone → (weighted sum of layers) → mean over valid frames → dropout → linear.

    ``target_field`` is the Utterance attribute holding the class: ``"label"`` for keyword
    spotting, ``"speaker"`` for speaker identification.
    """

    def __init__(
        self,
        backbone: PreTrainedModel,
        labels: Sequence[str],
        *,
        target_field: str = "label",
        layer_weighted: bool = False,
        dropout: float = 0.1,
    ):
        super().__init__()
        if len(labels) < 2 or len(set(labels)) != len(labels):
            raise ValueError(f"classifier needs at least 2 distinct labels, got {list(labels)[:10]}")
        if target_field not in ("label", "speaker"):
            raise ValueError(f"target_field must be 'label' or 'speaker', got {target_field!r}")
        self.speech_model = backbone
        self.labels = list(labels)
        self.target_field = target_field
        self._index = {label: i for i, label in enumerate(self.labels)}
        num_states = backbone.config.num_hidden_layers + 1  # embeddings + every layer
        self.layer_weights = nn.Parameter(torch.zeros(num_states)) if layer_weighted else None
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(backbone.config.hidden_size, len(self.labels))

    @classmethod
    def build(
        cls,
        source: str | Path,
        labels: Sequence[str],
        *,
        target_field: str = "label",
        layer_weighted: bool = False,
        freeze_feature_encoder: bool = True,
        freeze_backbone: bool = False,
        mask_time_prob: float = 0.0,
        dropout: float = 0.1,
        **config_overrides: Any,
    ) -> UtteranceClassifier:
        """``mask_time_prob`` defaults to 0: a 1 s keyword has ~49 frames and HF's minimum of
        two 10-frame masks would hide up to 40% of it."""
        backbone = load_backbone(source, mask_time_prob=mask_time_prob, **config_overrides)
        model = cls(backbone, labels, target_field=target_field, layer_weighted=layer_weighted, dropout=dropout)
        if freeze_feature_encoder:
            model.freeze_feature_encoder()
        if freeze_backbone:
            model.freeze_backbone()
        return model

    @property
    def backbone(self) -> nn.Module:
        return self.speech_model

    def targets(self, utterances: Sequence[Utterance]) -> torch.Tensor:
        ids = []
        for utt in utterances:
            name = getattr(utt, self.target_field)
            if name not in self._index:
                raise ValueError(f"utterance {utt.id}: {self.target_field} {name!r} is not one of the model's labels")
            ids.append(self._index[name])
        return torch.tensor(ids, dtype=torch.long)

    def forward(
        self,
        input_values: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        targets: torch.Tensor | None = None,
    ) -> ModelOutput:
        out = self.backbone(
            input_values, attention_mask=attention_mask, output_hidden_states=self.layer_weights is not None
        )
        if self.layer_weights is None:
            hidden = out.last_hidden_state
        else:
            stacked = torch.stack(out.hidden_states, dim=0)  # (L+1, B, T, D)
            weights = torch.softmax(self.layer_weights, dim=0).view(-1, 1, 1, 1)
            hidden = (weights * stacked).sum(dim=0)
        mask = frame_mask(self.backbone, hidden.shape[1], attention_mask, hidden.shape[0]).to(hidden.device)
        logits = self.head(self.dropout(masked_mean(hidden, mask)))
        loss = None if targets is None else F.cross_entropy(logits, targets.to(logits.device))
        return ModelOutput(logits, loss)

    @torch.no_grad()
    def predict(self, input_values: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[str]:
        logits = self(input_values, attention_mask).logits
        return [self.labels[i] for i in logits.argmax(dim=-1).tolist()]


def param_groups(model: DownstreamModel, lr_backbone: float, lr_head: float) -> list[dict]:
    """Two optimiser groups, backbone and head, each with its own learning rate; frozen
    parameters are left out, and so is a group with nothing trainable."""
    groups = []
    for name, params, lr in (
        ("backbone", model.backbone_parameters(), lr_backbone),
        ("head", model.head_parameters(), lr_head),
    ):
        trainable = [p for p in params if p.requires_grad]
        if trainable:
            groups.append({"name": name, "params": trainable, "lr": lr})
    if not groups:
        raise ValueError("model has no trainable parameters")
    return groups


def make_optimizer(
    model: DownstreamModel, lr_backbone: float, lr_head: float, weight_decay: float = 0.0
) -> torch.optim.AdamW:
    return torch.optim.AdamW(param_groups(model, lr_backbone, lr_head), weight_decay=weight_decay)
