"""Early-exit models on a pretrained SSL speech backbone (docs/methods.md §3).

A client of depth ``d`` runs the CNN feature encoder, the feature projection, the
positional convolution and Transformer layers ``1..d`` only, and trains the heads at the
exits ``<= d``. Any exit can answer at inference (:func:`predict`).

Why the encoder loop is re-run here instead of calling the HF encoder: Hugging Face's
``Wav2Vec2Model`` / ``HubertModel`` / ``WavLMModel`` have no "stop after layer d" switch.
``output_hidden_states=True`` returns every intermediate state but still *computes* every
layer, so a shallow client would pay the full model's compute and memory. We therefore
call the backbone's own sub-modules (feature encoder, projection, ``encoder.pos_conv_embed``,
``encoder.layer_norm``/``dropout``, ``encoder.layers[:d]``) in the same order, with the same
masks, as the HF encoder's ``forward`` in transformers 5.23; a test checks that at full
depth the result equals ``backbone(...).last_hidden_state``.

Parameter groups (what a depth-``d`` client trains and uploads, :meth:`trainable_keys`):
the CNN feature encoder (only if not frozen), the shared trunk every depth runs
(feature projection, positional convolution, encoder layer norm, and the mask embedding
when SpecAugment is on), Transformer layers ``<= d`` and the heads at exits ``<= d``.
"""

from __future__ import annotations

import inspect
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

Task = Literal["classify", "ctc"]
TASKS: tuple[str, ...] = ("classify", "ctc")
SUPPORTED_MODEL_TYPES: tuple[str, ...] = ("wav2vec2", "hubert", "wavlm")

# Parameter groups, see the module docstring.
FEATURE_ENCODER = "feature_encoder"
SHARED = "shared"
UNUSED = "unused"
_SHARED_PREFIXES = (
    "backbone.feature_projection.",
    "backbone.encoder.pos_conv_embed.",
    "backbone.encoder.layer_norm.",
)


def exit_layers(num_layers: int, exits: Sequence[int] | None = None, every: int | None = None) -> tuple[int, ...]:
    """Sorted 1-based exit layers; the last layer is always an exit.

    ``exits=(2, 4)`` names them, ``every=2`` puts one after every 2nd layer; with neither,
    only the last layer exits (a plain model).
    """
    if exits is not None and every is not None:
        raise ValueError("give either exits or every, not both")
    chosen: set[int] = {num_layers}
    if every is not None:
        if every < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        chosen.update(range(every, num_layers + 1, every))
    for layer in exits or ():
        if not 1 <= int(layer) <= num_layers:
            raise ValueError(f"exit {layer} is outside layers 1..{num_layers}")
        chosen.add(int(layer))
    return tuple(sorted(chosen))


class ClassificationHead(nn.Module):
    """Utterance label from masked mean pooling over valid frames, then one linear layer."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
        if frame_mask is None:
            pooled = hidden.mean(dim=1)
        else:
            weights = frame_mask.to(hidden.dtype).unsqueeze(-1)
            pooled = (hidden * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1.0)
        return self.proj(self.dropout(pooled))


class CTCHead(nn.Module):
    """Per-frame token logits for CTC; padded frames are left to the output lengths."""

    def __init__(self, hidden_size: int, num_outputs: int, dropout: float = 0.0) -> None:
        super().__init__()
        self.dropout = nn.Dropout(dropout)
        self.proj = nn.Linear(hidden_size, num_outputs)

    def forward(self, hidden: Tensor, frame_mask: Tensor | None) -> Tensor:
        return self.proj(self.dropout(hidden))


@dataclass
class ExitState:
    """The backbone's representation at one exit, as the head sees it."""

    layer: int
    hidden: Tensor  # (batch, frames, hidden); final-norm applied for pre-LN backbones
    frame_mask: Tensor | None  # (batch, frames) bool, None when nothing is padded
    output_lengths: Tensor  # (batch,) valid frames per utterance


@dataclass
class EarlyExitOutput:
    logits: dict[int, Tensor]  # exit layer -> (batch, classes) or (batch, frames, vocab)
    output_lengths: Tensor  # (batch,) valid frames per utterance (CTC input lengths)
    frame_mask: Tensor | None


