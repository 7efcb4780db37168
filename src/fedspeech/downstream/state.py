"""Get and set only the trainable parameters of a model.

A federated fine-tuning client sends what it trained and nothing else: with a frozen CNN
or a frozen backbone that is a fraction of the model, and sending frozen weights would
only waste bandwidth. Parameters are identified by name, and the list form keeps
``named_parameters`` order so both sides of a Flower exchange agree on it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn


def trainable_names(model: nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if p.requires_grad]


def trainable_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Detached CPU copies of every parameter with ``requires_grad``."""
    return {name: p.detach().cpu().clone() for name, p in model.named_parameters() if p.requires_grad}


def load_trainable_state(model: nn.Module, state: Mapping[str, torch.Tensor]) -> None:
    """Copy ``state`` into the model's trainable parameters; names and shapes must match
    exactly, so a state from a differently frozen model fails loudly instead of half-loading."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing = sorted(set(params) - set(state))
    unexpected = sorted(set(state) - set(params))
    if missing or unexpected:
        raise ValueError(f"trainable state mismatch: missing {missing[:5]}, unexpected {unexpected[:5]}")
    with torch.no_grad():
        for name, p in params.items():
            value = torch.as_tensor(state[name])
            if value.shape != p.shape:
                raise ValueError(f"trainable state: {name} has shape {tuple(value.shape)}, model has {tuple(p.shape)}")
            p.copy_(value.to(dtype=p.dtype, device=p.device))


def get_trainable_arrays(model: nn.Module) -> list[np.ndarray]:
    """Trainable parameters as numpy arrays in ``named_parameters`` order (Flower's format)."""
    return [t.numpy() for t in trainable_state(model).values()]


def set_trainable_arrays(model: nn.Module, arrays: Sequence[np.ndarray]) -> None:
    names = trainable_names(model)
    if len(arrays) != len(names):
        raise ValueError(f"got {len(arrays)} arrays for {len(names)} trainable parameters")
    load_trainable_state(model, {name: torch.from_numpy(np.asarray(a)) for name, a in zip(names, arrays, strict=True)})
