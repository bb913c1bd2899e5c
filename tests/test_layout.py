"""The dependency direction: monitor -> detectors, storage; never the other way."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN = {
    "detectors": {"monitor", "storage"},
    "storage": {"monitor", "detectors", "jax", "jaxlib", "flax", "optax"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_package_imports_respect_direction(package):
    violations = {
        str(path.relative_to(ROOT)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted((ROOT / package).rglob("*.py"))
    }
    assert {path: names for path, names in violations.items() if names} == {}


def test_alembic_folder_is_not_a_package():
    # An importable top-level "alembic" would shadow the Alembic library.
    assert not (ROOT / "alembic" / "__init__.py").exists()
