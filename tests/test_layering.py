"""The layering of docs/architecture.md: lower packages never import higher ones, so the
science (models, ssl, downstream) stays free of Flower apps and rule names."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src" / "fedspeech"
ALLOWED = {
    "data": set(),
    "models": set(),
    "ssl": {"models", "data"},
    "downstream": {"models", "data"},
    "profiling": {"models"},
    "federated": {"models", "data", "figures", "settings"},
}


def imported_packages(package: str) -> dict[str, set[str]]:
    """fedspeech subpackages each module of ``package`` imports (at any depth in the file)."""
    found: dict[str, set[str]] = {}
    for path in sorted((SRC / package).rglob("*.py")):
        names = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("fedspeech."):
                names.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                names.update(a.name.split(".")[1] for a in node.names if a.name.startswith("fedspeech."))
        found[str(path.relative_to(SRC))] = names - {package}
    return found


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_package_imports_only_lower_layers(package):
    wrong = {
        module: sorted(names - ALLOWED[package])
        for module, names in imported_packages(package).items()
        if names - ALLOWED[package]
    }
    assert not wrong, f"{package} may import only {sorted(ALLOWED[package])}: {wrong}"