class EarlyExitModel(nn.Module):
    """A HF SSL backbone with task heads after chosen Transformer layers.

    ``freeze_feature_encoder`` (default, as in HF fine-tuning recipes) keeps the CNN fixed:
    it is neither trained nor uploaded. ``spec_augment`` applies the backbone config's
    time/feature masking in training; it is off by default because our presets carry
    *pretraining* masking (65 %), which would wreck fine-tuning.
    """

    def __init__(
        self,
        backbone: nn.Module,
        task: Task,
        num_outputs: int,
        exits: Sequence[int] | None = None,
        every: int | None = None,
        freeze_feature_encoder: bool = True,
        spec_augment: bool = False,
        head_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        config: Any = getattr(backbone, "config", None)  # a transformers config (untyped)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(
                f"backbone model_type {model_type!r} is not supported (supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
            )
        if getattr(config, "add_adapter", False):
            raise ValueError(
                "backbones with add_adapter=True are not supported (the adapter "
                "runs after the last layer and changes the frame rate)"
            )
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if num_outputs < 1 or (task == "ctc" and num_outputs < 2):
            raise ValueError(f"num_outputs={num_outputs} is too small for task {task!r}")

        self.backbone = backbone
        self.task: Task = task
        self.num_outputs = int(num_outputs)
        self.num_layers = len(backbone.encoder.layers)
        self.exits = exit_layers(self.num_layers, exits, every)
        self.freeze_feature_encoder = bool(freeze_feature_encoder)
        self.spec_augment = bool(spec_augment)
        # HF's LayerDrop probability, applied in training like HF does; cost measurements
        # set it to 0 so they see every layer of the depth.
        self.layerdrop = float(getattr(config, "layerdrop", 0.0) or 0.0)
        # Post-LN (wav2vec 2.0 base, HuBERT base) normalises before the layers; pre-LN
        # ("stable layer norm", the large models) after the last one. For pre-LN we apply
        # that final norm at every exit, so all exits see normalised features and the
        # deepest exit matches HF's last_hidden_state.
        self.pre_layer_norm = bool(config.do_stable_layer_norm)
        layer_forward = inspect.signature(type(backbone.encoder.layers[0]).forward).parameters
        self._uses_position_bias = "position_bias" in layer_forward  # WavLM
        self._passes_layer_index = "index" in layer_forward  # WavLM post-LN

        head_type = ClassificationHead if task == "classify" else CTCHead
        hidden_size = config.hidden_size
        self.heads = nn.ModuleDict({str(e): head_type(hidden_size, num_outputs, head_dropout) for e in self.exits})
        if self.freeze_feature_encoder:
            self._freeze_cnn()
        self._groups = self._group_keys()

    # ---- construction ----------------------------------------------------------------

    @classmethod
    def build(
        cls,
        name_or_path: str | Path,
        task: Task,
        num_outputs: int,
        exits: Sequence[int] | None = None,
        every: int | None = None,
        config_overrides: Mapping[str, object] | None = None,
        **kwargs: Any,
    ) -> EarlyExitModel:
        """From a preset name (random init) or a local HF checkpoint folder (its weights)."""
        from fedspeech.models.loading import load_backbone

        backbone = load_backbone(name_or_path, **dict(config_overrides or {}))
        return cls(backbone, task, num_outputs, exits=exits, every=every, **kwargs)

    def _freeze_cnn(self) -> None:
        extractor = self.backbone.feature_extractor
        if hasattr(extractor, "_freeze_parameters"):
            extractor._freeze_parameters()  # also stops it from making the input require grad
        else:
            for p in extractor.parameters():
                p.requires_grad = False

    def _group_keys(self) -> dict[str, str]:
        """Map every state-dict key to its group; unknown keys are an error, not a guess."""
        groups: dict[str, str] = {}
        mask_embed_used = self.spec_augment and (getattr(self.backbone.config, "mask_time_prob", 0) > 0)
        for key in self.state_dict():
            if key.startswith("heads."):
                groups[key] = f"head:{key.split('.')[1]}"
            elif key.startswith("backbone.encoder.layers."):
                groups[key] = f"layer:{int(key.split('.')[3]) + 1}"
            elif key.startswith("backbone.feature_extractor."):
                groups[key] = FEATURE_ENCODER
            elif key.startswith(_SHARED_PREFIXES):
                groups[key] = SHARED
            elif key == "backbone.masked_spec_embed":
                groups[key] = SHARED if mask_embed_used else UNUSED
            else:
                raise ValueError(f"state-dict key {key!r} belongs to no known group")
        return groups

    # ---- depth bookkeeping -----------------------------------------------------------

    def check_depth(self, depth: int | None) -> int:
        """``None`` means full depth; a depth must be an exit, else its top layers learn nothing."""
        if depth is None:
            return self.num_layers
        if int(depth) not in self.exits:
            raise ValueError(f"depth {depth} is not an exit layer (exits: {list(self.exits)})")
        return int(depth)

    def exits_upto(self, depth: int | None) -> tuple[int, ...]:
        depth = self.check_depth(depth)
        return tuple(e for e in self.exits if e <= depth)

    def key_group(self, key: str) -> str:
        return self._groups[key]

    def trainable_keys(self, depth: int | None = None, freeze_feature_encoder: bool | None = None) -> list[str]:
        """State-dict keys a depth-``depth`` client trains, hence uploads (in state-dict order)."""
        depth = self.check_depth(depth)
        frozen = freeze_feature_encoder
        if frozen is None:
            frozen = self.freeze_feature_encoder
        keys = []
        for key, group in self._groups.items():
            kind, _, index = group.partition(":")
            if (
                group == SHARED
                or (group == FEATURE_ENCODER and not frozen)
                or (kind in ("layer", "head") and int(index) <= depth)
            ):
                keys.append(key)
        return keys

    def held_keys(self, depth: int | None = None) -> list[str]:
        """Keys a depth-``depth`` client needs in memory: all it runs, frozen CNN included."""
        depth = self.check_depth(depth)
        trained = set(self.trainable_keys(depth, freeze_feature_encoder=False))
        return [k for k in self._groups if k in trained]

    def partial_state_dict(
        self, depth: int | None = None, freeze_feature_encoder: bool | None = None
    ) -> dict[str, Tensor]:
        """Exactly the tensors of :meth:`trainable_keys` (what the client sends)."""
        state = self.state_dict()
        return {k: state[k] for k in self.trainable_keys(depth, freeze_feature_encoder)}

    def freeze_beyond(self, depth: int | None) -> None:
        """Make ``requires_grad`` match :meth:`trainable_keys` for this depth."""
        trainable = set(self.trainable_keys(depth))
        for name, param in self.named_parameters():
            param.requires_grad = name in trainable
        extractor = self.backbone.feature_extractor
        if hasattr(extractor, "_requires_grad"):
            extractor._requires_grad = not self.freeze_feature_encoder

    # ---- forward ---------------------------------------------------------------------

    def cnn_features(self, input_values: Tensor) -> Tensor:
        """The CNN feature encoder's output, (batch, frames, conv channels).

        With a frozen CNN this is a fixed function of the audio, so a client may compute it
        once per utterance and pass it back as ``features`` (``FrozenFeatureCache``).
        """
        if input_values.dim() != 2:
            raise ValueError(f"input_values must be (batch, samples), got shape {tuple(input_values.shape)}")
        return self.backbone.feature_extractor(input_values).transpose(1, 2)

    def iter_exit_states(
        self,
        input_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        depth: int | None = None,
        *,
        features: Tensor | None = None,
        frame_lengths: Tensor | None = None,
    ) -> Iterator[ExitState]:
        """Yield the representation at each exit ``<= depth``, computing layers lazily.

        Stopping the iteration stops the computation: layers after the last consumed exit
        never run. Mirrors ``Wav2Vec2Model.forward`` + ``Wav2Vec2Encoder(StableLayerNorm)
        .forward`` (and the HuBERT/WavLM copies) of transformers 5.23.

        Either audio (``input_values``, optional sample ``attention_mask``) or precomputed
        :meth:`cnn_features` (``features``, optional valid ``frame_lengths`` per item when
        they are padded) goes in.
        """
        depth = self.check_depth(depth)
        backbone = self.backbone
        encoder = backbone.encoder

        if (input_values is None) == (features is None):
            raise ValueError("pass either input_values or features")
        if features is not None:
            frame_mask, output_lengths = _frame_mask(features, frame_lengths)
        else:
            features = self.cnn_features(input_values)
            num_frames = features.shape[1]
            if attention_mask is None:
                frame_mask = None
                output_lengths = torch.full((features.shape[0],), num_frames, dtype=torch.long, device=features.device)
            else:
                frame_mask = backbone._get_feature_vector_attention_mask(num_frames, attention_mask)
                output_lengths = backbone._get_feat_extract_output_lengths(attention_mask.sum(-1)).to(torch.long)

        projected = backbone.feature_projection(features)
        # wav2vec 2.0 and WavLM return (projected, normed features); HuBERT the tensor only.
        hidden = projected[0] if isinstance(projected, tuple) else projected
        if self.spec_augment:
            hidden = backbone._mask_hidden_states(hidden, attention_mask=frame_mask)

        if frame_mask is not None:  # padded frames enter the encoder as zeros
            hidden = hidden.masked_fill(~frame_mask.unsqueeze(-1), 0.0)
        if self._uses_position_bias:
            # WavLM feeds the 2-D frame mask straight to torch's multi-head attention.
            layer_mask = frame_mask
        else:
            from transformers.masking_utils import create_bidirectional_mask

            layer_mask = create_bidirectional_mask(
                config=backbone.config, inputs_embeds=hidden, attention_mask=frame_mask
            )

        hidden = hidden + encoder.pos_conv_embed(hidden)
        if not self.pre_layer_norm:
            hidden = encoder.layer_norm(hidden)
        hidden = encoder.dropout(hidden)

        position_bias = None
        for index, layer in enumerate(encoder.layers[:depth]):
            if not self._drop_layer(index):
                hidden, position_bias = self._run_layer(layer, index, hidden, layer_mask, position_bias)
            number = index + 1
            if number in self.exits:
                exit_hidden = encoder.layer_norm(hidden) if self.pre_layer_norm else hidden
                yield ExitState(number, exit_hidden, frame_mask, output_lengths)

    def _drop_layer(self, index: int) -> bool:
        """LayerDrop as HF applies it in training (WavLM never drops layer 0: it owns the bias)."""
        if not self.training or self.layerdrop <= 0.0:
            return False
        if self._uses_position_bias and index == 0:
            return False
        return bool(torch.rand([]) < self.layerdrop)

    def _run_layer(
        self,
        layer: nn.Module,
        index: int,
        hidden: Tensor,
        layer_mask: Tensor | None,
        position_bias: Tensor | None,
    ) -> tuple[Tensor, Tensor | None]:
        if not self._uses_position_bias:
            out = layer(hidden, attention_mask=layer_mask)
            return (out[0] if isinstance(out, tuple) else out), None
        extra = {"index": index} if self._passes_layer_index else {}
        out, position_bias = layer(hidden, attention_mask=layer_mask, position_bias=position_bias, **extra)
        return out, position_bias

    def exit_hidden_states(
        self, input_values: Tensor, attention_mask: Tensor | None = None, depth: int | None = None
    ) -> dict[int, Tensor]:
        """Exit layer -> (batch, frames, hidden) for every exit ``<= depth``."""
        return {s.layer: s.hidden for s in self.iter_exit_states(input_values, attention_mask, depth)}

    def head_logits(self, state: ExitState) -> Tensor:
        return self.heads[str(state.layer)](state.hidden, state.frame_mask)

    def forward(
        self,
        input_values: Tensor | None = None,
        attention_mask: Tensor | None = None,
        depth: int | None = None,
        *,
        features: Tensor | None = None,
        frame_lengths: Tensor | None = None,
    ) -> EarlyExitOutput:
        logits: dict[int, Tensor] = {}
        output_lengths = frame_mask = None
        states = self.iter_exit_states(
            input_values, attention_mask, depth, features=features, frame_lengths=frame_lengths
        )
        for state in states:
            logits[state.layer] = self.head_logits(state)
            output_lengths, frame_mask = state.output_lengths, state.frame_mask
        assert output_lengths is not None  # check_depth guarantees at least one exit
        return EarlyExitOutput(logits, output_lengths, frame_mask)


