"""Settings of a federated pretraining run, and their round trip through Flower's run config.

Flower passes settings to a ServerApp/ClientApp as a flat ``run_config`` of scalars
(``[tool.flwr.app.config]`` in pyproject.toml, ``flwr run . -c "k=v"``), so every setting
here is a scalar with a kebab-case key. The same dataclass backs the ``fedspeech pretrain``
command line, so the three runners see identical settings.
"""

from __future__ import annotations

from dataclasses import dataclass

from fedspeech.federated.rules import PRETRAIN, RULES, GuardedSettings, check_rule, rule_names
from fedspeech.profiling.savers import Savers
from fedspeech.settings import round_lr

STRATEGIES = rule_names(PRETRAIN)
METHODS = ("wav2vec2", "byol")
SERVER_OPTIMIZERS = ("none", "fedavgm", "fedadam", "fedyogi", "fedadagrad")  # as server_optimizers, import-free
#: What happens to a client's AdamW moments between rounds: "reset" (fresh every round),
#: "client" (kept in the node's state, the client's own), "server" (sent with the update,
#: averaged by the server with the rule's data-size weights and sent back next round).
OPTIMIZER_STATES = ("reset", "client", "server")
#: "round": one learning rate per round; "step": the schedule followed step by step within
#: the round, by the fraction of the run done (what a centralised run does per step).
LR_SCHEDULES = ("round", "step")


#: Savers a pretraining client can apply: they change how the model computes, not the loop
#: (``ckpt-contrastive`` targets transformers' own loss, which our objective does not use).
PRETRAIN_SAVERS = ("ckpt-cnn", "recompute-cnn", "ckpt-transformer", "fused-quantizer", "freeze-cnn", "cache-cnn")


