"""wav2vec 2.0 model configurations: our ``tiny``, the standard ``base`` and ``large``, or
any local Hugging Face checkpoint folder.

Why not just ``Wav2Vec2Config()``: the HF defaults are fine-tuning settings (e.g.
``mask_time_prob=0.05``, layer dropout); pretraining needs the paper's masking
(``docs/methods.md`` §1). Nothing here downloads anything.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, PretrainedConfig, Wav2Vec2Config

# Settings shared by every preset: the paper's pretraining masking and quantizer.
_PRETRAINING = dict(
    mask_time_prob=0.65,
    mask_time_length=10,
    mask_time_min_masks=2,
    num_negatives=100,
    num_codevector_groups=2,
    num_codevectors_per_group=320,
    contrastive_logits_temperature=0.1,
    diversity_loss_weight=0.1,
    feat_extract_activation="gelu",
    do_stable_layer_norm=False,
    layerdrop=0.0,
)

_BASE = dict(
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    intermediate_size=3072,
    codevector_dim=256,
    proj_codevector_dim=256,
    feat_extract_norm="group",
    conv_dim=(512,) * 7,
    conv_kernel=(10, 3, 3, 3, 3, 2, 2),
    conv_stride=(5, 2, 2, 2, 2, 2, 2),
    num_conv_pos_embeddings=128,
    num_conv_pos_embedding_groups=16,
)

PRESETS: dict[str, dict[str, Any]] = {
    # Small enough to pretrain on 2 CPU cores in minutes; same CNN strides, so ~49 frames/s.
    "tiny": {
        **_BASE,
        "hidden_size": 96,
        "num_hidden_layers": 4,
        "num_attention_heads": 4,
        "intermediate_size": 384,
        "codevector_dim": 64,
        "proj_codevector_dim": 64,
        "conv_dim": (64,) * 7,
        "num_conv_pos_embeddings": 32,
        "num_conv_pos_embedding_groups": 4,
        "num_codevectors_per_group": 64,
        # The paper's feature penalty (weight 10) drives this small CNN's output towards zero
        # within ~100 steps; the context network then predicts a constant and the contrastive
        # loss stays at chance (weights 1 and 0.1 too). Measured in docs/evaluation.md
        # ("Why it was stuck"); read by Wav2Vec2Objective.from_config. base/large keep 10.
        "feature_penalty_weight": 0.0,
    },
    "base": dict(_BASE),
    # Baevski et al. 2020, LV-60k large: layer-norm feature extractor, pre-LN Transformer.
    "large": {
        **_BASE,
        "hidden_size": 1024,
        "num_hidden_layers": 24,
        "num_attention_heads": 16,
        "intermediate_size": 4096,
        "codevector_dim": 768,
        "proj_codevector_dim": 768,
        "feat_extract_norm": "layer",
        "conv_bias": True,
        "do_stable_layer_norm": True,
    },
}


def model_config(name_or_path: str | Path, **overrides: Any) -> PretrainedConfig:
    """Return the config for a preset name or a local HF checkpoint folder.

    A folder keeps its own architecture (wav2vec 2.0, HuBERT, WavLM, ...); presets get the
    pretraining settings above. ``overrides`` win over both.
    """
    key = str(name_or_path)
    if key in PRESETS:
        return Wav2Vec2Config(**{**_PRETRAINING, **PRESETS[key], **overrides})
    folder = Path(key)
    if not (folder / "config.json").is_file():
        raise ValueError(f"model {key!r}: not a preset ({', '.join(PRESETS)}) and no config.json in that folder")
    return AutoConfig.from_pretrained(folder, local_files_only=True, **overrides)
