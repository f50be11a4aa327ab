"""A short headless locust run against `sidecar demo`: every scenario, no unexpected answer."""

from __future__ import annotations

import csv
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def demo_url() -> object:
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sidecar",
            "demo",
            "--port",
            "0",
            "--model-port",
            "0",
            "--shadow-port",
            "0",
            "--admin-port",
            "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        cwd=ROOT,
    )
    assert process.stdout is not None
    banner = b""
    while b"Ctrl-C" not in banner:
        line = process.stdout.readline()
        assert line, "the demo exited early"
        banner += line
    url = re.search(rb"sidecar\s+(http://\S+)", banner)
    assert url is not None
    yield url.group(1).decode()
    process.terminate()
    process.communicate(timeout=30)


@pytest.mark.timeout(120)
def test_locust_smoke_against_the_demo(demo_url: str, tmp_path: Path) -> None:
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "locust",
            "-f",
            str(ROOT / "loadtests" / "locustfile.py"),
            "--host",
            demo_url,
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