@dataclass
class PretrainSettings(GuardedSettings):
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
    # Batch 1 and lr 2e-3: the recipe that learns (benchmarks/fed_ssl_recipe.py, docs/pretraining.md):
    # at equal examples seen, more and smaller client steps close most of the gap to
    # centralised training, while larger steps (higher lr, server lr or momentum) stay at chance.
    batch_size: int = 1
    max_seconds: float = 4.0
    lr: float = 2e-3
    warmup_rounds: int = 1  # linear warm-up of the learning rate, then cosine decay over rounds
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 5.0
    lr_schedule: str = "round"  # see LR_SCHEDULES
    optimizer_state: str = "reset"  # see OPTIMIZER_STATES
    server_optimizer: str = "none"  # Flower's FedAvgM / FedAdam / FedYogi / FedAdagrad after the rule
    server_lr: float = 1.0  # FedAvgM server_learning_rate, FedOpt eta
    server_momentum: float = 0.0  # FedAvgM server_momentum, FedOpt beta_1
    server_tau: float = 1e-3  # FedOpt adaptivity tau
    server_optimizer_scope: str = ""  # key prefixes the server step applies to (space-separated; "" = all)
    seed: int = 0
    loss_temperature: float = 1.0  # loss-weighted and mixed rules
    mixed_beta: float = 0.2  # mixed FedAvg/loss rule
    ldawa_warmup: int = 2  # L-DAWA: plain FedAvg for this many rounds
    fedu_mu: float = 0.4  # FedU divergence threshold
    trim_fraction: float = 0.1  # trimmed rule: share of largest and smallest values dropped
    val_max_utterances: int = 64  # held-out speakers' utterances used for validation loss
    probes: str = ""  # per-round frozen-feature probes, e.g. "kws,speaker,asr" (docs/methods.md §4)
    probe_method: str = "linear"  # or "knn"
    # memory savers each client applies to its model (docs/performance.md); exact ones only here
    savers: str = ""  # e.g. "recompute-cnn ckpt-transformer fused-quantizer"
    keep_checkpoints: int = 0  # 0 = keep a checkpoint for every round
    resume: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        check_rule(self.strategy, PRETRAIN)
        if self.method not in METHODS:
            raise ValueError(f"method: must be one of {METHODS}, got {self.method!r}")
        for name, allowed in (
            ("server_optimizer", SERVER_OPTIMIZERS),
            ("optimizer_state", OPTIMIZER_STATES),
            ("lr_schedule", LR_SCHEDULES),
        ):
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name}: must be one of {allowed}, got {getattr(self, name)!r}")
        if not (self.server_lr > 0 and 0 <= self.server_momentum < 1 and self.server_tau > 0):
            raise ValueError(
                f"server_lr must be > 0, server_momentum in [0, 1), server_tau > 0; got "
                f"{self.server_lr}, {self.server_momentum}, {self.server_tau}"
            )
        if self.server_optimizer_scope.strip() and self.server_optimizer == "none":
            raise ValueError("server_optimizer_scope: needs a --server-optimizer to scope (it is 'none')")
        if RULES[self.strategy].needs == "predictor" and self.method != "byol":
            raise ValueError(f"strategy {self.strategy!r} needs a method with a predictor: use --method byol")
        for name in ("rounds", "local_epochs", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        unknown = set(self.probe_tasks) - {"kws", "speaker", "asr"}
        if unknown:
            raise ValueError(f"probes: unknown task(s) {sorted(unknown)}; choose from kws, speaker, asr")
        if self.max_seconds <= 0:
            raise ValueError(f"max_seconds: must be > 0, got {self.max_seconds}")
        self.model_savers()  # validates the savers now, naming the field

    def model_savers(self) -> Savers:
        """The ``savers`` field parsed; only the ones that change the model, not the loop."""
        try:
            savers = Savers.parse(self.savers.replace(",", " ").split())
        except ValueError as exc:
            raise ValueError(f"savers: {exc}") from None
        loop_level = [t for t in savers.tokens() if t.split("=")[0] not in PRETRAIN_SAVERS]
        if loop_level:
            raise ValueError(
                f"savers: {' '.join(loop_level)} not available in pretraining (the local loop clips by the global "
                f"gradient norm and crops with --max-seconds); choose from {' '.join(PRETRAIN_SAVERS)}"
            )
        if savers.any and self.method != "wav2vec2":
            raise ValueError(f"savers: apply to the wav2vec2 method only, not {self.method!r}")
        return savers

    @property
    def probe_tasks(self) -> list[str]:
        return [t.strip() for t in self.probes.split(",") if t.strip()]

    def lr_at_progress(self, rounds_done: float) -> float:
        """Learning rate after ``rounds_done`` (fractional) rounds, for ``lr_schedule="step"``:
        linear warm-up over ``warmup_rounds``, then cosine decay to ``min_lr_ratio`` at the
        end of the last round. Clients take their step's lr from the round and the fraction
        of their local steps done, so every client and the centralised run follow one curve."""
        import math

        floor = self.lr * self.min_lr_ratio
        if rounds_done < self.warmup_rounds:
            return self.lr * max(rounds_done, 0.0) / self.warmup_rounds
        span = max(1e-9, self.rounds - self.warmup_rounds)
        progress = min(1.0, (rounds_done - self.warmup_rounds) / span)
        return floor + (self.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))

    def step_lr(self, server_round: int, local_steps: int, start_step: int):
        """``lr_multiplier(global step)`` for ``train_local``'s ``lr_schedule`` (which passes
        ``start_step`` + the local step), with ``lr=self.lr``: the per-step schedule inside
        ``server_round`` for a client taking ``local_steps`` steps from ``start_step`` (each
        step at its middle, so warm-up never gives 0)."""
        steps = max(1, local_steps)

        def multiplier(global_step: int) -> float:
            local_step = global_step - start_step
            return self.lr_at_progress(server_round - 1 + (local_step + 0.5) / steps) / self.lr

        return multiplier

    def lr_at_round(self, server_round: int) -> float:
        return round_lr(self.lr, server_round, self.warmup_rounds, self.rounds, self.min_lr_ratio)
