"""The container recipe lints clean, and the package installs the way it installs it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_dockerfile_passes_hadolint() -> None:
    hadolint = shutil.which("hadolint") or str(Path(sys.executable).parent / "hadolint")
    result = subprocess.run(
        [hadolint, str(ROOT / "Dockerfile")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_dockerfile_runs_as_non_root_with_healthcheck_and_entrypoint() -> None:
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r"^HEALTHCHECK .*\n?.*/livez", text, re.M)
    assert 'ENTRYPOINT ["sidecar", "run", "--config", "/etc/sidecar/sidecar.yaml"]' in text
    assert "pip install --no-cache-dir ." in text


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``pip install .`` as in the Dockerfile (dependencies come from this venv)."""
    target = tmp_path_factory.mktemp("site")
    source = tmp_path_factory.mktemp("src")
    # Copy only what the Dockerfile copies, so a file it forgets makes this fail.
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    for name in ("sidecar", "config"):
        shutil.copytree(
            ROOT / name, source / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--target",
            str(target),
            str(source),
        ],
        check=True,
        timeout=300,
        capture_output=True,
    )
    return target


def test_installed_package_carries_the_demo_config(installed: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(installed)}
    probe = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sidecar, sidecar.config as c; print(sidecar.__file__, c.bundled_config_dir())",
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
        env=env,
        cwd=installed,
    )
    module_file, config_dir = probe.stdout.split()
    assert module_file.startswith(str(installed))
    assert Path(config_dir, "demo.yaml").is_file()
    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "check-config", str(Path(config_dir, "demo.yaml"))],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        check=False,
        cwd=installed,
    )
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