def _frame_mask(features: Tensor, frame_lengths: Tensor | None) -> tuple[Tensor | None, Tensor]:
    """(frame mask or None when nothing is padded, output lengths) of padded CNN features."""
    if features.dim() != 3:
        raise ValueError(f"features must be (batch, frames, channels), got {tuple(features.shape)}")
    batch, num_frames = features.shape[:2]
    if frame_lengths is None:
        return None, torch.full((batch,), num_frames, dtype=torch.long, device=features.device)
    lengths = frame_lengths.to(device=features.device, dtype=torch.long)
    if lengths.shape != (batch,) or bool((lengths < 1).any()) or bool((lengths > num_frames).any()):
        raise ValueError(f"frame_lengths must be {batch} lengths in 1..{num_frames}, got {lengths.tolist()}")
    mask = torch.arange(num_frames, device=features.device)[None, :] < lengths[:, None]
    return mask, lengths


# ---- loss --------------------------------------------------------------------------


def _exit_weights(exits: Sequence[int], weights: Mapping[int, float] | Sequence[float] | None) -> dict[int, float]:
    if weights is None:
        return {e: 1.0 for e in exits}
    if isinstance(weights, Mapping):
        missing = [e for e in exits if e not in weights]
        if missing:
            raise ValueError(f"weights has no entry for exits {missing}")
        return {e: float(weights[e]) for e in exits}
    if len(weights) != len(exits):
        raise ValueError(f"{len(weights)} weights for {len(exits)} exits")
    return dict(zip(exits, map(float, weights)))


