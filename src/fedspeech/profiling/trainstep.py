"""The workload we profile: one wav2vec 2.0 *pretraining* step on synthetic audio.

A step is what a federated client repeats: forward of ``Wav2Vec2ForPreTraining`` with the
paper's span masking and sampled negatives, HF's contrastive + diversity loss, backward,
and an AdamW update. Models are randomly initialised from a config: nothing downloads.
Architectures without a pretraining head in transformers (HuBERT, WavLM) are built with
``AutoModel`` and trained on a surrogate loss (mean square of the masked model's output),
which runs the same forward and backward through every layer; they have no quantizer.
"""

from __future__ import annotations

import copy
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from fedspeech.models.configs import model_config
from fedspeech.profiling.savers import Savers, StepInBackward, apply_model_savers, check_precision

SAMPLE_RATE = 16_000
# Span masking of docs/methods.md §1, used whatever the checkpoint's (fine-tuning) config says.
MASK_PROB, MASK_LENGTH, MIN_MASKS = 0.65, 10, 2
AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def build_model(name_or_path: str | Path) -> nn.Module:
    """A randomly initialised pretraining model for a preset name or a local HF folder."""
    from transformers import AutoModel, Wav2Vec2ConformerForPreTraining, Wav2Vec2ForPreTraining

    config = model_config(name_or_path)
    pretraining_classes = {
        "wav2vec2": Wav2Vec2ForPreTraining,
        "wav2vec2-conformer": Wav2Vec2ConformerForPreTraining,
    }
    model_class = pretraining_classes.get(config.model_type)
    model = model_class(config) if model_class else AutoModel.from_config(config)
    if not hasattr(model, "_get_feat_extract_output_lengths"):
        raise ValueError(f"model {name_or_path!r}: {config.model_type} is not a raw-audio (wav2vec2-family) model")
    return model


def has_pretraining_head(model: nn.Module) -> bool:
    return hasattr(model, "quantizer")


@dataclass
class SyntheticBatch:
    """Random audio plus the masking inputs of one pretraining step."""

    input_values: torch.Tensor
    mask_time_indices: torch.Tensor
    sampled_negative_indices: torch.Tensor | None

    def to(self, device: torch.device | str) -> SyntheticBatch:
        negatives = self.sampled_negative_indices
        return SyntheticBatch(
            self.input_values.to(device),
            self.mask_time_indices.to(device),
            None if negatives is None else negatives.to(device),
        )

    @property
    def frames(self) -> int:
        return int(self.mask_time_indices.shape[1])


def synthetic_batch(model: nn.Module, batch: int, seconds: float, seed: int = 0) -> SyntheticBatch:
    """Seeded random audio of ``seconds`` and the masking/negatives HF's helpers draw for it."""
    from transformers.models.wav2vec2.modeling_wav2vec2 import _compute_mask_indices, _sample_negative_indices

    if batch < 1:
        raise ValueError(f"batch must be >= 1, got {batch}")
    samples = int(round(seconds * SAMPLE_RATE))
    frames = int(model._get_feat_extract_output_lengths(torch.tensor(samples)))
    if frames < MASK_LENGTH + 1:
        raise ValueError(f"seconds={seconds:g} is too short: {frames} frames, need > {MASK_LENGTH}")
    generator = torch.Generator().manual_seed(seed)
    audio = 0.1 * torch.randn(batch, samples, generator=generator)
    state = np.random.get_state()  # HF's mask helpers draw from numpy's global generator
    np.random.seed(seed)
    try:
        mask = _compute_mask_indices((batch, frames), mask_prob=MASK_PROB, mask_length=MASK_LENGTH, min_masks=MIN_MASKS)
        negatives = None
        if has_pretraining_head(model):
            negatives = torch.from_numpy(
                _sample_negative_indices((batch, frames), model.config.num_negatives, mask_time_indices=mask)
            )
    finally:
        np.random.set_state(state)
    return SyntheticBatch(audio, torch.from_numpy(mask), negatives)


class TrainStep:
    """One pretraining step of a model with savers and a precision; call it to run it.

    Keeps its own copy of the model and its AdamW state, so steps are steady-state after the
    first call (the optimizer state exists, gradients are freed with ``set_to_none``).
    ``copy_model=False`` trains ``template`` itself: a process-memory benchmark must not
    hold a second copy of the weights.
    """

    def __init__(
        self,
        template: nn.Module,
        precision: str = "fp32",
        savers: Savers = Savers(),
        device_type: str = "cpu",
        copy_model: bool = True,
    ) -> None:
        self.precision = check_precision(savers.effective_precision(precision))
        self.savers = savers
        self.device = torch.device(device_type)
        self.model = (copy.deepcopy(template) if copy_model else template).to(self.device).train()
        apply_model_savers(self.model, savers)
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        fp16 = self.precision == "fp16"
        self.optimizer: torch.optim.Optimizer | StepInBackward
        if savers.adam_bf16 and not savers.step_in_backward:
            raise ValueError("saver adam-bf16 needs step-in-backward (it is that optimizer's option)")
        if savers.step_in_backward:
            if fp16:
                raise ValueError("saver step-in-backward cannot run with fp16: loss scaling needs every gradient first")
            self.optimizer = StepInBackward(trainable, lr=1e-4, moments_bf16=savers.adam_bf16)
        else:
            self.optimizer = torch.optim.AdamW(trainable, lr=1e-4)
        # fp16 needs loss scaling. Start at scale 1, not 65536: a step whose scaled gradients
        # overflow is skipped, and a skipped first step never creates the AdamW state we profile.
        self.scaler = torch.amp.GradScaler(device_type, init_scale=1.0) if fp16 else None

    def autocast(self):
        dtype = AUTOCAST_DTYPES.get(self.precision)
        return torch.autocast(self.device.type, dtype=dtype) if dtype is not None else nullcontext()

    def forward_loss(self, batch: SyntheticBatch) -> torch.Tensor:
        with self.autocast():
            if has_pretraining_head(self.model):
                out = self.model(
                    batch.input_values,
                    mask_time_indices=batch.mask_time_indices,
                    sampled_negative_indices=batch.sampled_negative_indices,
                )
                return out.loss
            out = self.model(batch.input_values, mask_time_indices=batch.mask_time_indices)
            return out.last_hidden_state.float().pow(2).mean()  # surrogate loss, see module doc

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def update(self) -> None:
        """The AdamW step (through the GradScaler for fp16), then free the gradients."""
        if self.scaler is not None:
            assert isinstance(self.optimizer, torch.optim.Optimizer)  # __init__ refuses fp16 otherwise
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)

    def backward_and_update(self, loss: torch.Tensor) -> None:
        self.backward(loss)
        self.update()

    def __call__(self, batch: SyntheticBatch) -> None:
        self.backward_and_update(self.forward_loss(batch))

    def timed(self, batch: SyntheticBatch) -> tuple[float, float]:
        """Run one step; return (wall-clock seconds, CPU seconds of this process)."""
        self.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        self(batch)
        self.synchronize()
        return time.perf_counter() - wall, time.process_time() - cpu

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
