"""The runtime in service, and swapping it for a new config without dropping a request.

Every request is handed to ``current`` as it arrives and stays with that runtime to
the end. A reload reads and validates the file; a broken config changes nothing
(every error is logged and counted). A valid one is built beside the old runtime,
started (its first readiness probe done, so /readyz does not blink), and swapped in
with one assignment; the old runtime finishes its requests in flight, then its
background work stops and connection pools it alone used are closed. Metrics, logs
and shared connection pools live on across reloads.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, Final

import structlog

from sidecar.background import BackgroundTasks
from sidecar.config.plan import Plan, load_plan
from sidecar.config.schema import ConfigError, LoadedConfig
from sidecar.control.app import build_pipeline
from sidecar.control.health import LoopLagMonitor, ProcessMonitor
from sidecar.control.runtime import Runtime
from sidecar.http.messages import Answer, Response
from sidecar.http.server import Request, RequestRefused
from sidecar.pipeline.stages import refusal_answer
from sidecar.telemetry.logs import Logs
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.upstreams import ConnectionPools

log: Final = structlog.get_logger("sidecar.control.live")


class LiveRuntime:
    def __init__(
        self,
        plan: Plan,
        *,
        metrics: Metrics,
        logs: Logs,
        pools: ConnectionPools,
        clock: Callable[[], float] = time.monotonic,
        env: Mapping[str, str] | None = None,
    ) -> None:
        self._env = env  # what ${VAR}s were read from at start; reloads read the same
        self._metrics = metrics
        self._logs = logs
        self._pools = pools
        self._clock = clock
        self._retiring = BackgroundTasks()
        # Runtimes a reload retired and that are not stopped yet: the sidecar's own stop
        # cuts their drain short and stops each, whatever stage its retirement reached.
        self._retired: list[Runtime] = []
        self._publisher = BackgroundTasks()
        self._reload_lock = asyncio.Lock()
        self.loop_lag = LoopLagMonitor(metrics)
        self.process = ProcessMonitor(metrics)
        self.current = self._build(plan, None)
        self._pipeline = build_pipeline(self.current)
        # Told of each runtime a reload puts in service (the HTTP layer's limits).
        self.on_swap: Callable[[Runtime], None] | None = None

    def _build(self, plan: Plan, previous: Runtime | None) -> Runtime:
        runtime = Runtime(
            plan,
            metrics=self._metrics,
            logs=self._logs,
            pools=self._pools,
            clock=self._clock,
            previous=previous,
        )
        runtime.loop_lag = self.loop_lag
        return runtime

    @property
    def config_path(self) -> Path:
        return self.current.loaded.path

    def dispatch(self, request: Request) -> Awaitable[Answer]:
        """The current pipeline's handling of ``request`` (counted in its runtime's
        requests); not a coroutine of its own, one level fewer per request."""
        return self._pipeline.handle(request)

    def refuse(self, refusal: RequestRefused, method: str, target: str, peer: str) -> Response:
        """The answer to a request the HTTP layer refused, counted like the others."""
        return refusal_answer(self.current, refusal, method, target, peer)

    async def start(self) -> None:
        self.loop_lag.start()
        self.process.start()
        # Each second, so that with workers every process's counts reach a render.
        self._publisher.spawn(self._metrics.publish_every(1.0), name="metrics-publisher")
        await self.current.start()
        self.current.put_in_service(None)
        self._publish(self.current.loaded)

    async def stop(self) -> None:
        await self._retiring.stop()
        # A retirement cancelled before it started, while it waited for the drain, or
        # part way through stopping leaves its runtime's Redis clients, shadow copies
        # and breaker syncs to the garbage collector: stop them here (stop() may be
        # called again, each part once stopped stays stopped).
        retired, self._retired = self._retired, []
        for old in retired:
            await old.stop()
        await self.current.stop()
        await self.loop_lag.stop()
        await self.process.stop()
        await self._publisher.stop()
        self._metrics.publish()

    def _publish(self, loaded: LoadedConfig) -> None:
        self._metrics.set_config_in_service(
            loaded.sha256, str(loaded.path), frozenset(loaded.config.upstreams)
        )

    async def reload(self, path: Path | None = None) -> dict[str, Any]:
        """Re-read the config (or another file, for a rollback) and swap it in if valid."""
        async with self._reload_lock:
            if self.current.draining:
                return self._ignored()
            plan = await self._load(path or self.config_path)
            if not isinstance(plan, Plan):
                return plan
            loaded = plan.loaded
            if loaded.config.logging != self.current.config.logging:
                log.warning(
                    "config_reload_logging_unchanged",
                    message="logging settings take effect at the next restart",
                )
            fresh = self._build(plan, self.current)
            try:
                await fresh.start()
                # Readiness is known before it serves (unchanged upstreams' carries on).
                await fresh.upstreams.first_pass_done.wait()
            except BaseException as exc:  # noqa: BLE001 - re-raised below, after the stop
                failed: BaseException | None = exc
            else:
                failed = None
            if failed is not None:
                # Nothing of a reload that failed keeps running. Awaited outside the
                # except clause (tests/unit/test_native_exceptions.py).
                await fresh.stop()
                raise failed
            old = self.current
            if old.draining:  # shutting down began meanwhile: it must stay not ready
                await fresh.stop()
                return self._ignored()
            self.current, self._pipeline = fresh, build_pipeline(fresh)  # the swap
            fresh.put_in_service(old)
            if self.on_swap is not None:
                self.on_swap(fresh)
            self._publish(loaded)
            self._retired.append(old)
            self._retiring.spawn(self._retire(old), name="retire-runtime")
            self._metrics.config_reloads.labels("ok").inc()
            log.info(
                "config_reloaded",
                config=str(loaded.path),
                sha256=loaded.sha256,
                previous_sha256=old.loaded.sha256,
            )
            return {"result": "ok", "sha256": loaded.sha256}

    async def check(self) -> dict[str, Any]:
        """What a reload would answer before anything is built, for a worker asked to
        reload over HTTP (the supervisor then has every worker reload): ``ignored``
        while draining, ``invalid`` with the errors (logged and counted, as a reload
        logs and counts them), else ``ok`` with the file's hash."""
        if self.current.draining:
            return self._ignored()
        plan = await self._load(self.config_path)
        if not isinstance(plan, Plan):
            return plan
        return {"result": "ok", "sha256": plan.loaded.sha256}

    async def _load(self, source: Path) -> Plan | dict[str, Any]:
        """The plan of ``source``, or the answer to a reload that finds it invalid
        (every error logged, the reload counted as invalid)."""
        try:
            return await asyncio.to_thread(load_plan, source, env=self._env)
        except ConfigError as exc:
            for issue in exc.issues:
                log.error("config_reload_error", path=issue.path, message=issue.message)
            self._metrics.config_reloads.labels("invalid").inc()
            return {"result": "invalid", "errors": [str(i) for i in exc.issues]}

    def _ignored(self) -> dict[str, Any]:
        """A reload once the sidecar is draining: a fresh runtime would be ready again
        (and nothing would stop it), so the config in service stays."""
        log.warning("config_reload_ignored", reason="the sidecar is shutting down")
        self._metrics.config_reloads.labels("ignored").inc()
        return {"result": "ignored", "errors": ["the sidecar is shutting down"]}

    async def _retire(self, old: Runtime) -> None:
        # Its probes and monitors stop at once; its requests in flight get the drain
        # time to finish (a body that never ends must not pin it, and its pools,
        # for good), then it is stopped whatever is left.
        await old.stop_background()
        try:
            await asyncio.wait_for(old.requests.none_left(), old.config.server.drain_timeout)
        except TimeoutError:
            log.warning("retired_runtime_stopped_busy", requests_in_flight=old.active)
        await old.stop()
        self._retired.remove(old)
