"""Load HF speech models from a preset or a local folder, reporting only surprises.

Why: transformers 5 logs a whole "LOAD REPORT" table whenever a checkpoint's keys differ
from the model's. Loading one of our pretraining checkpoints into a backbone or a CTC model
always differs in the same, intended way: the pretraining heads (quantizer, projections)
are dropped and a new task head starts from scratch. We silence that table and warn, naming
the keys, only about differences outside those parts, which do point at a wrong checkpoint.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from safetensors.torch import load_file
from transformers import AutoModel, PreTrainedModel

from fedspeech.models.configs import PRESETS, model_config

log = logging.getLogger(__name__)

# Parts of wav2vec 2.0 / WavLM (quantizer, project_q, project_hid) and HuBERT (final_proj,
# label_embeddings_concat) pretraining models that a fine-tuning model does not have.
PRETRAINING_ONLY = ("quantizer.", "project_q.", "project_hid.", "final_proj.", "label_embeddings_concat")


#: Weight files that are Python pickles: loading one can run arbitrary code.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")
#: Set to 1 to let a checkpoint folder that has only pickle weights load (trusted files only).
ALLOW_PICKLE_ENV = "FEDSPEECH_ALLOW_PICKLE"


def safe_load_kwargs(folder: str | Path) -> dict[str, Any]:
    """``from_pretrained`` keywords that load ``folder`` offline and from safetensors only.

    A folder whose weights are only pickle files (``pytorch_model.bin``, ``*.pt``, ...) is
    refused, naming them, unless ``FEDSPEECH_ALLOW_PICKLE=1``: a pickle can execute code
    when it is loaded, and checkpoints travel between machines nobody controls."""
    folder = Path(folder)
    pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES) if folder.is_dir() else []
    if os.environ.get(ALLOW_PICKLE_ENV, "") == "1":
        return {"local_files_only": True}
    if pickles and not any(folder.glob("*.safetensors")):
        raise ValueError(
            f"{folder}: weights only in pickle files ({', '.join(pickles)}), which can run code when loaded; "
            f"fedspeech loads safetensors only. Convert them (transformers: model.save_pretrained(folder)) "
            f"or, for files you trust, set {ALLOW_PICKLE_ENV}=1"
        )
    return {"local_files_only": True, "use_safetensors": True}


def _names(keys: Iterable[Any]) -> list[str]:
    return sorted(str(k[0] if isinstance(k, tuple) else k) for k in keys)


def _drop_load_report(record: logging.LogRecord) -> bool:
    return "LOAD REPORT" not in record.getMessage()


def from_pretrained(
    model_class: Any, folder: str | Path, *, new_parts: tuple[str, ...] = (), **kwargs: Any
) -> PreTrainedModel:
    """``model_class.from_pretrained(folder)`` offline; warns only about keys that are
    neither pretraining-only (:data:`PRETRAINING_ONLY`) nor in ``new_parts`` (prefixes of
    the task head the caller adds, e.g. ``("lm_head.",)``)."""
    folder = Path(folder)
    model_config(folder)  # a clear error when the folder has no config.json
    # A filter, not a higher level: transformers 5.23 runs an extra (tensor-parallel) check,
    # with warnings of its own, when that logger's level is WARNING or above.
    hf_logger = logging.getLogger("transformers.modeling_utils")
    hf_logger.addFilter(_drop_load_report)
    try:
        model, info = model_class.from_pretrained(
            folder, output_loading_info=True, **safe_load_kwargs(folder), **kwargs
        )
    finally:
        hf_logger.removeFilter(_drop_load_report)
    surprises = {
        "unexpected": [k for k in _names(info["unexpected_keys"]) if not k.startswith(PRETRAINING_ONLY)],
        "missing": [k for k in _names(info["missing_keys"]) if not k.startswith(new_parts)],
        "mismatched": [k for k in _names(info["mismatched_keys"]) if not k.startswith(new_parts)],
    }
    for kind, keys in surprises.items():
        if keys:
            log.warning(
                "%s: %d %s keys (freshly initialised or dropped), e.g. %s", folder, len(keys), kind, ", ".join(keys[:3])
            )
    return model


def load_backbone(source: str | Path, **config_overrides: Any) -> PreTrainedModel:
    """The base speech model (no heads): a fresh preset (random init) or the backbone of a
    local HF folder, e.g. a ``fedspeech pretrain`` checkpoint."""
    if str(source) in PRESETS:
        return AutoModel.from_config(model_config(source, **config_overrides))
    return from_pretrained(AutoModel, source, **config_overrides)


#: Tensors saved beside an HF folder that are not part of the HF model (SSL heads, the
#: feature-matching predictor and target, classifier heads).
EXTRA_FILE = "extra.safetensors"


def load_extra(folder: str | Path) -> dict:
    """The ``extra.safetensors`` tensors of a checkpoint folder ({} when it has none)."""
    path = Path(folder) / EXTRA_FILE
    return load_file(str(path)) if path.is_file() else {}
