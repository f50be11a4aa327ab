"""The package's layers: every import points down (DESIGN.md), and the offline tools
are never imported by the server."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "sidecar"
# Lowest first. A module may import its own layer and any below it.
LAYERS = ["config", "telemetry", "http", "analytics", "upstream", "pipeline", "control"]
ROOT_LEAVES = {"background"}  # used by every layer, imports nothing of the sidecar
ENTRY_POINTS = {"cli", "__main__", "tools", "demo"}  # on top: may import anything


def _layer(module: str) -> str:
    """``sidecar.upstream.breaker`` -> ``upstream``."""
    return module.split(".")[1]


def _sidecar_imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("sidecar"):
            if node.module == "sidecar":
                found.update(f"sidecar.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.startswith("sidecar."))
    return found


def _modules() -> dict[str, Path]:
    return {
        "sidecar." + ".".join(p.relative_to(PACKAGE).with_suffix("").parts): p
        for p in PACKAGE.rglob("*.py")
        if "_bundled_config" not in p.parts
    }


def upward_imports(graph: dict[str, set[str]]) -> list[str]:
    """Imports that point up a layer, or into or out of no layer at all."""
    wrong = []
    for module, imports in graph.items():
        own = _layer(module)
        if own in ENTRY_POINTS or own == "__init__":
            continue
        for imported in imports:
            target = _layer(imported)
            if target in ROOT_LEAVES:
                continue
            if own in ROOT_LEAVES or target not in LAYERS or own not in LAYERS:
                wrong.append(f"{module} imports {imported}")
            elif LAYERS.index(target) > LAYERS.index(own):
                wrong.append(f"{module} ({own}) imports {imported} ({target}), a layer above")
    return wrong


def test_every_import_points_down() -> None:
    graph = {module: _sidecar_imports(path) for module, path in _modules().items()}
    assert upward_imports(graph) == []


def test_an_upward_import_is_reported() -> None:
    graph = {
        "sidecar.upstream.breaker": {"sidecar.config.schema", "sidecar.pipeline.context"},
        "sidecar.http.server": {"sidecar.tools.labels"},
        "sidecar.control.app": {"sidecar.pipeline.stages", "sidecar.background"},
    }
    assert upward_imports(graph) == [
        "sidecar.upstream.breaker (upstream) imports sidecar.pipeline.context (pipeline), "
        "a layer above",
        "sidecar.http.server imports sidecar.tools.labels",
    ]


def test_every_module_belongs_to_a_layer() -> None:
    stray = [
        module
        for module in _modules()
        if _layer(module) not in {*LAYERS, *ROOT_LEAVES, *ENTRY_POINTS, "__init__"}
    ]
    assert stray == []


def test_the_package_does_not_import_aiohttp() -> None:
    """aiohttp is the tests' and load tests' client and fake server, not a dependency:
    neither `sidecar run` (8 MB of every worker's memory) nor `sidecar demo` loads it."""
    probe = (
        "import sys, sidecar.cli, sidecar.control.server, sidecar.demo.runner, "
        "sidecar.demo.traffic; "
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('aiohttp', 'yarl')))"
    )
    found = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert found.stdout.strip() == "[]"
