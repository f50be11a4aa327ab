"""Alert rules, the dashboard and the runbooks stay consistent with the metrics."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import orjson
import pytest
import yaml

from sidecar.telemetry.metrics import Metrics

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "deploy" / "prometheus" / "sidecar-alerts.yaml"
DASHBOARD = ROOT / "deploy" / "grafana" / "sidecar-dashboard.json"
RUNBOOKS = ROOT / "docs" / "runbooks.md"
_SUFFIXES = ("_total", "_bucket", "_count", "_sum")


def declared_series() -> set[str]:
    names = set()
    for family in Metrics().registry.collect():
        names.add(family.name)
        names.update(family.name + suffix for suffix in _SUFFIXES)
    return names


def referenced_series(expr: str) -> set[str]:
    return set(re.findall(r"\bsidecar_[a-z_]+", expr))


def runbook_anchors() -> set[str]:
    headings = re.findall(r"^## (.+)$", RUNBOOKS.read_text(), re.M)
    return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in headings}


def test_alert_rules_are_complete_and_use_real_series() -> None:
    rules = yaml.safe_load(RULES.read_text())["groups"][0]["rules"]
    declared = declared_series()
    anchors = runbook_anchors()
    names = {rule["alert"] for rule in rules}
    assert {
        "SidecarCircuitOpen",
        "SidecarHighFallbackRate",
        "SidecarHighErrorRate",
        "SidecarHighLatencyP99",
        "SidecarPredictionDrift",
        "SidecarSchemaViolations",
        "SidecarLogDrops",
        "SidecarUpstreamNotReady",
        "SidecarInputsStopped",
        "SidecarInputQuality",
    } <= names
    for rule in rules:
        assert rule["annotations"]["summary"], rule["alert"]
        assert rule["labels"]["severity"] in ("page", "ticket"), rule["alert"]
        assert rule["for"], rule["alert"]
        used = referenced_series(rule["expr"])
        assert used, rule["alert"]
        assert used <= declared, (rule["alert"], used - declared)
        link = rule["annotations"]["runbook_url"]
        assert link.startswith("docs/runbooks.md#"), rule["alert"]
        assert link.split("#", 1)[1] in anchors, (rule["alert"], link)


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool not installed")
def test_promtool_accepts_the_rules() -> None:
    result = subprocess.run(
        ["promtool", "check", "rules", str(RULES)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS: 11 rules found" in result.stdout


def test_dashboard_panels_query_real_series() -> None:
    dashboard = orjson.loads(DASHBOARD.read_bytes())
    declared = declared_series()
    used: set[str] = set()
    for panel in dashboard["panels"]:
        for target in panel["targets"]:
            series = referenced_series(target["expr"])
            assert series <= declared, (panel["title"], series - declared)
            used |= series
    # Every family the sidecar exports appears on the dashboard.
    families = {f.name for f in Metrics().registry.collect()}
    missing = {f for f in families if not any(u.startswith(f) for u in used)}
    assert missing <= {"sidecar_log_written", "sidecar_circuit_transitions"}, missing
