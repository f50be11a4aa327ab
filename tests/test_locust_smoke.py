"""A short headless locust run against `sidecar demo`: every scenario, no unexpected answer."""

from __future__ import annotations

import csv
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import Demo

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.timeout(120)
def test_locust_smoke_against_the_demo(demo: Demo, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtests" / "locustfile.py"),
            "--host",
            demo.url("sidecar"),
            "--headless",
            "-u",
            "8",
            "-r",
            "8",
            "-t",
            "6s",
            "--tags",
            "steady",
            "mixed",
            "stream",
            "--only-summary",
            "--exit-code-on-error",
            "1",
            "--csv",
            str(tmp_path / "smoke"),
            "--stop-timeout",
            "5",
            "SidecarUser",  # the burst user has its own tag
        ],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    with (tmp_path / "smoke_stats.csv").open() as handle:
        rows = {row["Name"]: row for row in csv.DictReader(handle)}
    for name in (
        "infer",
        "mixed: valid",
        "mixed: schema-invalid",
        "mixed: unauthorized",
        "mixed: oversized",
        "stream",
    ):
        assert int(rows[name]["Request Count"]) > 0, name
        assert int(rows[name]["Failure Count"]) == 0, name
