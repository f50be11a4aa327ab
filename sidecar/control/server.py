"""Running the sidecar: listeners on uvloop, signals, reloads and a graceful drain."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import time
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any

import structlog

import sidecar
from sidecar.config.plan import Plan
from sidecar.config.schema import ServerSettings, cannot_listen
from sidecar.control import interpreter
from sidecar.control.app import AdminEndpoints
from sidecar.control.live import LiveRuntime
from sidecar.control.runtime import Runtime
from sidecar.http.server import HttpServer, Limits
from sidecar.telemetry.logs import Logs
from sidecar.telemetry.logwriter import Sink
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.upstreams import ConnectionPools

log = structlog.get_logger("sidecar.control.server")


def _http_limits(settings: ServerSettings) -> Limits:
    header_size = settings.max_header_size
    return Limits(
        max_line=header_size,
        max_head=max(settings.max_head_size, header_size),
        max_headers=settings.max_headers,
        head_timeout=settings.head_timeout,
        body_timeout=settings.body_timeout,
        body_min_rate=settings.body_min_rate,
        idle_timeout=settings.keepalive_timeout,
        send_timeout=settings.send_timeout,
        buffered_bodies=settings.max_buffered_bodies,
        buffered_heads=settings.max_buffered_heads,
    )


class RunningSidecar:
    """One sidecar process's listeners and long-lived parts.

    ``start()`` opens the listeners; ``reload()`` swaps the config; ``stop()`` stops
    accepting, drains requests in flight, stops background work and flushes logs.
    A listener that cannot be opened (or a log file) raises ``ConfigError`` naming
    its key; ``stop()`` then releases whatever had started.
    """

    def __init__(
        self,
        plan: Plan,
        *,
        clock: Callable[[], float] = time.monotonic,
        log_sinks: Mapping[str, Sink] | None = None,
        reuse_port: bool = False,
        reload: Callable[[], Awaitable[dict[str, Any]]] | None = None,
        env: Mapping[str, str] | None = None,
    ) -> None:
        loaded = plan.loaded
        config = loaded.config
        self.metrics = Metrics()
        self.logs = Logs(loaded, self.metrics, log_sinks)
        self.pools = ConnectionPools(self.metrics)
        self.live = LiveRuntime(
            plan, metrics=self.metrics, logs=self.logs, pools=self.pools, clock=clock, env=env
        )
        self._reuse_port = reuse_port
        limits = _http_limits(config.server)
        self._main = HttpServer(self.live.dispatch, self.live.refuse, limits)
        main = self._main
        # Server-wide refusals have no route label: the HTTP layer refuses before it
        # knows a route.
        counts = (
            _Published(lambda: main.slow_readers, self.metrics.slow_clients),
            _Published(
                lambda: main.bodies_refused, self.metrics.dropped.labels("request_bodies", "")
            ),
            _Published(
                lambda: main.heads_refused, self.metrics.dropped.labels("request_heads", "")
            ),
        )
        for count in counts:
            self.metrics.on_publish(count.publish)
        self._admin: HttpServer | None = None
        if config.admin.enabled:
            endpoints = AdminEndpoints(
                lambda: self.live.current,
                None if config.admin.reload == "off" else (reload or self.live.reload),
                reload_open_to_all=config.admin.reload_open_to_all,
            )
            self._admin = HttpServer(endpoints.dispatch, endpoints.refuse, limits)
        self.main_port = 0
        self.admin_port = 0
        self._stopped = False
        self.live.on_swap = self._swapped

    def _swapped(self, runtime: Runtime) -> None:
        """A reload's server.* limits of the HTTP layer (timeouts, sizes, budgets)
        apply from now: a reload answered ok while they stayed as they were at start."""
        limits = _http_limits(runtime.config.server)
        for server in (self._main, self._admin):
            if server is not None and server.limits != limits:
                server.set_limits(limits)

    @property
    def runtime(self) -> Runtime:
        """The runtime in service now."""
        return self.live.current

    async def start(self) -> None:
        config = self.runtime.config
        self.logs.start()
        await self.live.start()
        source = str(self.runtime.loaded.path)
        self.main_port = await self._listen(
            self._main, source, "listen", config.listen.host, config.listen.port
        )
        if self._admin is not None:
            # With workers, each binds the port the supervisor reserved (SO_REUSEPORT).
            self.admin_port = await self._listen(
                self._admin, source, "admin", config.admin.host, config.admin.port
            )

    async def _listen(self, server: HttpServer, source: str, key: str, host: str, port: int) -> int:
        """Start ``server`` on ``host:port``; a port it cannot have is a config error
        naming ``{key}.port``."""
        try:
            return await server.listen(host, port, reuse_port=self._reuse_port)
        except OSError as exc:
            raise cannot_listen(source, f"{key}.port", host, port, exc) from None

    async def reload(self) -> dict[str, Any]:
        return await self.live.reload()

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        runtime = self.runtime
        runtime.draining = True  # no reload swaps the config in service from now on
        # Stops listening, then waits up to drain_timeout for requests in flight.
        drain_timeout = runtime.config.server.drain_timeout
        await self._main.stop(drain_timeout)
        if self._admin is not None:
            await self._admin.stop(drain_timeout)
        await self.live.stop()
        await self.pools.close()
        await self.logs.stop()  # last, so everything logged while stopping is written


class _Published:
    """A count the HTTP server keeps as a plain number (no series on its hot path),
    added to its counter at each publish."""

    def __init__(self, read: Callable[[], int], counter: Any) -> None:
        self._read = read
        self._counter = counter
        self._published = 0

    def publish(self) -> None:
        count = self._read()
        if count > self._published:
            self._counter.inc(count - self._published)
            self._published = count


async def _reload_every_worker(live: LiveRuntime, supervisor: int) -> dict[str, Any]:
    """A worker asked to reload checks the file (while draining it refuses, and an
    invalid file is logged and counted, as its own reload would), then has the
    supervisor tell everyone.

    Only the supervisor that started it: an orphan's parent is PID 1 or a subreaper,
    which must never get our SIGHUP.
    """
    result = await live.check()
    if result["result"] != "ok":
        return result
    if os.getppid() != supervisor:
        return {"result": "invalid", "errors": ["the supervisor is gone; this worker is stopping"]}
    os.kill(supervisor, signal.SIGHUP)
    return {**result, "workers": "signalled"}


def _die_with(supervisor: int) -> bool:
    """Ask Linux to send SIGTERM when the supervisor dies (prctl PR_SET_PDEATHSIG);
    False where that is not available."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            return False
    except (OSError, AttributeError):
        return False
    if os.getppid() != supervisor:  # it died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)
    return True


