"""Command-line flags generated from a settings dataclass, so that a job's CLI, its Python
API and its Flower run config (kebab-case keys) can never disagree on a name or a default."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Collection, Mapping
from typing import Any


def add_settings_flags(parser: argparse.ArgumentParser, settings_type: type, helps: Mapping[str, str], *,
                       choices: Mapping[str, Collection[str]] | None = None, skip: Collection[str] = (),
                       flag_names: Mapping[str, str] | None = None) -> None:
    """One ``--kebab-name`` flag per field (``--flag/--no-flag`` for booleans), default ``None``
    so that :func:`given_settings` can tell which values the user set."""
    choices, flag_names = choices or {}, flag_names or {}
    for field in dataclasses.fields(settings_type):
        if field.name in skip:
            continue
        flag = flag_names.get(field.name, "--" + field.name.replace("_", "-"))
        help_text = f"{helps.get(field.name, '')} (default: {field.default})".strip()
        if field.type in ("bool", bool):
            parser.add_argument(flag, dest=field.name, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            parser.add_argument(flag, dest=field.name, type=type(field.default), default=None,
                                choices=choices.get(field.name), metavar=field.name.upper(), help=help_text)


def given_settings(args: argparse.Namespace, settings_type: type) -> dict[str, Any]:
    """The settings fields the user gave on the command line."""
    return {f.name: getattr(args, f.name) for f in dataclasses.fields(settings_type)
            if getattr(args, f.name, None) is not None}
