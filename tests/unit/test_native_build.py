"""Modules compiled in place must never run in place of sources edited since: the
stamp names the sources a build was made from, and a changed one is noticed."""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path
from types import ModuleType

ROOT = Path(__file__).resolve().parents[2]


def load(path: Path, name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_build_older_than_its_sources_is_named_and_a_current_one_is_not(
    tmp_path: Path,
) -> None:
    checkout = tmp_path / "checkout"
    shutil.copytree(
        ROOT / "sidecar", checkout / "sidecar", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    shutil.copy(ROOT / "build_native.py", checkout)
    package = load(checkout / "sidecar" / "__init__.py", "checkout_sidecar")
    native = load(checkout / "build_native.py", "checkout_build_native")
    assert package.stale_build() is None  # never compiled: the sources run

    # As build_native.py --inplace leaves it: an extension module and the stamp.
    (checkout / "sidecar" / "http" / "server.cpython-311-x86_64-linux-gnu.so").write_bytes(b"")
    (checkout / "build").mkdir()
    (checkout / "build" / "native-stamp").write_text(native.source_digest() + "\n")
    assert package.stale_build() is None
    assert native.stale() is None

    # Any source counts, compiled or not: a compiled module is built against them all.
    config = checkout / "sidecar" / "config" / "schema.py"
    config.write_text(config.read_text() + "\n# edited\n")
    assert "changed" in (package.stale_build() or "")
    assert native.main(["--check"]) == 1
