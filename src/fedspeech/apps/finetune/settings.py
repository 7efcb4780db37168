"""Settings of a federated fine-tuning run (``fedspeech finetune TASK --federated``),
round-tripped through Flower's run config exactly like
:class:`~fedspeech.apps.pretrain.settings.PretrainSettings`: flat scalars with kebab-case keys,
so the in-process runner and Flower's engines see identical settings.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from fedspeech.federated.rules import FINETUNE, GuardedSettings, rule_names
from fedspeech.federated.runners import RUNNERS as ALL_RUNNERS

TASKS = ("asr", "kws", "speaker")
STRATEGIES = rule_names(FINETUNE)
#: Fine-tuning runs in-process and on the Simulation Engine (no Deployment runner of its own yet).
RUNNERS = tuple(r for r in ALL_RUNNERS if r != "deployment")


@dataclass
class FinetuneSettings(GuardedSettings):
    task: str = "kws"
    manifest: str = ""
    partition: str = ""  # "" = a speaker partition of the task's training data, written to OUT/partition.json
    clients: int = 2  # clients of the generated partition (a given partition fixes its own count)
    out_dir: str = "runs/finetune"
    backbone: str = "tiny"  # preset (random init) or a local HF folder, e.g. a pretraining checkpoint
    model_overrides: str = ""  # JSON object of HF config overrides, e.g. '{"hidden_size": 32}'
    strategy: str = "fedavg"
    loss_temperature: float = 1.0  # loss-weighted and mixed rules
    mixed_beta: float = 0.2  # mixed FedAvg/loss rule
    ldawa_warmup: int = 2  # L-DAWA: plain FedAvg for this many rounds
    trim_fraction: float = 0.1  # trimmed rule: share of largest and smallest values dropped
    rounds: int = 10
    clients_per_round: int = 0  # 0 = every client, every round
    local_epochs: int = 1
    batch_size: int = 8
    lr_backbone: float = 5e-5
    lr_head: float = 1e-3
    warmup_fraction: float = 0.1  # of the rounds: linear warm-up, then linear decay, per round
    grad_clip: float = 1.0  # 0 = no clipping
    freeze_cnn: bool = True
    freeze_backbone: bool = False
    layer_weighted: bool = False  # kws/speaker only
    max_seconds: float = 0.0  # kws/speaker: crop to this; asr: drop longer training clips; 0 = no limit
    use_dev: bool = True  # select the best round on dev (else the last round is reported)
    seed: int = 0

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.task not in TASKS:
            raise ValueError(f"task: must be one of {TASKS}, got {self.task!r}")
        if self.strategy not in STRATEGIES:
            raise ValueError(f"strategy: must be one of {STRATEGIES} for fine-tuning, got {self.strategy!r}")
        for name in ("clients", "rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        if self.clients_per_round < 0:
            raise ValueError(f"clients_per_round: must be >= 0 (0 = all), got {self.clients_per_round}")
        for name in ("lr_backbone", "lr_head"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        for name in ("grad_clip", "max_seconds"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0 (0 = off), got {getattr(self, name)}")
        if not 0 <= self.warmup_fraction < 1:
            raise ValueError(f"warmup_fraction: must be in [0, 1), got {self.warmup_fraction}")
        if self.layer_weighted and self.task == "asr":
            raise ValueError("layer_weighted applies to kws and speaker only")
        self.config_overrides  # noqa: B018 -- fail now on bad JSON, not inside a client

    @property
    def config_overrides(self) -> dict[str, Any]:
        if not self.model_overrides:
            return {}
        try:
            value = json.loads(self.model_overrides)
        except json.JSONDecodeError as exc:
            raise ValueError(f"model_overrides: not JSON ({exc.msg}): {self.model_overrides!r}") from None
        if not isinstance(value, dict):
            raise ValueError(f"model_overrides: expected a JSON object, got {self.model_overrides!r}")
        return value

    @property
    def max_seconds_or_none(self) -> float | None:
        return self.max_seconds or None

    def lr_scale(self, server_round: int) -> float:
        """Per-round learning-rate multiplier: the centralised warm-up/linear-decay schedule
        with rounds for steps (clients run different step counts; rounds they share)."""
        from fedspeech.downstream.finetune import lr_factor

        return lr_factor(server_round - 1, self.rounds, self.warmup_fraction)
