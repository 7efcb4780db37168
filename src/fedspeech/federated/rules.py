"""The one registry of aggregation rules: CLI choices, settings validation and app
construction all read it.

Import-free on purpose (no torch, no Flower), so ``--help`` and settings validation stay
fast. A rule is a strategy class in :mod:`fedspeech.federated.strategies` (looked up by
name there) plus the settings fields that feed its options. Adding a rule = a strategy class
+ one entry here (docs/architecture.md shows it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from fedspeech.settings import Settings

PRETRAIN, FINETUNE, EARLYEXIT = "pretrain", "finetune", "earlyexit"


@dataclass(frozen=True)
class Rule:
    """``options`` maps a strategy keyword to the settings field that holds its value;
    ``workloads`` are the apps that offer the rule; ``needs`` is a one-line requirement the
    workload checks (e.g. FedU needs a method with a predictor)."""

    name: str
    strategy: str  # class name in fedspeech.federated.strategies
    summary: str
    options: Mapping[str, str] = field(default_factory=dict)
    workloads: tuple[str, ...] = (PRETRAIN, FINETUNE)
    needs: str = ""


RULES: dict[str, Rule] = {
    rule.name: rule
    for rule in (
        Rule("fedavg", "RobustFedAvg", "FedAvg: average weighted by examples"),
        Rule("loss", "LossWeighted", "weights softmax(-loss / T)", {"temperature": "loss_temperature"}),
        Rule(
            "mixed",
            "MixedFedAvgLoss",
            "beta x loss weights + (1 - beta) x FedAvg weights",
            {"beta": "mixed_beta", "temperature": "loss_temperature"},
        ),
        Rule(
            "ldawa",
            "LDAWA",
            "layer-wise divergence-aware weights after FedAvg warm-up rounds",
            {"warmup_rounds": "ldawa_warmup"},
        ),
        Rule(
            "fedu",
            "FedU",
            "feature matching: online encoder averaged, divergence-aware predictor update",
            {"mu": "fedu_mu"},
            workloads=(PRETRAIN,),
            needs="predictor",
        ),
        Rule("median", "CoordinateMedian", "coordinate-wise median of the updates (robust to a minority of attackers)"),
        Rule(
            "trimmed",
            "TrimmedMean",
            "coordinate-wise mean without the trim_fraction largest and smallest values",
            {"trim": "trim_fraction"},
        ),
        Rule(
            "partial",
            "DepthAwarePartial",
            "each layer averaged over the clients that trained it",
            workloads=(EARLYEXIT,),
        ),
    )
}


def rule_names(workload: str) -> tuple[str, ...]:
    """The rules ``workload`` offers, in registry order (its CLI choices)."""
    return tuple(name for name, rule in RULES.items() if workload in rule.workloads)


def check_rule(name: str, workload: str) -> Rule:
    """The rule called ``name``; a ``ValueError`` naming the field and the choices otherwise."""
    if name not in RULES or workload not in RULES[name].workloads:
        raise ValueError(f"strategy: must be one of {rule_names(workload)}, got {name!r}")
    return RULES[name]


#: Where updates are clipped to ``clip_norm``: by the server, or by each client before
#: sending (federated/clipping.py; what DP under SecAgg+ needs).
CLIPPING_SIDES = ("server", "client")

#: Screening every rule applies (strategies.RobustFedAvg), fed by the same settings fields in
#: every workload.
SCREENING_OPTIONS: Mapping[str, str] = {
    "max_update_norm": "update_norm_bound",
    "norm_median_ratio": "update_norm_ratio",
    "clip_norm": "clip_norm",
    "min_replies": "min_replies",
    "dp_noise_multiplier": "dp_noise",
    "dp_delta": "dp_delta",
    "dp_clipping": "dp_clipping",
    "update_dtype": "update_dtype",
}


def rule_options(name: str, settings: Any) -> dict[str, Any]:
    """The strategy keywords of rule ``name`` and the screening, read from ``settings``' fields."""
    options = {option: getattr(settings, field_name) for option, field_name in RULES[name].options.items()}
    options.update({option: getattr(settings, field_name) for option, field_name in SCREENING_OPTIONS.items()})
    return options