def _valid_frames(logits: Tensor, output_lengths: Tensor | None) -> Tensor:
    frames = torch.arange(logits.shape[1], device=logits.device)
    if output_lengths is None:
        return torch.ones(logits.shape[:2], dtype=torch.bool, device=logits.device)
    return frames.unsqueeze(0) < output_lengths.to(logits.device).unsqueeze(1)


def _task_loss(logits: Tensor, targets: Tensor, task: Task, output_lengths: Tensor | None, blank: int) -> Tensor:
    if task == "classify":
        return F.cross_entropy(logits, targets)
    # HF convention: targets padded with negative values (-100); blank is `blank`.
    valid = targets >= 0
    input_lengths = (
        output_lengths
        if output_lengths is not None
        else torch.full((logits.shape[0],), logits.shape[1], dtype=torch.long)
    )
    log_probs = logits.log_softmax(dim=-1).transpose(0, 1)  # (frames, batch, vocab)
    with torch.backends.cudnn.flags(enabled=False):  # cuDNN CTC has extra restrictions
        return F.ctc_loss(
            log_probs,
            targets.masked_select(valid),
            input_lengths.to(torch.long),
            valid.sum(-1),
            blank=blank,
            reduction="mean",
            zero_infinity=True,
        )


def _kl(teacher_log_probs: Tensor, student_log_probs: Tensor, frame_weights: Tensor | None) -> Tensor:
    """KL(p_teacher ‖ p_student) per item (classify) or per valid frame (CTC), averaged."""
    per_position = (teacher_log_probs.exp() * (teacher_log_probs - student_log_probs)).sum(-1)
    if frame_weights is None:
        return per_position.mean()
    return (per_position * frame_weights).sum() / frame_weights.sum().clamp(min=1.0)


