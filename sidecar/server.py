"""Running the sidecar: listeners on uvloop, signals, and a graceful drain."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import structlog
from aiohttp import web

from sidecar.app import build_admin_app, build_main_app
from sidecar.config import LoadedConfig
from sidecar.listener import SidecarRunner
from sidecar.runtime import Runtime

log = structlog.get_logger("sidecar.server")


class RunningSidecar:
    """Started listeners; ``stop()`` stops accepting, drains in-flight requests, closes."""

    def __init__(self, runtime: Runtime) -> None:
        self.runtime = runtime
        config = runtime.config
        header_size, max_headers = config.server.max_header_size, config.server.max_headers
        self._main = SidecarRunner(
            build_main_app(runtime),
            shutdown_timeout=config.server.drain_timeout,
            keepalive_timeout=config.server.keepalive_timeout,
            access_log=None,
            handle_signals=False,
            max_line_size=header_size,
            max_field_size=header_size,
            max_headers=max_headers,
        )
        self._admin: web.AppRunner | None = None
        if config.admin.enabled:
            self._admin = SidecarRunner(
                build_admin_app(runtime),
                access_log=None,
                handle_signals=False,
                max_line_size=header_size,
                max_field_size=header_size,
                max_headers=max_headers,
            )
        self.main_port = 0
        self.admin_port = 0

    async def start(self) -> None:
        config = self.runtime.config
        await self.runtime.start()
        await self._main.setup()
        main_site = web.TCPSite(self._main, config.listen.host, config.listen.port)
        await main_site.start()
        self.main_port = _bound_port(self._main)
        if self._admin is not None:
            await self._admin.setup()
            await web.TCPSite(self._admin, config.admin.host, config.admin.port).start()
            self.admin_port = _bound_port(self._admin)

    async def stop(self) -> None:
        self.runtime.draining = True
        # Stops listening, then waits up to drain_timeout for requests in flight.
        await self._main.cleanup()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.runtime.stop()


def _bound_port(runner: web.AppRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


async def serve(
    loaded: LoadedConfig,
    *,
    on_started: Callable[[RunningSidecar], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = RunningSidecar(Runtime(loaded))
    await running.start()
    config = loaded.config
    log.info(
        "sidecar_started",
        listen=f"{config.listen.host}:{running.main_port}",
        admin=f"{config.admin.host}:{running.admin_port}" if config.admin.enabled else None,
        config=str(loaded.path),
        config_sha256=loaded.sha256,
    )
    if on_started is not None:
        await on_started(running)
    await stop.wait()
    log.info("sidecar_draining", drain_timeout_s=config.server.drain_timeout)
    await running.stop()
    log.info("sidecar_stopped")


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it exists (Linux and macOS), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
