"""Settings of a federated early-exit fine-tuning run (docs/methods.md §3), round-tripped
through Flower's run config exactly like :class:`~fedspeech.apps.pretrain.settings.PretrainSettings`.

``mode`` picks the method or a baseline, all under the same data, rounds and budget:

- ``adaptive`` (the method): every client trains at the depth its device affords within the
  round deadline (depth planner), and the server aggregates depth-aware (per tensor, over
  the clients that trained it);
- ``full``: full-depth FedAvg; every client trains every layer whatever its device, and its
  simulated time is what the planner predicts for that, deadline or not;
- ``exclusion``: only the clients whose plan allows full depth take part;
- ``smallest``: every client trains the smallest depth any client can afford.

``task`` is ``kws`` (keyword spotting: a classification head per exit, accuracy) or ``asr``
(character CTC on the sentence utterances: a CTC head per exit, WER and CER with greedy
decoding). Everything else (planning, partial upload, depth-aware aggregation) is the same.

``deadline = 0`` (auto) sets the round deadline to the tightest one that still lets every
client train the shallowest exit: no device is left out, and slower devices go shallower.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from fedspeech.federated.rules import GuardedSettings
from fedspeech.settings import round_lr

MODES = ("adaptive", "full", "exclusion", "smallest")
TASKS = ("kws", "asr")
PRECISIONS = ("fp32", "mixed")
# The catalogue devices of the benchmark's mixed fleet (DEVICES.md calibration points).
DEFAULT_FLEET = "raspberry-pi-4:0.4,jetson-xavier-nx:0.3,macbook-pro-2019:0.3"


@dataclass
class EarlyExitSettings(GuardedSettings):
    manifest: str = ""
    partition: str = ""
    out_dir: str = "runs/early-exit"
    model: str = "tiny"  # preset (random init) or a local HF folder, e.g. a `fedspeech pretrain` checkpoint
    num_layers: int = 0  # 0 = the model's own; the tiny preset has 4, too few for depth to matter
    model_overrides: str = ""  # JSON object of HF config overrides, e.g. '{"conv_dim": [32, 32, 32, 32, 32, 32, 32]}'
    exit_every: int = 2  # an exit after every this many layers (the last layer always exits)
    exits: str = ""  # comma-separated exit layers instead of exit_every, e.g. "1,2,4,8"
    mode: str = "adaptive"
    fleet: str = DEFAULT_FLEET  # "device:fraction,..." or "device,device,..." (one per client) or a .json/.toml file
    fleet_seed: int = 0  # shuffles the fraction-based assignment of devices to clients
    catalogue: str = ""  # extra device catalogue JSON (profiling format) over the packaged one
    deadline: float = 0.0  # simulated device seconds a client may train per round; 0 = auto (see below)
    precision: str = "fp32"  # "mixed": plan and train in mixed precision where the device has it
    task: str = "kws"  # kws (keyword classification per exit) or asr (character CTC per exit)
    labels: str = ""  # kws: comma-separated classes; "" = the 10 keywords + "_unknown_"
    letters: str = ""  # asr: the vocabulary's letters besides the word break and "'"; "" = a-z
    rounds: int = 10
    clients_per_round: int = 0  # 0 = every taking-part client, every round
    local_epochs: int = 1
    batch_size: int = 8
    max_seconds: float = 1.0  # kws: random crop length for training (keywords are shorter)
    asr_max_seconds: float = 16.0  # asr: longer training sentences are dropped, never cropped (that cuts the text)
    lr: float = 1e-3
    warmup_rounds: int = 1  # linear warm-up of the learning rate, then cosine decay over rounds
    min_lr_ratio: float = 0.1
    max_grad_norm: float = 5.0
    distill_lambda: float = 0.0  # DepthFL self-distillation between a client's exits
    distill_temperature: float = 1.0
    head_dropout: float = 0.0
    freeze_feature_encoder: bool = True  # the CNN is neither trained nor uploaded
    cache_cnn_features: bool = True  # with a frozen CNN, clients compute its features once per utterance
    eval_splits: str = "dev"  # comma-separated manifest splits of held-out speakers
    eval_max_utterances: int = 0  # 0 = all of them
    confidence_threshold: float = 0.9  # ConfidenceExit policy logged next to the per-exit accuracy
    seed: int = 0
    keep_checkpoints: int = 0  # 0 = keep a checkpoint for every round
    resume: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.mode not in MODES:
            raise ValueError(f"mode: must be one of {MODES}, got {self.mode!r}")
        if self.task not in TASKS:
            raise ValueError(f"task: must be one of {TASKS}, got {self.task!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision: must be one of {PRECISIONS}, got {self.precision!r}")
        for name in ("rounds", "local_epochs", "batch_size", "exit_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: must be >= 1, got {getattr(self, name)}")
        for name in ("num_layers", "clients_per_round", "eval_max_utterances", "keep_checkpoints"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: must be >= 0, got {getattr(self, name)}")
        if self.deadline < 0:
            raise ValueError(f"deadline: must be >= 0 (0 = auto), got {self.deadline}")
        self.config_overrides  # noqa: B018 - fail now on bad JSON or exits, not in every client
        self.exit_list  # noqa: B018
        self.letter_set  # noqa: B018
        for name in ("max_seconds", "asr_max_seconds", "lr", "distill_temperature"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.distill_lambda < 0:
            raise ValueError(f"distill_lambda: must be >= 0, got {self.distill_lambda}")
        if not 0 < self.confidence_threshold <= 1:
            raise ValueError(f"confidence_threshold: must be in (0, 1], got {self.confidence_threshold}")
        if not self.split_names:
            raise ValueError("eval_splits: name at least one manifest split, e.g. 'dev'")

    @property
    def cached_cnn(self) -> bool:
        """Clients keep the frozen CNN's features (``FrozenFeatureCache``): steps and their
        cost lines start after the CNN, whose forward pass is paid once per utterance."""
        return self.cache_cnn_features and self.freeze_feature_encoder

    @property
    def split_names(self) -> tuple[str, ...]:
        return tuple(s.strip() for s in self.eval_splits.split(",") if s.strip())

    @property
    def train_seconds(self) -> float:
        """The longest training utterance a batch may hold: the crop (kws) or the longest
        sentence kept (asr)."""
        return self.asr_max_seconds if self.task == "asr" else self.max_seconds

    @property
    def letter_set(self) -> str:
        """The asr vocabulary's letters, sorted ("" = a-z, chosen by ``CharVocab``)."""
        letters = "".join(self.letters.split())
        bad = sorted({ch for ch in letters if not ch.isalpha()} - {"'"})
        if bad:
            raise ValueError(f'letters: only letters belong here (the word break and "\'" are always in), got {bad}')
        return "".join(sorted(set(letters) - {"'"}))

    @property
    def label_names(self) -> tuple[str, ...]:
        """Class list, in logit order."""
        if not self.labels.strip():
            from fedspeech.data.synth import KEYWORDS, UNKNOWN_LABEL

            return (*KEYWORDS, UNKNOWN_LABEL)
        names = tuple(s.strip() for s in self.labels.split(",") if s.strip())
        if len(set(names)) != len(names):
            raise ValueError(f"labels: duplicate class names in {self.labels!r}")
        return names

    @property
    def exit_list(self) -> tuple[int, ...] | None:
        """Explicit exit layers, or None to use ``exit_every``."""
        if not self.exits.strip():
            return None
        try:
            return tuple(int(e) for e in self.exits.split(",") if e.strip())
        except ValueError:
            raise ValueError(f"exits: expected comma-separated layer numbers, got {self.exits!r}") from None

    @property
    def config_overrides(self) -> dict[str, object]:
        """HF config overrides: ``model_overrides`` plus ``num_layers``."""
        overrides: dict[str, object] = {}
        if self.model_overrides.strip():
            try:
                overrides = json.loads(self.model_overrides)
            except json.JSONDecodeError as error:
                raise ValueError(f"model_overrides: not JSON ({error.msg}): {self.model_overrides!r}") from None
            if not isinstance(overrides, dict):
                raise ValueError(f"model_overrides: must be a JSON object, got {self.model_overrides!r}")
        if self.num_layers:
            overrides["num_hidden_layers"] = self.num_layers
        return overrides

    def lr_at_round(self, server_round: int) -> float:
        return round_lr(self.lr, server_round, self.warmup_rounds, self.rounds, self.min_lr_ratio)
