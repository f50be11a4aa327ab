"""The benchmark script runs with one command: a one-second, one-round pass of two suites.

Speed is not asserted here (the benchmark prints ratios for people to read); these
tests check that the script starts every contender, loads it and reports every row.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

ROOT = Path(__file__).resolve().parent.parent


def run_bench(tmp_path: Path, *args: str) -> dict[str, Any]:
    out = tmp_path / "bench.json"
    result = subprocess.run(
        [sys.executable, str(ROOT / "loadtests" / "bench.py"), *args, "--json", str(out)],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    report: dict[str, Any] = orjson.loads(out.read_bytes())
    return report


@pytest.mark.timeout(180)
def test_compare_suite_measures_every_contender_at_every_level(tmp_path: Path) -> None:
    report = run_bench(
        tmp_path,
        "--suite",
        "compare",
        "--contenders",
        "minimal,passthrough",
        "--duration",
        "1",
        "--rounds",
        "1",
    )
    rows = report["compare"]["rows"]
    closed_loop = {
        (r["contender"], r["concurrency"]) for r in rows if "open loop" not in r["contender"]
    }
    for name in ("minimal-proxy", "sidecar-passthrough"):
        for level in (1, 16, 64):
            assert (name, level) in closed_loop
        assert (f"{name} (20ms model)", 256) in closed_loop
    for row in rows:
        assert row["rps"] > 0, row
        if row["concurrency"] in (1, 16):
            assert row["errors"] == 0, row
    sidecar = [r for r in rows if r["contender"] == "sidecar-passthrough"]
    assert all(r["cpu_us_per_request"] > 0 and r["peak_rss_mb"] > 0 for r in sidecar)
    assert "c=16 sidecar-passthrough / minimal rps" in report["compare"]["ratios"]


def test_lograte_suite_accounts_for_every_record(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--suite", "lograte", "--duration", "0.3")
    rows = report["lograte"]["rows"]
    assert [r["concurrency"] for r in rows] == [5000, 20000, 50000]
    for row in rows:
        # written per second, plus what was dropped, is what was fed
        fed = row["rps"] * 0.3 + row["errors"]
        assert fed == pytest.approx(row["concurrency"] * 0.3, rel=0.1)
