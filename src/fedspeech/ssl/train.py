"""A small local-training loop shared by the SSL objectives (and the Flower clients).

Everything that changes over training (learning rate, Gumbel temperature, EMA momentum) is
a function of the *global* optimiser step, passed in as ``start_step``, so a federated
client continues the schedules across rounds instead of restarting them every round.

An objective is any callable ``objective(model, batch, rng) -> output`` whose output has a
scalar tensor ``loss`` and an int ``num_examples``; it may define ``before_step(model, step)``
(e.g. set the Gumbel temperature) and ``after_step(model, step)`` (e.g. EMA target update).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np
import torch


class _LossLike(Protocol):
    loss: torch.Tensor
    num_examples: int


Objective = Callable[..., _LossLike]
OptimizerFactory = Callable[[list[torch.nn.Parameter]], torch.optim.Optimizer]


@dataclass(frozen=True)
class LRSchedule:
    """Multiplier of the base learning rate at a global step: linear warm-up over
    ``warmup_steps``, then ``decay`` ("linear", "cosine" or "constant") down to
    ``final_ratio`` at ``total_steps`` (held there afterwards)."""

    warmup_steps: int = 0
    total_steps: int | None = None
    decay: Literal["linear", "cosine", "constant"] = "linear"
    final_ratio: float = 0.0

    def __post_init__(self) -> None:
        if self.decay not in ("linear", "cosine", "constant"):
            raise ValueError(f"LRSchedule.decay: unknown {self.decay!r}")
        if self.decay != "constant" and self.total_steps is None:
            raise ValueError(f"LRSchedule: decay {self.decay!r} needs total_steps")
        if self.warmup_steps < 0 or not 0 <= self.final_ratio <= 1:
            raise ValueError(f"LRSchedule: bad warmup_steps/final_ratio in {self}")

    def __call__(self, step: int) -> float:
        if step < self.warmup_steps:
            return (step + 1) / self.warmup_steps
        if self.decay == "constant":
            return 1.0
        assert self.total_steps is not None  # __post_init__: a decaying schedule has total_steps
        span = max(self.total_steps - self.warmup_steps, 1)
        progress = min((step - self.warmup_steps) / span, 1.0)
        if self.decay == "linear":
            shape = 1.0 - progress
        else:
            shape = 0.5 * (1.0 + math.cos(math.pi * progress))
        return self.final_ratio + (1.0 - self.final_ratio) * shape


@dataclass(frozen=True)
class TrainResult:
    """``mean_loss_last_epoch`` is example-weighted over the finite batches of the last
    epoch (the L_k of loss-weighted aggregation); ``num_examples`` counts the examples of
    those batches (the n_k of FedAvg); ``end_step`` is the global step to resume from."""

    mean_loss_last_epoch: float
    num_examples: int
    steps: int
    seconds: float
    skipped_batches: int
    end_step: int
    optimizer_state: dict[str, torch.Tensor] | None = None


def flat_optimizer_state(optimizer: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """The optimiser's per-parameter state (AdamW: ``step``, ``exp_avg``, ``exp_avg_sq``) as
    flat named tensors ``"{param index}.{name}"``, so it can travel in a Flower ArrayRecord
    or a node's state. Hyper-parameters are not included: they come from the settings."""
    flat: dict[str, torch.Tensor] = {}
    for index, values in optimizer.state_dict()["state"].items():
        for name, value in values.items():
            tensor = value if isinstance(value, torch.Tensor) else torch.tensor(float(value))
            flat[f"{index}.{name}"] = tensor.detach().clone().float() if name == "step" else tensor.detach().clone()
    return flat


