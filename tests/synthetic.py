"""Synthetic audio shared by tests that need waveforms but no corpus."""

from __future__ import annotations

import numpy as np
import torch

SR = 16_000


def synthetic_batch(lengths: list[int], seed: int) -> dict[str, torch.Tensor]:
    """Zero-padded 'utterances': a few random sinusoids with a slow envelope plus noise."""
    rng = np.random.default_rng(seed)
    width = max(lengths)
    values = torch.zeros(len(lengths), width)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for row, n in enumerate(lengths):
        t = np.arange(n) / SR
        wave = sum(
            rng.uniform(0.2, 1.0) * np.sin(2 * np.pi * f * t + rng.uniform(0, 2 * np.pi))
            for f in rng.uniform(100, 3000, size=4)
        ) * (1.2 + np.sin(2 * np.pi * rng.uniform(1, 4) * t))
        wave = wave + 0.05 * rng.standard_normal(n)
        values[row, :n] = torch.tensor((wave - wave.mean()) / wave.std(), dtype=torch.float32)
        mask[row, :n] = 1
    return {"input_values": values, "attention_mask": mask}


# A much smaller "tiny" (config overrides) so each forward/backward takes milliseconds.
SMALL = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    conv_dim=(32,) * 7,
    num_conv_pos_embeddings=16,
    num_conv_pos_embedding_groups=2,
    codevector_dim=32,
    proj_codevector_dim=32,
    num_codevectors_per_group=16,
)
