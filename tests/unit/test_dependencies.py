"""Every third-party package ``service/`` imports is declared in ``pyproject.toml``."""

from __future__ import annotations

import ast
import importlib.metadata
import re
import sys
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared_distributions() -> set[str]:
    """The distributions named by ``[project.dependencies]`` and every extra."""
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    specs = [
        *project["dependencies"],
        *(s for extra in project.get("optional-dependencies", {}).values() for s in extra),
    ]
    return {_normalised(re.match(r"[A-Za-z0-9._-]+", spec)[0]) for spec in specs}  # type: ignore[index]


def imported_top_level_names() -> dict[str, str]:
    """Each top-level module name ``service/`` imports (at any depth of the code), with one file importing it."""
    names: dict[str, str] = {}
    for path in sorted((REPO / "service").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                found = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                found = [node.module]
            else:
                continue
            for name in found:
                names.setdefault(name.partition(".")[0], str(path.relative_to(REPO)))
    return names


def test_every_third_party_import_is_declared() -> None:
    distributions = importlib.metadata.packages_distributions()
    declared = declared_distributions()
    undeclared: dict[str, str] = {}
    for name, where in imported_top_level_names().items():
        if name in sys.stdlib_module_names or name in {"service", "__future__"}:
            continue
        providers = {_normalised(d) for d in distributions.get(name, [])}
        assert providers, f"{name} (imported in {where}) is not installed"
        if not providers & declared:
            undeclared[name] = f"{where}: provided by {sorted(providers)}"
    assert undeclared == {}
