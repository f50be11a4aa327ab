"""Shared fixtures: a scriptable fake model server and a real sidecar, both on 127.0.0.1."""

from __future__ import annotations

import asyncio
import os
import re
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import orjson
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestServer

import sidecar
from sidecar.config.plan import load_plan
from sidecar.control.server import RunningSidecar
from sidecar.telemetry.logwriter import Sink

LOOPBACK = "127.0.0.1"
ROOT = Path(__file__).resolve().parent.parent


def pytest_configure(config: pytest.Config) -> None:
    # Compiled modules built from older sources would be tested instead of the sources.
    reason = sidecar.stale_build()
    if reason:
        pytest.exit(f"{reason}: run `.venv/bin/python build_native.py --inplace` (or --clean)", 2)
    if os.environ.get("SIDECAR_EXPECT_COMPILED") and not sidecar.compiled():
        pytest.exit("scripts/test expects the compiled build, and the sources run interpreted", 2)


def pytest_report_header() -> str:
    how = "compiled by mypyc" if sidecar.compiled() else "interpreted (pure Python)"
    return f"sidecar: the request path runs {how}"


@dataclass
class Hit:
    method: str
    path: str
    target: str  # the raw request target, path and query as sent
    headers: dict[str, list[str]]
    body: bytes


ModelHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class GatedHandler:
    """A fake model handler that holds each request until ``gate`` is set
    (``entered`` says one has arrived), then answers ``text``."""

    def __init__(self, text: str = "slow") -> None:
        self.gate = asyncio.Event()
        self.entered = asyncio.Event()
        self.text = text

    async def __call__(self, request: web.Request) -> web.Response:
        self.entered.set()
        await self.gate.wait()
        return web.Response(text=self.text)


@dataclass
class FakeModel:
    """A model server whose answers each test scripts; it records every request."""

    server: TestServer
    hits: list[Hit] = field(default_factory=list)
    routes: dict[str, ModelHandler] = field(default_factory=dict)
    health_status: int = 200
    health_gate: asyncio.Event | None = None  # when set, health answers wait for it

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.server.port}"

    def on(self, path: str, handler: ModelHandler) -> None:
        self.routes[path] = handler

    def hits_for(self, path: str) -> list[Hit]:
        return [h for h in self.hits if h.path == path]


async def _echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response(
        {"method": request.method, "path": request.raw_path, "size": len(body)},
        headers={"X-Model": "fake"},
    )


MakeFakeModel = Callable[[], Awaitable[FakeModel]]


@pytest.fixture
def make_fake_model(aiohttp_server: Any) -> MakeFakeModel:
    """Start another fake model server (each test may need several)."""

    async def make() -> FakeModel:
        app = web.Application(client_max_size=64 * 1024 * 1024)
        holder: list[FakeModel] = []

        async def dispatch(request: web.Request) -> web.StreamResponse:
            model = holder[0]
            if request.path == "/v2/health/ready":
                if model.health_gate is not None:
                    await model.health_gate.wait()
                return web.json_response(
                    {"ready": model.health_status == 200}, status=model.health_status
                )
            body = await request.read()
            headers: dict[str, list[str]] = {}
            for key, value in request.headers.items():
                headers.setdefault(key.lower(), []).append(value)
            model.hits.append(Hit(request.method, request.path, request.raw_path, headers, body))
            handler = model.routes.get(request.path, _echo)
            return await handler(request)

        app.router.add_route("*", "/{tail:.*}", dispatch)
        server = await aiohttp_server(app, host=LOOPBACK)
        model = FakeModel(server=server)
        holder.append(model)
        return model

    return make


@pytest.fixture
async def fake_model(make_fake_model: MakeFakeModel) -> FakeModel:
    return await make_fake_model()


def base_config(upstream_url: str, **overrides: Any) -> dict[str, Any]:
    """A minimal config dict for tests: one upstream, one catch-all route."""
    config: dict[str, Any] = {
        "listen": {"host": LOOPBACK, "port": 0},
        "admin": {"enabled": True, "host": LOOPBACK, "port": 0},
        "server": {"drain_timeout": "5s", "max_body_size": "1MiB"},
        "upstreams": {
            "model": {
                "url": upstream_url,
                "connect_timeout": "1s",
                "read_timeout": "5s",
                "health": {"interval": "1s", "timeout": "1s"},
            }
        },
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "model", "timeout": "5s"}],
    }
    for key, value in overrides.items():
        config[key] = value
    return config