def early_exit_loss(
    logits_by_exit: Mapping[int, Tensor],
    targets: Tensor,
    task: Task,
    weights: Mapping[int, float] | Sequence[float] | None = None,
    distill_lambda: float = 0.0,
    temperature: float = 1.0,
    output_lengths: Tensor | None = None,
    blank: int = 0,
) -> Tensor:
    """Σ_i w_i (L_i + λ/(E−1) Σ_{j≠i} T² KL(p_j.detach() ‖ p_i)) over the client's E exits.

    ``L_i`` is cross-entropy (``classify``, integer targets) or CTC (``ctc``, targets padded
    with -100, ``output_lengths`` = valid frames). The DepthFL self-distillation term uses
    softmax(z / T) and the usual T² factor (1 at the default T = 1); for CTC it is computed
    per frame over valid frames only. Computed in float32 so mixed-precision logits are safe.
    """
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if not logits_by_exit:
        raise ValueError("no exit logits given")
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    exits = sorted(logits_by_exit)
    logits = {e: logits_by_exit[e].float() for e in exits}
    exit_weight = _exit_weights(exits, weights)
    use_distill = distill_lambda > 0.0 and len(exits) > 1

    if use_distill:
        soft = {e: (logits[e] / temperature).log_softmax(dim=-1) for e in exits}
        frame_weights = _valid_frames(logits[exits[0]], output_lengths).float() if task == "ctc" else None
    total = logits[exits[0]].new_zeros(())
    for i in exits:
        term = _task_loss(logits[i], targets, task, output_lengths, blank)
        if use_distill:
            kl = sum(_kl(soft[j].detach(), soft[i], frame_weights) for j in exits if j != i)
            term = term + distill_lambda / (len(exits) - 1) * temperature**2 * kl
        total = total + exit_weight[i] * term
    return total


