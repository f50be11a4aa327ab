"""``sidecar demo``: the demo model, its candidate, and the sidecar in front of them."""

from __future__ import annotations

import asyncio
import os
import signal
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path

from sidecar.config.plan import load_plan
from sidecar.config.schema import ConfigError, ConfigIssue, bundled_config_dir, cannot_listen
from sidecar.control.server import RunningSidecar
from sidecar.demo.model import IrisModel, ModelServer, candidate_model, production_model

DEMO_KEY = "demo-key"  # config/demo.yaml holds only its digest
DEMO_INPUT = (
    '{"inputs":[{"name":"input-0","shape":[1,4],"datatype":"FP32","data":[5.1,3.5,1.4,0.2]}]}'
)


@dataclass(frozen=True, slots=True)
class DemoPorts:
    port: int = 8080
    model_port: int = 8081
    shadow_port: int = 8082
    admin_port: int = 9901


def demo_environment(ports: DemoPorts, log_dir: Path) -> dict[str, str]:
    """The variables config/demo.yaml reads, on top of the process environment."""
    return {
        **os.environ,
        "SIDECAR_DEMO_PORT": str(ports.port),
        "SIDECAR_DEMO_ADMIN_PORT": str(ports.admin_port),
        "SIDECAR_DEMO_MODEL_URL": f"http://127.0.0.1:{ports.model_port}",
        "SIDECAR_DEMO_SHADOW_URL": f"http://127.0.0.1:{ports.shadow_port}",
        "SIDECAR_DEMO_LOG_DIR": str(log_dir),
    }


def demo_log_dir(given: str | None) -> Path:
    """``--log-dir``, or a fresh folder per run: two demos never share their logs."""
    if given:
        return Path(given).resolve()
    return Path(tempfile.mkdtemp(prefix="sidecar-demo-"))


async def _start_model(model: IrisModel, flag: str, port: int) -> tuple[ModelServer, int]:
    """The model served on 127.0.0.1; returns the server and its bound port."""
    server = ModelServer(model)
    try:
        bound = await server.listen("127.0.0.1", port)
    except OSError as exc:
        await server.stop()
        raise cannot_listen("sidecar demo", flag, "127.0.0.1", port, exc) from None
    return server, bound


def banner(ports: DemoPorts, log_dir: Path) -> str:
    base = f"http://127.0.0.1:{ports.port}"
    return "\n".join(
        [
            "sidecar demo is running:",
            f"  sidecar        {base}   (proxying the iris model)",
            f"  admin          http://127.0.0.1:{ports.admin_port}/health  and  /metrics",
            f"  model          http://127.0.0.1:{ports.model_port}   (POST /demo/chaos breaks it)",
            f"  candidate      http://127.0.0.1:{ports.shadow_port}",
            f"  logs           {log_dir}/   (payloads.jsonl, shadow.jsonl)",
            "",
            f"the demo API key is {DEMO_KEY}; try:",
            f"  curl -i -H 'Authorization: Bearer {DEMO_KEY}' \\",
            f"       -H 'Content-Type: application/json' -d '{DEMO_INPUT}' \\",
            f"       {base}/v2/models/iris/infer",
            "",
            "Ctrl-C stops everything.",
        ]
    )


async def run_demo(ports: DemoPorts, log_dir: Path) -> None:
    """Serve the demo until SIGINT or SIGTERM. A port of 0 takes any free port.

    Raises ``ConfigError`` naming the flag of a port it cannot listen on.
    """
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    model, model_port = await _start_model(production_model(), "--model-port", ports.model_port)
    candidate: ModelServer | None = None
    sidecar: RunningSidecar | None = None
    try:
        candidate, shadow_port = await _start_model(
            candidate_model(), "--shadow-port", ports.shadow_port
        )
        env = demo_environment(
            replace(ports, model_port=model_port, shadow_port=shadow_port), log_dir
        )
        plan = await asyncio.to_thread(load_plan, bundled_config_dir() / "demo.yaml", env=env)
        # The same variables on a reload: it must keep pointing at these ports.
        sidecar = RunningSidecar(plan, env=env)
        try:
            await sidecar.start()
        except ConfigError as exc:
            flags = {"listen.port": "--port", "admin.port": "--admin-port"}
            issues = [ConfigIssue(flags.get(i.path, i.path), i.message) for i in exc.issues]
            raise ConfigError("sidecar demo", issues) from None
        actual = DemoPorts(sidecar.main_port, model_port, shadow_port, sidecar.admin_port)
        print(banner(actual, log_dir), flush=True)
        await stop.wait()
    finally:
        if sidecar is not None:
            await sidecar.stop()
        if candidate is not None:
            await candidate.stop()
        await model.stop()
