"""The container recipe lints clean and holds what the emulated container relies on
(the image itself is run in test_documented_commands)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


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
    """What the emulated container in test_documented_commands relies on."""
    text = (ROOT / "Dockerfile").read_text()
    assert re.search(r"^USER (?!root|0\b)\S+", text, re.M)
    assert re.search(r'^\s+CMD \["sidecar", "healthcheck"\]', text, re.M)
    assert 'ENTRYPOINT ["sidecar", "run"]' in text
    assert re.search(r"^ENV .*SIDECAR_CONFIG=/etc/sidecar/sidecar.yaml", text, re.M | re.S)
    assert "COPY config/minimal.yaml /etc/sidecar/sidecar.yaml" in text
    assert 'pip install --no-cache-dir ".[redis]"' in text