# ---- inference-time exit policies ----------------------------------------------------


@dataclass(frozen=True)
class FixedExit:
    """Always answer from this exit (e.g. the deepest one a device can afford)."""

    layer: int


@dataclass(frozen=True)
class ConfidenceExit:
    """Answer from the first exit whose confidence reaches ``threshold``.

    Confidence of an utterance: its max softmax probability (classify), or the mean over
    valid frames of the per-frame max probability (CTC).
    """

    threshold: float

    def confidence(self, logits: Tensor, output_lengths: Tensor | None = None) -> Tensor:
        top = logits.float().softmax(dim=-1).amax(dim=-1)
        if top.dim() == 1:
            return top
        valid = _valid_frames(logits, output_lengths).float()
        return (top * valid).sum(-1) / valid.sum(-1).clamp(min=1.0)

    def select(
        self, logits_by_exit: Mapping[int, Tensor], output_lengths: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """(chosen exit per item, its logits) from computed exits; the deepest is the fallback."""
        exits = sorted(logits_by_exit)
        first = logits_by_exit[exits[0]]
        chosen_exit = torch.full((first.shape[0],), exits[-1], dtype=torch.long, device=first.device)
        chosen_logits = logits_by_exit[exits[-1]].clone()
        decided = torch.zeros(first.shape[0], dtype=torch.bool, device=first.device)
        for e in exits:
            take = ~decided & (self.confidence(logits_by_exit[e], output_lengths) >= self.threshold)
            chosen_exit[take] = e
            chosen_logits[take] = logits_by_exit[e][take]
            decided |= take
        return chosen_exit, chosen_logits


@dataclass
class Prediction:
    logits: Tensor  # (batch, classes) or (batch, frames, vocab)
    exit_layer: Tensor  # (batch,) exit that answered each item
    output_lengths: Tensor  # (batch,)
    layers_run: int  # Transformer layers actually computed


def _batch_inputs(batch: Tensor | Mapping[str, Tensor]) -> tuple[Tensor, Tensor | None]:
    if isinstance(batch, Tensor):
        return batch, None
    if "input_values" not in batch:
        raise ValueError("batch has no 'input_values'")
    return batch["input_values"], batch.get("attention_mask")


@torch.no_grad()
def predict(
    model: EarlyExitModel,
    batch: Tensor | Mapping[str, Tensor],
    policy: FixedExit | ConfidenceExit,
    max_depth: int | None = None,
) -> Prediction:
    """Answer with an exit policy, never running layers beyond what the answer needs.

    ``max_depth`` is the deepest exit the device may run (default: the whole model).
    ``FixedExit`` stops at its layer. ``ConfidenceExit`` adds layers exit by exit and stops
    as soon as every item in the batch is confident, else at the deepest allowed exit.
    Runs in eval mode (restoring the previous mode afterwards).
    """
    max_depth = model.check_depth(max_depth)
    input_values, attention_mask = _batch_inputs(batch)
    if isinstance(policy, FixedExit):
        if policy.layer not in model.exits or policy.layer > max_depth:
            raise ValueError(
                f"FixedExit({policy.layer}) is not an exit <= max_depth {max_depth} (exits: {list(model.exits)})"
            )
        stop = policy.layer
    elif isinstance(policy, ConfidenceExit):
        stop = max_depth
    else:
        raise TypeError(f"unknown exit policy {policy!r}")

    was_training = model.training
    model.eval()
    try:
        chosen_exit = chosen_logits = decided = None
        state = None
        for state in model.iter_exit_states(input_values, attention_mask, stop):
            if isinstance(policy, FixedExit) and state.layer != stop:
                continue  # fixed exit: skip the heads of shallower exits
            logits = model.head_logits(state)
            if chosen_logits is None:
                chosen_logits = logits.clone()
                chosen_exit = torch.full((logits.shape[0],), state.layer, dtype=torch.long, device=logits.device)
                decided = torch.zeros(logits.shape[0], dtype=torch.bool, device=logits.device)
            assert chosen_exit is not None and decided is not None  # set with chosen_logits
            if isinstance(policy, FixedExit) or state.layer == stop:
                take = ~decided  # fixed exit, or the deepest allowed fallback
            else:
                confidence = policy.confidence(logits, state.output_lengths)
                take = ~decided & (confidence >= policy.threshold)
            chosen_logits[take] = logits[take]
            chosen_exit[take] = state.layer
            decided |= take
            if bool(decided.all()):
                break  # stops the generator: deeper layers never run
    finally:
        model.train(was_training)
    assert state is not None and chosen_logits is not None
    return Prediction(chosen_logits, chosen_exit, state.output_lengths, state.layer)


# ---- compute per depth -------------------------------------------------------------


def synthetic_batch(
    model: EarlyExitModel, seconds: float, batch: int, sample_rate: int = 16_000, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Random audio and targets of the right kind, for measuring a training step."""
    samples = int(round(seconds * sample_rate))
    if samples < 400 or batch < 1:
        raise ValueError(f"need batch >= 1 and at least 400 samples, got {batch} x {samples}")
    generator = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    audio = torch.randn(batch, samples, generator=generator).to(device)
    if model.task == "classify":
        targets = torch.randint(0, model.num_outputs, (batch,), generator=generator)
    else:
        frames = int(model.backbone._get_feat_extract_output_lengths(samples))
        targets = torch.randint(1, model.num_outputs, (batch, max(1, frames // 4)), generator=generator)
    return audio, targets.to(device)


def training_step_loss(
    model: EarlyExitModel, inputs: Tensor, targets: Tensor, depth: int, cached_cnn: bool = False
) -> Tensor:
    """The loss of one depth-``depth`` training step (all the client's exits, no distillation).

    ``inputs`` is audio, or with ``cached_cnn`` the CNN features computed beforehand
    (:func:`step_inputs`), as a client with a ``FrozenFeatureCache`` trains.
    """
    out = model(features=inputs, depth=depth) if cached_cnn else model(inputs, depth=depth)
    return early_exit_loss(out.logits, targets, model.task, output_lengths=out.output_lengths)


def step_inputs(model: EarlyExitModel, audio: Tensor, cached_cnn: bool) -> Tensor:
    """What a step starts from: the audio, or its frozen CNN's features (computed here,
    outside any FLOP count: a cached client computed them once, before its steps)."""
    if not cached_cnn:
        return audio
    if not model.freeze_feature_encoder:
        raise ValueError("cached CNN features need a frozen feature encoder")
    with torch.no_grad():
        return model.cnn_features(audio)


@contextmanager
def measuring(model: EarlyExitModel) -> Iterator[None]:
    """Train mode without LayerDrop, and the model's ``.grad`` values restored afterwards."""
    saved_grads = {name: p.grad for name, p in model.named_parameters()}
    was_training, layerdrop = model.training, model.layerdrop
    model.train()
    model.layerdrop = 0.0
    try:
        yield
    finally:
        model.train(was_training)
        model.layerdrop = layerdrop
        for name, p in model.named_parameters():
            p.grad = saved_grads[name]


def training_flops(
    model: EarlyExitModel,
    depth: int,
    seconds: float,
    batch: int,
    sample_rate: int = 16_000,
    cached_cnn: bool = False,
) -> int:
    """FLOPs (2 per multiply-add) of forward + backward of one depth-``depth`` step.

    Counted on random input by torch's ``FlopCounterMode`` with the profiler's corrected
    formulas (``models.accounting.flop_counter``), in train mode with LayerDrop off; the
    model's mode and existing ``.grad`` values are restored.
    ``cached_cnn``: the step starts from precomputed CNN features (their cost not counted).
    """
    from fedspeech.models.accounting import flop_counter

    depth = model.check_depth(depth)
    audio, targets = synthetic_batch(model, seconds, batch, sample_rate)
    inputs = step_inputs(model, audio, cached_cnn)
    counter = flop_counter()
    with measuring(model), counter:
        training_step_loss(model, inputs, targets, depth, cached_cnn).backward()
    return int(counter.get_total_flops())
