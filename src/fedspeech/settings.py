"""The settings base class of every workload: one dataclass is the job's Python API, its
command-line flags and its Flower run config (flat scalars, kebab-case keys), so the three can
never disagree on a name, a type or a default."""

from __future__ import annotations

import argparse
import dataclasses
import math
from collections.abc import Collection, Mapping
from typing import Any, TypeVar

_S = TypeVar("_S", bound="Settings")


@dataclasses.dataclass
class Settings:
    """Base of the workload settings dataclasses (every field a scalar with a default).

    Flower hands a ServerApp/ClientApp its settings as ``run_config`` (``[tool.flwr.app.config]``
    in the app's pyproject.toml, ``flwr run . -c "k=v"``), so fields travel as kebab-case
    scalars; ``from_run_config`` coerces the types back and ``__post_init__`` of the subclass
    validates, naming the field."""

    def to_run_config(self) -> dict[str, Any]:
        return {f.name.replace("_", "-"): getattr(self, f.name) for f in dataclasses.fields(self)}

    @classmethod
    def from_run_config(cls: type[_S], config: Mapping[str, Any]) -> _S:
        """Build from a Flower run config; unknown keys are ignored, types are coerced."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            key = f.name.replace("_", "-")
            if key not in config:
                continue
            kind: type[Any] = type(f.default)
            raw = config[key]
            values[f.name] = (str(raw).lower() in ("1", "true", "yes")) if kind is bool else kind(raw)
        return cls(**values)


def add_settings_flags(
    parser: argparse.ArgumentParser,
    settings_type: type,
    helps: Mapping[str, str],
    *,
    choices: Mapping[str, Collection[str]] | None = None,
    skip: Collection[str] = (),
    flag_names: Mapping[str, str] | None = None,
) -> None:
    """One ``--kebab-name`` flag per field (``--flag/--no-flag`` for booleans), default ``None``
    so that :func:`given_settings` can tell which values the user set."""
    choices, flag_names = choices or {}, flag_names or {}
    inherited = {f.name for base in settings_type.__mro__[1:] if dataclasses.is_dataclass(base)
                 for f in dataclasses.fields(base)}  # fmt: skip
    # the workload's own flags first, the shared ones (screening, privacy, faults) after them
    for field in sorted(dataclasses.fields(settings_type), key=lambda f: f.name in inherited):
        if field.name in skip:
            continue
        flag = flag_names.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = f"{helps.get(field.name, '')} (default: {field.default})".strip()
        if field.type in ("bool", bool):
            parser.add_argument(
                flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text
            )
        else:
            parser.add_argument(
                flag,
                dest=field.name,
                type=type(field.default),
                default=None,
                choices=choices.get(field.name),
                metavar=field.name.upper(),
                help=help_text,
            )


def given_settings(args: argparse.Namespace, settings_type: type) -> dict[str, Any]:
    """The settings fields the user gave on the command line."""
    return {
        f.name: getattr(args, f.name)
        for f in dataclasses.fields(settings_type)
        if getattr(args, f.name, None) is not None
    }


def round_lr(lr: float, server_round: int, warmup_rounds: int, rounds: int, min_lr_ratio: float) -> float:
    """Learning rate of a federated round: linear warm-up over ``warmup_rounds``, then cosine
    decay to ``min_lr_ratio * lr`` at the last round.

    Scheduled per round (not per local step) because clients run different step counts; a
    round-indexed schedule makes every client and a resumed run agree.
    """
    if server_round <= warmup_rounds:
        return lr * server_round / max(1, warmup_rounds)
    span = max(1, rounds - warmup_rounds)
    progress = min(1.0, (server_round - warmup_rounds) / span)
    floor = lr * min_lr_ratio
    return floor + (lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