class FakeClock:
    """A monotonic clock that moves only when a test says so."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@dataclass
class SidecarHandle:
    running: RunningSidecar
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.running.main_port}"

    @property
    def admin_url(self) -> str:
        return f"http://{LOOPBACK}:{self.running.admin_port}"


StartSidecar = Callable[..., Awaitable[SidecarHandle]]


@pytest.fixture
async def start_sidecar(tmp_path: Path) -> AsyncIterator[StartSidecar]:
    """Start a real sidecar from a config dict; every one started is stopped after."""
    started: list[SidecarHandle] = []

    async def start(
        config: dict[str, Any],
        *,
        wait_ready: bool = True,
        clock: FakeClock | None = None,
        log_sinks: dict[str, Sink] | None = None,
    ) -> SidecarHandle:
        path = tmp_path / f"sidecar-{len(started)}.yaml"
        path.write_text(yaml.safe_dump(config))
        plan = load_plan(path, env={})
        running = RunningSidecar(plan, clock=clock or time.monotonic, log_sinks=log_sinks)
        await running.start()
        handle = SidecarHandle(running, aiohttp.ClientSession(auto_decompress=False))
        started.append(handle)
        if wait_ready:
            await asyncio.wait_for(running.runtime.upstreams.first_pass_done.wait(), 5)
        return handle

    yield start
    for handle in started:
        await handle.session.close()
        await handle.running.stop()


def run_cli(
    *args: str,
    stdin: str | None = None,
    cwd: Path | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess[str]:
    """``sidecar ARGS`` as a user types it; its exit code, stdout and stderr."""
    return subprocess.run(
        [sys.executable, "-m", "sidecar", *args],
        capture_output=True,
        text=True,
        timeout=60,
        input=stdin,
        cwd=cwd,
        env=env,
        check=False,
    )


def closed_port() -> int:
    """A loopback port with nothing listening (bound, then released)."""
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


@contextmanager
def unanswered_port() -> Iterator[int]:
    """A loopback port where connecting hangs: a listener that accepts nothing, its
    queue filled by one connection (Linux then drops further SYNs, as a host that
    went away would)."""
    with socket.socket() as listener, socket.socket() as filler, socket.socket() as probe:
        listener.bind((LOOPBACK, 0))
        listener.listen(0)
        port: int = listener.getsockname()[1]
        filler.connect((LOOPBACK, port))
        probe.settimeout(0.1)
        try:
            probe.connect((LOOPBACK, port))
        except TimeoutError:
            yield port
        else:  # e.g. net.ipv4.tcp_abort_on_overflow=1: refused at once instead
            pytest.skip("this kernel does not leave a connect to a full queue hanging")


async def clients_that_sent(
    port: int, request: bytes, count: int
) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """``count`` loopback connections to ``port``, each having sent ``request``."""
    clients = []
    for _ in range(count):
        reader, writer = await asyncio.open_connection(LOOPBACK, port)
        clients.append((reader, writer))
        writer.write(request)
        await writer.drain()
    return clients


async def raw_request(port: int, data: bytes, *, read_until_close: bool = True) -> bytes:
    """Send raw bytes to a loopback port and return what comes back until it closes."""
    reader, writer = await asyncio.open_connection(LOOPBACK, port)
    try:
        writer.write(data)
        await writer.drain()
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 10)
        return await asyncio.wait_for(reader.read(65536), 10)
    finally:
        writer.close()


async def end_with_the_test(process: asyncio.subprocess.Process) -> None:
    """A child process the test started ends with it, whatever happened in it."""
    if process.returncode is None:
        process.kill()
        await process.wait()


async def start_sidecar_process(
    config_path: Path,
) -> tuple[asyncio.subprocess.Process, int, int | None]:
    """``sidecar run`` as a child process; returns it and its main port once it serves."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config_path),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    while True:  # the port is in the start-up log line
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, "sidecar exited before it started"
        record = orjson.loads(line)
        if record["event"] == "sidecar_started":
            admin = record["admin"]
            return (
                process,
                int(record["listen"].rsplit(":", 1)[1]),
                int(admin.rsplit(":", 1)[1]) if admin else None,
            )


@dataclass
class Demo:
    """A running `sidecar demo` (all ports chosen free) and the banner it printed."""

    process: subprocess.Popen[bytes]
    banner: str

    def url(self, server: str) -> str:
        """The URL the banner gives for ``server`` (sidecar, admin, model, candidate)."""
        match = re.search(rf"^\s+{server}\s+(http://\S+)", self.banner, re.M)
        assert match is not None, self.banner
        return match.group(1)


@pytest.fixture
def demo(tmp_path: Path) -> Iterator[Demo]:
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
            "--log-dir",
            str(tmp_path / "demo-logs"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
    )
    assert process.stdout is not None
    banner = b""
    while b"Ctrl-C" not in banner:
        line = process.stdout.readline()
        assert line, "the demo exited before it served"
        banner += line
    # Keep reading its log lines so a full pipe can never stall it.
    drain = threading.Thread(target=process.stdout.read, daemon=True)
    drain.start()
    yield Demo(process, banner.decode())
    if process.poll() is None:
        process.terminate()
    process.wait(timeout=30)
    drain.join(timeout=30)
    process.stdout.close()
