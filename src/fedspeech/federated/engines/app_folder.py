"""Flower app folders: the ``[tool.flwr.app]`` table of an app, a generated app folder per
workload, run-config files and ``--node-config`` strings (Flower's own formats)."""

from __future__ import annotations

import logging
import re
import tomllib
from pathlib import Path
from typing import Any

import tomli_w

log = logging.getLogger(__name__)

_SCALARS = (bool, int, float, str)


def app_config(app_dir: Path) -> dict[str, Any]:
    """The ``[tool.flwr.app.config]`` table of a Flower app, with a clear error if the
    folder is not a Flower app."""
    pyproject = Path(app_dir) / "pyproject.toml"
    if not pyproject.is_file():
        raise FileNotFoundError(f"{pyproject}: not found; a Flower app folder needs a pyproject.toml")
    with pyproject.open("rb") as f:
        data = tomllib.load(f)
    app = data.get("tool", {}).get("flwr", {}).get("app")
    if not isinstance(app, dict) or "components" not in app:
        raise ValueError(f"{pyproject}: no [tool.flwr.app.components] table, so not a Flower app")
    return dict(app.get("config", {}))


def project_app_dir() -> Path:
    """The fedspeech Flower app folder: the source checkout's root, whose pyproject.toml
    holds ``[tool.flwr.app]`` (``flwr run`` packs an app from a folder, not a package)."""
    root = Path(__file__).resolve().parents[4]
    try:
        app_config(root)
    except (FileNotFoundError, ValueError) as exc:
        raise FileNotFoundError(
            f"fedspeech is not installed from a source checkout ({exc}); pass the checkout folder as the app folder"
        ) from None
    return root


def write_app_folder(
    folder: Path, name: str, description: str, components: dict[str, str], run_config: dict[str, Any]
) -> Path:
    """A Flower app folder (a ``pyproject.toml`` only) whose components are importable
    ``module:object`` names of this package and whose ``[tool.flwr.app.config]`` is
    ``run_config``, so ``flwr run FOLDER`` runs a workload other than the checkout's own
    app (the repository's ``pyproject.toml`` declares the pretraining app)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    document = {
        "build-system": {"requires": ["setuptools>=68"], "build-backend": "setuptools.build_meta"},
        "project": {
            "name": name,
            "version": "0.1.0",
            "license": "Apache-2.0",
            "description": description,
            "dependencies": [],
        },
        "tool": {"flwr": {"app": {"publisher": "fedspeech", "components": components, "config": run_config}}},
    }
    (folder / "pyproject.toml").write_text(tomli_w.dumps(document))
    return folder


def write_run_config(path: Path, run_config: dict[str, Any], app_dir: Path) -> Path:
    """Write run-config overrides as the TOML file ``flwr run --run-config`` reads.

    ``flwr`` only accepts keys that exist in the app's ``[tool.flwr.app.config]``; we check
    first so the error names the key and the file instead of a CLI traceback.
    """
    known = app_config(app_dir)
    unknown = sorted(set(run_config) - set(known))
    if unknown:
        raise ValueError(
            f"run_config keys {unknown} are not in [tool.flwr.app.config] of "
            f"{Path(app_dir) / 'pyproject.toml'} (known: {sorted(known)})"
        )
    for key, value in run_config.items():
        if not isinstance(value, _SCALARS):
            raise ValueError(f"run_config[{key!r}] = {value!r}: Flower run configs hold only str, int, float or bool")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(tomli_w.dumps(dict(run_config)))
    return path


def node_config_arg(config: dict[str, Any]) -> str:
    """Format a SuperNode's ``--node-config`` string.

    Strings are quoted (TOML literal strings): Flower splits the argument on spaces and
    reads an argument that ends in ``.toml`` as a file name, so an unquoted path would break.
    """
    parts = []
    for key, value in config.items():
        if not re.fullmatch(r"[A-Za-z0-9_-]+", key):
            raise ValueError(f"node config key {key!r}: use letters, digits, '-' or '_'")
        if isinstance(value, bool):
            text = "true" if value else "false"
        elif isinstance(value, (int, float)):
            text = repr(value)
        elif isinstance(value, str):
            if "'" not in value and "\n" not in value:
                text = f"'{value}'"
            elif '"' not in value and "\\" not in value and "\n" not in value:
                text = f'"{value}"'
            else:
                raise ValueError(f"node config {key}={value!r}: cannot quote a value holding both quote kinds")
        else:
            raise ValueError(f"node config {key}={value!r}: only str, int, float or bool")
        parts.append(f"{key}={text}")
    return " ".join(parts)
