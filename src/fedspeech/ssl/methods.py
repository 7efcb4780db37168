"""What a federated (or centralised) run needs from an SSL method, for both methods.

The Flower client, the server and the centralised baseline only talk to ``SSLMethod``:
build a model, say which tensors travel (everything, or the backbone only), keep the rest
on the client between rounds, apply the global model, and write/read HF checkpoints. The
wav2vec 2.0 and feature-matching specifics stay here, not in the app.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import lru_cache
from pathlib import Path
from typing import Protocol

import numpy as np
import torch
from transformers import Wav2Vec2ForPreTraining, Wav2Vec2Model

from fedspeech.models.configs import model_config
from fedspeech.models.loading import PICKLE_SUFFIXES, load_extra, safe_load_kwargs
from fedspeech.ssl.feature_matching import FeatureMatchingModel, FeatureMatchingObjective
from fedspeech.ssl.fedu import fedu_client_update
from fedspeech.ssl.wav2vec2 import Wav2Vec2Objective

State = dict[str, torch.Tensor]


class MethodSettings(Protocol):
    """The settings a method reads (``PretrainSettings`` has them); a Protocol so that this
    package does not import the app that uses it."""

    method: str
    model: str
    seed: int
    backbone_only: bool
    max_seconds: float


@dataclass(frozen=True)
class MethodConfig:
    """What builds a method: hashable, so a process builds each method once.
    ``fedu_mu``: FedU's divergence threshold, which the FedU strategy sends in its train
    config (``fedu-mu``); ``None`` = no FedU predictor update."""

    method: str = "wav2vec2"
    model: str = "tiny"
    seed: int = 0
    backbone_only: bool = False
    max_seconds: float = 4.0
    fedu_mu: float | None = None

    @classmethod
    def of(cls, settings: MethodSettings | MethodConfig, fedu_mu: float | None = None) -> MethodConfig:
        if isinstance(settings, MethodConfig):
            return settings if fedu_mu is None else replace(settings, fedu_mu=fedu_mu)
        return cls(
            settings.method, settings.model, settings.seed, settings.backbone_only, settings.max_seconds, fedu_mu
        )


def _numpy(state: State) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in state.items()}


class SSLMethod:
    """Base: the model's whole state travels unless ``backbone_only``."""

    backbone_prefixes: tuple[str, ...] = ()

    def __init__(self, settings: MethodSettings | MethodConfig) -> None:
        self.settings = MethodConfig.of(settings)
        torch.manual_seed(self.settings.seed)  # every client and the server start from one init
        self._template = self.build()
        self.objective = self.make_objective()

    # -- to implement per method
    def build(self) -> torch.nn.Module:
        raise NotImplementedError

    def make_objective(self):
        raise NotImplementedError

    def checkpoint_parts(self, model: torch.nn.Module) -> tuple[object, State]:
        """(the HF model to ``save_pretrained``, extra tensors saved beside it)."""
        raise NotImplementedError

    def restore(self, model: torch.nn.Module, folder: Path) -> None:
        raise NotImplementedError

    # -- shared
    def fresh_model(self) -> torch.nn.Module:
        return copy.deepcopy(self._template)

    def transmitted_prefixes(self) -> tuple[str, ...] | None:
        """Key prefixes sent to and from clients; None = everything."""
        return self.backbone_prefixes if self.settings.backbone_only else None

    def transmitted_state(self, model: torch.nn.Module) -> State:
        prefixes = self.transmitted_prefixes()
        return {
            k: v.detach().clone() for k, v in model.state_dict().items() if prefixes is None or k.startswith(prefixes)
        }

    def local_state(self, model: torch.nn.Module) -> State:
        """What a client keeps between rounds: everything that is not sent."""
        sent = self.transmitted_state(model)
        return {k: v.detach().clone() for k, v in model.state_dict().items() if k not in sent}

    def load_global(self, model: torch.nn.Module, global_state: State, local_state: State) -> dict[str, float]:
        """Apply the client's kept tensors, then the global ones; returns metrics to report."""
        if local_state:
            model.load_state_dict(local_state, strict=False)
        _load_exact(model, global_state)
        return {}


def _load_exact(model: torch.nn.Module, state: State) -> None:
    """``load_state_dict(strict=False)`` that still refuses keys the model does not have."""
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys:
        raise ValueError(f"global model has keys this model lacks: {result.unexpected_keys[:5]}")