_PR_SET_PDEATHSIG = 1


async def _watch_supervisor(supervisor: int, stop: Callable[[], None]) -> None:
    """Without prctl: notice the supervisor's death by polling who our parent is."""
    while os.getppid() == supervisor:  # noqa: ASYNC110 - no event exists to wait on
        await asyncio.sleep(0.5)
    stop()


async def serve(
    plan: Plan,
    *,
    reuse_port: bool = False,
    supervisor: int | None = None,
    env: Mapping[str, str] | None = None,
    on_started: Callable[[RunningSidecar], Awaitable[None]] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT (reloading on SIGHUP), then drain and return.

    On SIGTERM /readyz turns 503 at once while requests are still served for
    ``server.drain_delay`` (load balancers need that long to stop sending), then the
    listener closes and requests in flight get ``server.drain_timeout`` to finish.
    Both are read from the config in service when the signal arrives (a reload's).
    SIGINT (Ctrl-C) skips the delay. Raises ``ConfigError`` when it cannot start.
    """
    interpreter.settle()
    stopping: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    loop = asyncio.get_running_loop()
    running = RunningSidecar(
        plan,
        reuse_port=reuse_port,
        reload=(
            (lambda: _reload_every_worker(running.live, supervisor))
            if supervisor is not None
            else None
        ),
        env=env,
    )
    reloads: set[asyncio.Task[Any]] = set()

    def on_hangup() -> None:
        task = loop.create_task(running.reload())
        reloads.add(task)
        task.add_done_callback(reloads.discard)

    def on_stop(signum: int) -> None:
        if not stopping.done():
            stopping.set_result(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, on_stop, sig)
    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    try:
        await running.start()
    except BaseException:
        await running.stop()
        raise
    # A worker's supervisor starts it with SIGHUP blocked: one sent meanwhile is
    # delivered now, to the handler above.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGHUP})
    config = plan.config
    log.info(
        "sidecar_started",
        pid=os.getpid(),
        listen=f"{config.listen.host}:{running.main_port}",
        admin=f"{config.admin.host}:{running.admin_port}" if config.admin.enabled else None,
        config=str(plan.loaded.path),
        config_sha256=plan.loaded.sha256,
        compiled=sidecar.compiled(),
    )
    if on_started is not None:
        await on_started(running)
    # A worker whose supervisor died (SIGKILL, OOM) has nobody to restart, reload or
    # stop it: it drains and exits, as on SIGTERM.
    watchdog = (
        loop.create_task(_watch_supervisor(supervisor, lambda: on_stop(signal.SIGTERM)))
        if supervisor is not None and not _die_with(supervisor)
        else None
    )
    collector = loop.create_task(interpreter.collect_regularly())
    try:
        signum = await stopping
        if watchdog is not None:
            watchdog.cancel()
        for task in reloads:
            task.cancel()
        running.runtime.draining = True  # /readyz says 503 from now on
        # The config in service now (the last reload's, not the one started with):
        # draining refuses reloads, so it is also the one stop() drains with.
        settings = running.runtime.config.server
        delay = settings.drain_delay if signum == signal.SIGTERM else 0.0
        log.info("sidecar_draining", drain_delay_s=delay, drain_timeout_s=settings.drain_timeout)
        if delay > 0:
            # Still serving while endpoints are updated; a second signal cuts it short.
            again = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, again.set)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(again.wait(), delay)
        await running.stop()
        log.info("sidecar_stopped")
    finally:
        # Collections go on while draining; they end with the process's work.
        collector.cancel()


def run_event_loop(main: Coroutine[Any, Any, None]) -> None:
    """Run on uvloop where it exists (Linux and macOS), else on asyncio's own loop."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - Windows
        asyncio.run(main)
        return
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        runner.run(main)
