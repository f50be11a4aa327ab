"""The Kubernetes manifests validate, and the pod works as written: ports that do not
collide, the model's files mounted, shutdown timed from the sidecar's own drain
settings, resources from a measured run, metrics scrapeable while reloading needs a
credential, and no shipped credential that works."""

from __future__ import annotations

import asyncio
import math
import os
import re
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from sidecar.config.schema import Config, ConfigError, parse_config
from sidecar.pipeline.auth import hash_key
from tests.conftest import LOOPBACK, FakeModel

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DEMO_DIGEST = hash_key("demo-key")


def manifest(name: str) -> dict[str, Any]:
    document: dict[str, Any] = yaml.safe_load((K8S / name).read_text())
    return document


def pod() -> dict[str, Any]:
    spec: dict[str, Any] = manifest("deployment.yaml")["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(c for c in pod()["containers"] if c["name"] == name)
    return found


def sidecar_config(env: dict[str, str] | None = None) -> Config:
    text = manifest("configmap.yaml")["data"]["sidecar.yaml"]
    digests = {"RANKING_SERVICE_KEY_DIGEST": hash_key("a"), "OPERATOR_KEY_DIGEST": hash_key("b")}
    return parse_config(text, source="configmap", env=env if env is not None else digests)


def quantity(value: str) -> float:
    """A Kubernetes quantity in base units (bytes, CPUs)."""
    units = {"Mi": 1024**2, "Gi": 1024**3, "Ki": 1024, "m": 0.001, "": 1}
    number, unit = re.fullmatch(r"([0-9.]+)([A-Za-z]*)", str(value)).groups()  # type: ignore[union-attr]
    return float(number) * units[unit]


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
    kinds = {yaml.safe_load(p.read_text())["kind"] for p in K8S.glob("*.yaml")}
    assert kinds == {
        "ConfigMap",
        "Secret",
        "Deployment",
        "Service",
        "HorizontalPodAutoscaler",
        "PodDisruptionBudget",
    }


def test_the_pod_runs_unprivileged_and_probes_the_sidecar() -> None:
    spec = pod()
    assert spec["securityContext"]["runAsNonRoot"] is True
    sidecar = container("sidecar")
    assert sidecar["livenessProbe"]["httpGet"]["path"] == "/livez"
    assert sidecar["readinessProbe"]["httpGet"]["path"] == "/readyz"
    for each in spec["containers"] + spec["initContainers"]:
        assert each["resources"]["requests"], each["name"]
        assert each["resources"]["limits"], each["name"]
        assert each["securityContext"]["allowPrivilegeEscalation"] is False, each["name"]


def test_ports_in_the_pod_do_not_collide_and_point_where_they_should() -> None:
    config = sidecar_config()
    model_env = {e["name"]: e["value"] for e in container("model")["env"]}
    model_ports = {
        "http": int(model_env["MLSERVER_HTTP_PORT"]),
        "grpc": int(model_env["MLSERVER_GRPC_PORT"]),
        "metrics": int(model_env["MLSERVER_METRICS_PORT"]),
    }
    used = [config.listen.port, config.admin.port, *model_ports.values()]
    assert len(set(used)) == len(used), used  # one network namespace: every port once
    upstream = config.upstreams["model"].url
    assert upstream == f"http://127.0.0.1:{model_ports['http']}"
    assert model_env["MLSERVER_HOST"] == "127.0.0.1"  # only the sidecar reaches the model
    ports = {p["name"]: p["containerPort"] for p in container("sidecar")["ports"]}
    assert ports == {"http": config.listen.port, "admin": config.admin.port}
    annotations = manifest("deployment.yaml")["spec"]["template"]["metadata"]["annotations"]
    assert int(annotations["prometheus.io/port"]) == config.admin.port
    service = manifest("service.yaml")["spec"]["ports"]
    assert [p["targetPort"] for p in service] == ["http"]  # the admin port is not a service


def test_the_model_files_are_mounted_where_the_model_server_reads_them() -> None:
    model = container("model")
    assert model["args"][-1] == "/models"
    mounts = {m["mountPath"]: m["name"] for m in model["volumeMounts"]}
    filler = pod()["initContainers"][0]
    assert {m["mountPath"]: m["name"] for m in filler["volumeMounts"]}["/models"] == mounts[
        "/models"
    ]
    volumes = {v["name"] for v in pod()["volumes"]}
    assert mounts["/models"] in volumes


def test_shutdown_is_timed_from_the_drain_settings() -> None:
    server = sidecar_config().server
    drain = server.drain_delay + server.drain_timeout
    assert server.drain_delay >= 3  # endpoints need a few seconds to stop sending
    model_stop = container("model")["lifecycle"]["preStop"]["sleep"]["seconds"]
    grace = pod()["terminationGracePeriodSeconds"]
    assert model_stop >= drain  # the model outlives every request the sidecar relays
    assert grace >= model_stop + 10  # and then has time to stop itself
    assert grace > drain
    probe = container("sidecar")["readinessProbe"]
    # The readiness probe notices the 503 while the sidecar still serves.
    assert probe["periodSeconds"] * probe["failureThreshold"] <= server.drain_delay


def test_reload_on_the_pod_network_needs_a_credential() -> None:
    config = sidecar_config()
    assert config.admin.host == "0.0.0.0"  # Prometheus scrapes it from the pod network
    assert config.admin.reload != "open"
    assert not config.admin.reload_open_to_all
    admins = [k for k in config.auth.api_keys if "admin" in k.scopes]
    assert admins, "someone must be able to reload over HTTP"


def test_the_shipped_secret_fails_closed() -> None:
    secret = manifest("secret.yaml")["stringData"]
    env = {
        "RANKING_SERVICE_KEY_DIGEST": secret["ranking-service"],
        "OPERATOR_KEY_DIGEST": secret["operator"],
    }
    with pytest.raises(ConfigError) as caught:
        sidecar_config(env)
    assert {issue.path for issue in caught.value.issues} == {
        "auth.api_keys[0].digest",
        "auth.api_keys[1].digest",
    }
    assert "sidecar hash-key" in caught.value.issues[0].message


def test_no_shipped_file_holds_a_working_credential() -> None:
    """The demo key's digest (its key is public) appears only in the demo's config."""
    tracked = subprocess.run(
        ["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    holders = [
        name
        for name in tracked
        if (ROOT / name).is_file()
        and not name.startswith("tests/")
        and DEMO_DIGEST.encode() in (ROOT / name).read_bytes()
    ]
    assert holders == ["config/demo.yaml"]


async def test_resources_cover_the_measured_worker(fake_model: FakeModel, tmp_path: Path) -> None:
    """Run the pod's config the way the pod runs it, put load on it, and check the
    memory request covers its idle RSS and the limit its peak with room to spare."""
    text = manifest("configmap.yaml")["data"]["sidecar.yaml"]
    text = text.replace("http://127.0.0.1:8081", fake_model.url)
    text = text.replace("port: 8080", "port: 0").replace("port: 9901", "port: 0")
    text = text.replace("host: 0.0.0.0", f"host: {LOOPBACK}")
    path = tmp_path / "sidecar.yaml"
    path.write_text(text)
    env = {
        **os.environ,
        "RANKING_SERVICE_KEY_DIGEST": hash_key("load"),
        "OPERATOR_KEY_DIGEST": hash_key("op"),
    }
    limits = container("sidecar")["resources"]
    cpus = quantity(limits["limits"]["cpu"])
    assert container("sidecar")["args"] == ["--workers", "auto"]
    workers = math.ceil(cpus)  # what --workers auto starts under this CPU limit
    assert workers == 1
    log = tmp_path / "sidecar.log"
    with log.open("wb") as sink:  # a file: a pipe nobody reads would stall its writer
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "sidecar",
            "run",
            "--config",
            str(path),
            stdout=sink,
            stderr=asyncio.subprocess.DEVNULL,
            env=env,
        )
    try:
        port = 0
        for _ in range(300):  # bounded: until the start-up line names the port
            match = re.search(rb'"listen":"[^"]*:(\d+)"', log.read_bytes())
            if match:
                port = int(match.group(1))
                break
            assert process.returncode is None, log.read_text()
            await asyncio.sleep(0.1)
        assert port, log.read_text()
        status = Path(f"/proc/{process.pid}/status")
        idle = _kib(status, "VmRSS") * 1024
        url = f"http://{LOOPBACK}:{port}/v2/models/iris/infer"
        headers = {"Authorization": "Bearer load", "Content-Type": "application/json"}
        async with aiohttp.ClientSession() as session:

            async def client() -> None:
                for _ in range(50):
                    async with session.post(url, data=b'{"inputs": []}', headers=headers) as r:
                        await r.read()

            await asyncio.gather(*(client() for _ in range(32)))
        peak = _kib(status, "VmHWM") * 1024
    finally:
        # SIGINT: the pod's drain_delay (5 s of serving on after SIGTERM) is not measured.
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 30)
    request = quantity(limits["requests"]["memory"])
    limit = quantity(limits["limits"]["memory"])
    assert request >= idle, (request, idle)
    assert limit >= 1.5 * peak * workers, (limit, peak)


def _kib(status: Path, field: str) -> int:
    match = re.search(rf"^{field}:\s+(\d+) kB", status.read_text(), re.M)
    assert match is not None
    return int(match.group(1))