class Wav2Vec2Method(SSLMethod):
    """wav2vec 2.0 on HF ``Wav2Vec2ForPreTraining``; the backbone is ``wav2vec2.*`` and the
    quantizer and the two projections into the contrastive space are the SSL heads."""

    backbone_prefixes = ("wav2vec2.",)

    def build(self) -> torch.nn.Module:
        source = Path(self.settings.model)
        weights = (
            [p for p in source.iterdir() if p.suffix in (".safetensors", *PICKLE_SUFFIXES)] if source.is_dir() else []
        )
        if (source / "config.json").is_file() and weights:  # pickle-only folders are refused by name
            return Wav2Vec2ForPreTraining.from_pretrained(source, **safe_load_kwargs(source))
        return Wav2Vec2ForPreTraining(model_config(self.settings.model))

    def make_objective(self) -> Wav2Vec2Objective:
        return Wav2Vec2Objective.from_config(self._template.config, seed=self.settings.seed)

    def checkpoint_parts(self, model: torch.nn.Module) -> tuple[object, State]:
        return model, {}

    def restore(self, model: torch.nn.Module, folder: Path) -> None:
        loaded = Wav2Vec2ForPreTraining.from_pretrained(folder, **safe_load_kwargs(folder))
        model.load_state_dict(loaded.state_dict())


class FeatureMatchingMethod(SSLMethod):
    """BYOL-style feature matching. Sent: online encoder + predictor (FedU's server side),
    or the backbone only. The EMA target always stays on the client."""

    backbone_prefixes = FeatureMatchingModel.backbone_keys()

    def build(self) -> torch.nn.Module:
        return FeatureMatchingModel(model_config(self.settings.model))

    def make_objective(self) -> FeatureMatchingObjective:
        crop = min(self.settings.max_seconds, 2.0)
        return FeatureMatchingObjective(crop_seconds=crop, seed=self.settings.seed)

    def transmitted_prefixes(self) -> tuple[str, ...]:
        if self.settings.backbone_only:
            return self.backbone_prefixes
        return FeatureMatchingModel.online_encoder_keys() + FeatureMatchingModel.predictor_keys()

    def local_state(self, model: torch.nn.Module) -> State:
        if self.settings.fedu_mu is not None:  # FedU compares against the client's own last encoder
            return {k: v.detach().clone() for k, v in model.state_dict().items()}
        return super().local_state(model)

    def load_global(self, model: torch.nn.Module, global_state: State, local_state: State) -> dict[str, float]:
        first_time = not local_state
        if local_state:
            model.load_state_dict(local_state, strict=False)
        metrics: dict[str, float] = {}
        keep_predictor = False
        if self.settings.fedu_mu is not None and not first_time:
            update = fedu_client_update(
                _numpy(model.state_dict()),
                _numpy(global_state),
                encoder_prefixes=FeatureMatchingModel.online_encoder_keys(),
                predictor_prefixes=FeatureMatchingModel.predictor_keys(),
                mu=self.settings.fedu_mu,
            )
            keep_predictor = not update.took_global_predictor
            metrics = {"fedu-divergence": update.divergence, "fedu-took-global-predictor": float(not keep_predictor)}
        model.load_global(global_state, keep_predictor=keep_predictor)
        if first_time:
            model.reset_target()  # a client's first round: target starts as the global online net
        return metrics

    def checkpoint_parts(self, model: torch.nn.Module) -> tuple[object, State]:
        extra = {k: v for k, v in model.state_dict().items() if not k.startswith(self.backbone_prefixes)}
        return model.backbone, extra

    def restore(self, model: torch.nn.Module, folder: Path) -> None:
        model.backbone.load_state_dict(Wav2Vec2Model.from_pretrained(folder, **safe_load_kwargs(folder)).state_dict())
        model.load_state_dict(load_extra(folder), strict=False)


_METHODS = {"wav2vec2": Wav2Vec2Method, "byol": FeatureMatchingMethod}


@lru_cache(maxsize=8)
def _cached(config: MethodConfig) -> SSLMethod:
    return _METHODS[config.method](config)


def get_method(settings: MethodSettings | MethodConfig, fedu_mu: float | None = None) -> SSLMethod:
    """The method for these settings, built once per process (clients are called every round);
    ``fedu_mu`` as the FedU strategy's train config gives it."""
    return _cached(MethodConfig.of(settings, fedu_mu))
