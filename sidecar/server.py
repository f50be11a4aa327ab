"""Running the sidecar: listeners on uvloop, signals, reloads and a graceful drain."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from sidecar.app import build_admin_app
from sidecar.config import ConfigError, LoadedConfig, load_config
from sidecar.listener import SidecarRunner, main_runner
from sidecar.live import LiveRuntime
from sidecar.logs import Logs
from sidecar.logwriter import Sink
from sidecar.metrics import Metrics
from sidecar.runtime import Runtime
from sidecar.upstreams import ConnectionPools

log = structlog.get_logger("sidecar.server")


class RunningSidecar:
    """One sidecar process's listeners and long-lived parts.

    ``start()`` opens the listeners; ``reload()`` swaps the config; ``stop()`` stops
    accepting, drains requests in flight, stops background work and flushes logs.
    """

    def __init__(
        self,
        loaded: LoadedConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        log_sinks: Mapping[str, Sink] | None = None,
        reuse_port: bool = False,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
    ) -> None:
        config = loaded.config
        self.metrics = Metrics()
        self.logs = Logs(loaded, self.metrics, log_sinks)
        self.pools = ConnectionPools()
        self.live = LiveRuntime(
            loaded, metrics=self.metrics, logs=self.logs, pools=self.pools, clock=clock
        )
        self._reuse_port = reuse_port
        header_size, max_headers = config.server.max_header_size, config.server.max_headers
        self._main: web.BaseRunner = main_runner(
            self.live.dispatch,
            shutdown_timeout=config.server.drain_timeout,
            keepalive_timeout=config.server.keepalive_timeout,
            access_log=None,
            max_line_size=header_size,
            max_field_size=header_size,
            max_headers=max_headers,
        )
        self._admin: web.AppRunner | None = None
        if config.admin.enabled:
            self._admin = SidecarRunner(
                build_admin_app(lambda: self.live.current, reload or self.live.reload),
                access_log=None,
                handle_signals=False,
                max_line_size=header_size,
                max_field_size=header_size,
                max_headers=max_headers,
            )
        self.main_port = 0
        self.admin_port = 0
        self._stopped = False

    @property
    def runtime(self) -> Runtime:
        """The runtime in service now."""
        return self.live.current

    async def start(self) -> None:
        config = self.runtime.config
        self.logs.start()
        await self.live.start()
        await self._main.setup()
        await web.TCPSite(
            self._main, config.listen.host, config.listen.port, reuse_port=self._reuse_port
        ).start()
        self.main_port = _bound_port(self._main)
        if self._admin is not None:
            await self._admin.setup()
            # Workers each have an admin listener; only the first binds the port.
            await web.TCPSite(
                self._admin, config.admin.host, config.admin.port, reuse_port=self._reuse_port
            ).start()
            self.admin_port = _bound_port(self._admin)

    async def reload(self) -> dict[str, Any]:
        return await self.live.reload()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.runtime.draining = True
        # Stops listening, then waits up to drain_timeout for requests in flight.
        await self._main.cleanup()
        if self._admin is not None:
            await self._admin.cleanup()
        await self.live.stop()
        await self.pools.close()
        await self.logs.stop()  # last, so everything logged while stopping is written


def _bound_port(runner: web.BaseRunner) -> int:
    port: int = runner.addresses[0][1]
    return port


async def _reload_every_worker(path: Path) -> dict[str, Any]:
    """A worker asked to reload checks the file, then has the supervisor tell everyone."""
    try:
        loaded = await asyncio.to_thread(load_config, path)
    except ConfigError as exc:
        return {"result": "invalid", "errors": [str(i) for i in exc.issues]}
    os.kill(os.getppid(), signal.SIGHUP)
    return {"result": "ok", "sha256": loaded.sha256, "workers": "signalled"}


async def serve(
    loaded: LoadedConfig,
    *,
    reuse_port: bool = False,
    worker: bool = False,
    on_started: Callable[[RunningSidecar], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (reloading on SIGHUP), then drain and return."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    running = RunningSidecar(
        loaded,
        reuse_port=reuse_port,
        reload=(lambda: _reload_every_worker(loaded.path)) if worker else None,
    )
    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        task = loop.create_task(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    await running.start()
    config = loaded.config
    log.info(
        "sidecar_started",
        pid=os.getpid(),
        listen=f"{config.listen.host}:{running.main_port}",
        admin=f"{config.admin.host}:{running.admin_port}" if config.admin.enabled else None,
        config=str(loaded.path),
        config_sha256=loaded.sha256,
    )
    if on_started is not None:
        await on_started(running)
    await stop.wait()
    log.info("sidecar_draining", drain_timeout_s=config.server.drain_timeout)
    for task in reloads:
        task.cancel()
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
