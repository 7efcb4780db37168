"""Settings of a federated pretraining run, and their round trip through Flower's run config.

Flower passes settings to a ServerApp/ClientApp as a flat ``run_config`` of scalars
(``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . -c "k=v"``), so every setting
here is a scalar with a kebab-case key. The same dataclass backs the ``fedspeech pretrain``
command line, so the three runners see identical settings.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

STRATEGIES = ("fedavg", "loss", "mixed", "ldawa", "fedu")
METHODS = ("wav2vec2", "byol")


@dataclass
class PretrainSettings:
    manifest: str = ""
    partition: str = ""
    out_dir: str = "runs/pretrain"
    model: str = "tiny"
    method: str = "wav2vec2"  # or "byol": the feature-matching method (has a predictor)
    strategy: str = "fedavg"
    backbone_only: bool = False
    rounds: int = 10
    clients_per_round: int = 0  # 0 = every client, every round
    local_epochs: int = 1
    batch_size: int = 4
    max_seconds: float = 4.0
    lr: float = 5e-4
    warmup_rounds: int = 1  # linear warm-up of the learning rate, then cosine decay over rounds
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 5.0
    seed: int = 0
    loss_temperature: float = 1.0  # loss-weighted and mixed rules
    mixed_beta: float = 0.2  # mixed FedAvg/loss rule
    ldawa_warmup: int = 2  # L-DAWA: plain FedAvg for this many rounds
    fedu_mu: float = 0.4  # FedU divergence threshold
    val_max_utterances: int = 64  # held-out speakers' utterances used for validation loss
    probes: str = ""  # per-round frozen-feature probes, e.g. "kws,speaker,asr" (METHODS.md §4)
    probe_method: str = "linear"  # or "knn"
    keep_checkpoints: int = 0  # 0 = keep a checkpoint for every round
    resume: bool = False

    def __post_init__(self) -> None:
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {METHODS}, got {self.method!r}")
        if self.strategy == "fedu" and self.method != "byol":
            raise ValueError("strategy 'fedu' needs a method with a predictor: use --method byol")
        for name in ("rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        unknown = set(self.probe_tasks) - {"kws", "speaker", "asr"}
        if unknown:
            raise ValueError(f"probes: unknown task(s) {sorted(unknown)}; choose from kws, speaker, asr")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds: must be > 0, got {self.max_seconds}")

    @property
    def probe_tasks(self) -> list[str]:
        return [t.strip() for t in self.probes.split(",") if t.strip()]

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_run_config(cls, config: dict[str, Any]) -> "PretrainSettings":
        """Build from a Flower run config; unknown keys are ignored, types are coerced."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            kind = type(f.default)
            raw = config[key]
            values[f.name] = (str(raw).lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
        return cls(**values)

    def lr_at_round(self, server_round: int) -> float:
        """Learning rate for a round: linear warm-up, then cosine decay to ``min_lr_ratio``.

        Scheduled per round (not per local step) because clients run different step counts;
        a round-indexed schedule makes every client and a resumed run agree.
        """
        import math

        if server_round <= self.warmup_rounds:
            return self.lr * server_round / max(1, self.warmup_rounds)
        span = max(1, self.rounds - self.warmup_rounds)
        progress = min(1.0, (server_round - self.warmup_rounds) / span)
        floor = self.lr * self.min_lr_ratio
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