def load_flat_optimizer_state(optimizer: torch.optim.Optimizer, flat: Mapping[str, torch.Tensor]) -> None:
    """Inverse of :func:`flat_optimizer_state` for an optimiser over the same parameters.

    Raises ``ValueError`` naming the first entry that does not fit (another model, or a
    state saved with other trainable parameters)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]
    state: dict[int, dict[str, torch.Tensor]] = {}
    for key, value in flat.items():
        index_text, _, name = key.partition(".")
        if not index_text.isdigit() or int(index_text) >= len(params):
            raise ValueError(f"optimizer state: entry {key!r} does not match the {len(params)} trainable parameters")
        index = int(index_text)
        if name != "step" and tuple(value.shape) != tuple(params[index].shape):
            raise ValueError(
                f"optimizer state: {key!r} has shape {tuple(value.shape)}, parameter "
                f"{index} has {tuple(params[index].shape)}"
            )
        state.setdefault(index, {})[name] = value.clone()
    base = optimizer.state_dict()
    optimizer.load_state_dict({"state": state, "param_groups": base["param_groups"]})


def _to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def _check_batch(batch: Any) -> None:
    if not isinstance(batch, Mapping) or "input_values" not in batch:
        keys = list(batch) if isinstance(batch, Mapping) else type(batch).__name__
        raise ValueError(f"loader must yield dicts with 'input_values'; got {keys}")


def train_local(
    model: torch.nn.Module,
    objective: Objective,
    loader: Iterable[Mapping[str, Any]],
    *,
    epochs: int = 1,
    lr: float | None = None,
    optimizer_factory: OptimizerFactory | None = None,
    lr_schedule: Callable[[int], float] | None = None,
    max_grad_norm: float | None = None,
    start_step: int = 0,
    rng: np.random.Generator | None = None,
    optimizer_state: Mapping[str, torch.Tensor] | None = None,
    return_optimizer_state: bool = False,
) -> TrainResult:
    """Train ``model`` on ``loader`` for ``epochs`` with ``objective``.

    The optimiser is ``optimizer_factory(trainable_params)`` or AdamW(lr). A batch whose
    loss or gradient norm is not finite is skipped (no update, counted) instead of crashing
    the client. ``rng`` draws masks/augmentations (default: the objective's own generator).
    Extra loader keys (e.g. ``"utterances"``) are ignored. ``lr_schedule`` is any
    ``multiplier(global step)`` (an :class:`LRSchedule`, or a per-round curve from the
    settings). ``optimizer_state`` (from :func:`flat_optimizer_state`) continues an earlier
    optimiser's moments instead of starting fresh; ``return_optimizer_state`` puts the final
    state in the result.
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if (lr is None) == (optimizer_factory is None):
        raise ValueError("give exactly one of lr or optimizer_factory")
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = optimizer_factory(params) if optimizer_factory else torch.optim.AdamW(params, lr=lr)
    if optimizer_state:
        load_flat_optimizer_state(optimizer, optimizer_state)
    schedule = lr_schedule or LRSchedule(decay="constant")
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda local_step: schedule(start_step + local_step))
    before = getattr(objective, "before_step", None)
    after = getattr(objective, "after_step", None)
    device = next(model.parameters()).device

    model.train()
    started = time.perf_counter()
    step = start_step
    skipped = 0
    loss_sum, examples = 0.0, 0
    for _epoch in range(epochs):
        loss_sum, examples = 0.0, 0
        for batch in loader:
            _check_batch(batch)
            if before:
                before(model, step)
            out = objective(model, _to_device(batch, device), rng)
            optimizer.zero_grad(set_to_none=True)
            if not torch.isfinite(out.loss):
                skipped += 1
                continue
            out.loss.backward()
            if max_grad_norm is not None:
                grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
                if not torch.isfinite(grad_norm):
                    optimizer.zero_grad(set_to_none=True)
                    skipped += 1
                    continue
            optimizer.step()
            scheduler.step()
            if after:
                after(model, step)
            step += 1
            loss_sum += float(out.loss.detach()) * out.num_examples
            examples += out.num_examples
    return TrainResult(
        mean_loss_last_epoch=loss_sum / examples if examples else math.nan,
        num_examples=examples,
        steps=step - start_step,
        seconds=time.perf_counter() - started,
        skipped_batches=skipped,
        end_step=step,
        optimizer_state=flat_optimizer_state(optimizer) if return_optimizer_state else None,
    )


@torch.no_grad()
def evaluate_loss(
    model: torch.nn.Module,
    objective: Objective,
    loader: Iterable[Mapping[str, Any]],
    *,
    seed: int = 0,
) -> float:
    """Example-weighted mean loss in eval mode, with masks/augmentations drawn from a fresh
    generator seeded with ``seed`` so validation losses are comparable across rounds.
    Non-finite batches are left out; NaN if none is finite."""
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    device = next(model.parameters()).device
    total, examples = 0.0, 0
    try:
        for batch in loader:
            _check_batch(batch)
            out = objective(model, _to_device(batch, device), rng)
            if torch.isfinite(out.loss):
                total += float(out.loss) * out.num_examples
                examples += out.num_examples
    finally:
        model.train(was_training)
    return total / examples if examples else math.nan
