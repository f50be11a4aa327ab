"""The wheel's build hook: compiles the request path with mypyc (build_native.py)."""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class NativeBuildHook(BuildHookInterface):
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        self._scratch: str | None = None
        if self.target_name != "wheel" or version == "editable":
            return  # an editable install runs the sources (build_native.py --inplace compiles)
        if os.environ.get("SIDECAR_PURE_PYTHON", "") not in ("", "0"):
            return
        spec = importlib.util.spec_from_file_location(
            "build_native", Path(self.root) / "build_native.py"
        )
        if spec is None or spec.loader is None:
            raise RuntimeError("build_native.py is missing from the source tree")
        native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(native)
        self._scratch = tempfile.mkdtemp(prefix="sidecar-wheel-")
        try:
            made = native.compile_modules(Path(self._scratch))
        except SystemExit as exc:
            raise RuntimeError(
                f"{exc}\nTo install without compiling (slower), set SIDECAR_PURE_PYTHON=1"
            ) from None
        for path in made:
            build_data["force_include"][str(Path(self._scratch) / path)] = str(path)
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def finalize(self, version: str, build_data: dict[str, Any], artifact_path: str) -> None:
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)
