"""The log-writer suite accounts for every record it fed (the other suites run, as
documented, in test_documented_commands).

Speed is not asserted here (the benchmark prints ratios for people to read).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson

ROOT = Path(__file__).resolve().parents[2]


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


def test_lograte_suite_accounts_for_every_record(tmp_path: Path) -> None:
    report = run_bench(tmp_path, "--suite", "lograte", "--duration", "0.3")
    rows = report["lograte"]["rows"]
    assert [r["concurrency"] for r in rows] == [5000, 20000, 50000]
    ratios = report["lograte"]["ratios"]
    for row in rows:
        # every record fed was written or counted as dropped, none lost
        written = round(row["rps"] * 0.3)
        assert written + row["errors"] == ratios[f"{row['concurrency']}/s fed records"]