#: ``--help`` texts of the :class:`GuardedSettings` fields, shared by every workload's CLI.
GUARDED_HELPS: Mapping[str, str] = {
    "update_norm_bound": "refuse an update whose norm |w_k - w| exceeds this (0 = off)",
    "update_norm_ratio": "refuse an update whose norm exceeds this x the round's median (0 = off)",
    "clip_norm": "scale accepted updates down to this norm (0 = off)",
    "min_replies": "fewer valid replies: the round fails and the global model stays",
    "reply_timeout": "seconds a round waits for its clients; later replies are dropped (0 = no limit)",
    "dp_noise": "differential privacy: Gaussian noise multiplier (needs --clip-norm)",
    "dp_delta": "delta at which epsilon is reported",
    "dp_clipping": "who clips updates to --clip-norm: server, or client (before sending; needed with SecAgg+)",
    "update_dtype": "float16 / int8: clients send their update w_k - w in 16 bits (half the upload) "
    "or 8 bits with a scale per 256 values (0.27x)",
    "secure_aggregation": "SecAgg+ (Flower's): the server sees only the sum of the updates (fedavg, >= 3 clients)",
    "faults": "inject client faults in simulated runs, e.g. crash=0.1,scale=100:0.05 (docs/reliability.md)",
}


@dataclass
class GuardedSettings(Settings):
    """The settings every federated workload shares: the screening of every rule
    (``strategies.RobustFedAvg``; 0 = off), differential privacy and fault injection.
    Workload settings subclass it, so the fields, their CLI flags and their validation
    exist once."""

    update_norm_bound: float = 0.0  # refuse an update whose norm |w_k - w| exceeds this
    update_norm_ratio: float = 0.0  # refuse an update whose norm exceeds this x the round's median
    clip_norm: float = 0.0  # scale accepted updates down to this norm
    min_replies: int = 1  # fewer valid replies: the round fails, the global model stays
    reply_timeout: float = 0.0  # seconds a round waits for its clients; later ones are dropped (0 = no limit)
    dp_noise: float = 0.0  # differential privacy: Gaussian noise multiplier (needs clip_norm; FedAvg only)
    dp_delta: float = 1e-5  # the delta epsilon is reported at
    dp_clipping: str = "server"  # who clips to clip_norm: "server" or "client" (federated/clipping.py)
    update_dtype: str = "float32"  # "float16"/"int8": clients send w_k - w in 16/8 bits (federated/compression.py)
    secure_aggregation: bool = False  # Flower's SecAgg+: the server sees only the sum (federated/secagg.py)
    faults: str = ""  # injected client faults for simulated runs, e.g. "crash=0.1,scale=100:0.05" (federated/faults.py)

    def __post_init__(self) -> None:
        """Validate the shared fields (and ``trim_fraction`` where present), naming the field."""
        from fedspeech.federated.compression import UPDATE_DTYPES
        from fedspeech.federated.faults import parse_faults

        for field_name in ("update_norm_bound", "update_norm_ratio", "clip_norm", "dp_noise", "reply_timeout"):
            value = getattr(self, field_name)
            if not (value >= 0 and value != float("inf")):
                raise ValueError(f"{field_name}: must be finite and >= 0 (0 = off), got {value}")
        if self.dp_noise > 0 and self.clip_norm <= 0:
            raise ValueError("dp_noise: needs clip_norm > 0 (it bounds each client's contribution)")
        if self.dp_clipping not in CLIPPING_SIDES:
            raise ValueError(f"dp_clipping: must be one of {CLIPPING_SIDES}, got {self.dp_clipping!r}")
        if self.dp_clipping == "client" and self.clip_norm <= 0:
            raise ValueError("dp_clipping: 'client' needs clip_norm > 0 (the norm clients clip to)")
        if self.update_dtype not in UPDATE_DTYPES:
            raise ValueError(f"update_dtype: must be one of {UPDATE_DTYPES}, got {self.update_dtype!r}")
        if self.update_dtype == "int8" and self.dp_clipping == "client":
            raise ValueError(
                "update_dtype: int8 rounding can push a client-clipped update past clip_norm, which the "
                "server then refuses; use float16 or dp_clipping 'server'"
            )
        if not 0 < self.dp_delta < 1:
            raise ValueError(f"dp_delta: must be in (0, 1), got {self.dp_delta}")
        if self.min_replies < 1:
            raise ValueError(f"min_replies: must be >= 1, got {self.min_replies}")
        trim = getattr(self, "trim_fraction", 0.0)
        if not 0.0 <= trim < 0.5:
            raise ValueError(f"trim_fraction: must be in [0, 0.5), got {trim}")
        parse_faults(self.faults)  # fails now, naming the entry
        if self.secure_aggregation:
            from fedspeech.federated.secagg import check_secagg

            check_secagg(getattr(self, "strategy", "partial"), self)
