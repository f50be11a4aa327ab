"""The Kubernetes manifests validate, and the config they carry is a valid sidecar config."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import yaml

from sidecar.config import parse_config

K8S = Path(__file__).resolve().parent.parent / "deploy" / "k8s"


def test_manifests_validate_strictly() -> None:
    files = sorted(str(p) for p in K8S.glob("*.yaml"))
    assert len(files) == 6
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", *files],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.count("passed") == 6


def test_the_deployment_probes_the_sidecar_and_runs_unprivileged() -> None:
    deployment = yaml.safe_load((K8S / "deployment.yaml").read_text())
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    sidecar = next(c for c in pod["containers"] if c["name"] == "sidecar")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for container in pod["containers"]:
        assert container["resources"]["requests"]
        assert container["resources"]["limits"]
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in K8S.glob("*.yaml")}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_the_configmap_holds_a_valid_sidecar_config() -> None:
    configmap = yaml.safe_load((K8S / "configmap.yaml").read_text())
    secret = yaml.safe_load((K8S / "secret.yaml").read_text())
    digest = secret["stringData"]["ranking-service"]
    config = parse_config(
        configmap["data"]["sidecar.yaml"],
        source="configmap",
        env={"RANKING_SERVICE_KEY_DIGEST": digest},
    )
    assert config.auth.api_keys[0].digest == digest
