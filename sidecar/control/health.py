"""The readiness verdict, from cached state only: never a call to the model per probe.

upstream checks   the background prober's last result per upstream: the server's
                  readiness path, each model's readiness, the golden-input canary
breakers          shown, never deciding: readiness follows the model's own probes.
                  An open circuit whose model passes its probes is "degraded"
                  (a passing probe lets the circuit half-open, and the next request
                  closes it); a pod taken out of service for an open circuit would
                  get no request to close it with
internals         every log writer alive and its queue not nearly full; the event
                  loop's lag under health.max_loop_lag; each drift monitor running
                  (one that stopped is degraded: answers do not depend on it)
"""

from __future__ import annotations

import asyncio
import os
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from sidecar.background import BackgroundTasks
from sidecar.telemetry.logs import Logs
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.breaker import OPEN


class LoopLagMonitor:
    """How late the event loop wakes a sleeper: a blocked loop shows up here."""

    def __init__(self, metrics: Metrics, interval: float = 0.5) -> None:
        self.interval = interval
        self.lag = 0.0
        self._gauge = metrics.loop_lag
        self._tasks = BackgroundTasks()

    def start(self) -> None:
        self._tasks.spawn(self._run(), name="loop-lag")

    async def stop(self) -> None:
        await self._tasks.stop()

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            before = loop.time()
            await asyncio.sleep(self.interval)
            self.lag = max(0.0, loop.time() - before - self.interval)
            self._gauge.set(self.lag)


class ProcessMonitor:
    """CPU and resident memory of this process as sidecar_* metrics, in every mode:
    prometheus-client's own process collector is on its default registry only, and
    absent in multiprocess mode, where each worker's numbers add up here."""

    def __init__(self, metrics: Metrics, interval: float = 5.0) -> None:
        self.interval = interval
        self._cpu = metrics.process_cpu
        self._memory = metrics.process_memory
        self._counted = 0.0
        self._tasks = BackgroundTasks()

    def start(self) -> None:
        self.sample()
        self._tasks.spawn(self._run(), name="process-stats")

    async def stop(self) -> None:
        await self._tasks.stop()

    def sample(self) -> None:
        cpu = time.process_time()
        self._cpu.inc(max(0.0, cpu - self._counted))
        self._counted = cpu
        self._memory.set(resident_bytes())

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.sample()


def resident_bytes() -> int:
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
        return pages * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # its peak


@dataclass
class Verdict:
    status: str  # "pass", "degraded", "fail", "starting"
    ready: bool
    reasons: list[str] = field(default_factory=list)
    checks: dict[str, dict[str, Any]] = field(default_factory=dict)


def verdict(runtime: Any, logs: Logs, lag: LoopLagMonitor | None) -> Verdict:
    """``runtime`` is a sidecar.control.runtime.Runtime (typed loosely: it imports this module)."""
    settings = runtime.config.health
    checks: dict[str, dict[str, Any]] = {}
    failing: list[str] = []
    degraded: list[str] = []
    if runtime.draining:
        return Verdict("fail", False, ["draining: the sidecar is shutting down"])
    if not runtime.upstreams.first_pass_done.is_set():
        return Verdict("starting", False, ["starting: the first readiness probe has not finished"])

    unhealthy: dict[str, str] = {}
    now = time.time()
    for client in runtime.upstreams.clients.values():
        probe = client.last_probe
        for check in probe.checks if probe else []:
            checks[f"upstream:{client.name}:{check.name}"] = {
                "status": "pass" if check.ok else "fail",
                "latency_ms": round(check.latency * 1000.0, 3),
                "last_error": check.error,
                "last_checked": probe.checked_at,
                "last_success": client.last_success,
            }
        health = client.config.health
        # A pass is one check after another, each up to the timeout.
        checks_a_pass = 1 + len(health.models) + (health.canary is not None)
        stale_after = 3 * (health.interval + checks_a_pass * health.timeout)
        if probe is None or not probe.ready:
            error = probe.error if probe else "not probed yet"
            unhealthy[client.name] = f"upstream {client.name}: {error}"
        elif now - probe.checked_at > stale_after:
            # A prober that stopped must not leave an old "ready" standing.
            unhealthy[client.name] = (
                f"upstream {client.name}: readiness probe stale "
                f"(last ran {now - probe.checked_at:.0f}s ago)"
            )
    circuit_open: set[str] = set()
    for name, guard in runtime.guards.items():
        state = guard.breaker.state if guard.breaker is not None else "disabled"
        checks[f"breaker:{name}"] = {"status": "fail" if state == OPEN else "pass", "state": state}
        if state == OPEN:
            circuit_open.add(name)
    for path in runtime.paths.values():
        route, upstream = path.route.name, path.route.upstream
        fallback = path.fallback
        triggers = fallback.triggers if fallback is not None else frozenset()
        problem = unhealthy.get(upstream)
        if problem is not None:
            # A chain of secondary models only, every one of them failing its probes
            # too, answers nothing.
            covered = fallback is not None and (
                fallback.answers_without_a_model
                or any(name not in unhealthy for name in fallback.secondaries)
            )
            if covered and triggers & {"circuit_open", "upstream_error", "timeout"}:
                degraded.append(f"{problem}; route {route} answers from its fallback")
            else:
                failing.append(problem)
        elif upstream in circuit_open:
            answer = (
                "answers from its fallback"
                if "circuit_open" in triggers
                else "answers 503 circuit_open"
            )
            degraded.append(
                f"upstream {upstream}: circuit open while its probes pass; route {route} "
                f"{answer} until a request closes it"
            )

    shared = runtime.shared
    if shared is not None:
        checks["internal:redis"] = {
            "status": "pass" if shared.up else "fail",
            "last_error": shared.last_error,
        }
        if not shared.up:
            degraded.append("redis unreachable: using local rate limits and breaker state")

    for writer in logs.writers:
        fill = writer.fill
        ok = writer.alive and not writer.failing and fill < settings.max_log_queue_fill
        checks[f"internal:log:{writer.name}"] = {
            "status": "pass" if ok else "fail",
            "alive": writer.alive,
            "queue_fill": round(fill, 4),
            "last_error": writer.last_error if writer.failing else None,
        }
        if not ok:
            if not writer.alive:
                problem = "stopped"
            elif writer.failing:
                problem = f"cannot write ({writer.last_error})"
            else:
                problem = f"queue {fill:.0%} full"
            # Requests are answered either way: a failing log is degraded unless the
            # operator says a sidecar that cannot log must not serve.
            reasons = failing if settings.log_failure == "not_ready" else degraded
            reasons.append(f"log writer {writer.name}: {problem}")
    for path in runtime.paths.values():
        monitor = path.drift
        if monitor is None:
            continue
        # Answers are not touched by drift: a monitor that stopped is degraded, said
        # here rather than left to a PSI that silently stops moving.
        stopped = monitor.stopped
        checks[f"internal:drift:{path.route.name}"] = {
            "status": "fail" if stopped else "pass",
            "last_error": monitor.last_error,
        }
        if stopped:
            degraded.append(f"drift monitor of route {path.route.name}: stopped ({stopped})")
    if lag is not None:
        ok = lag.lag < settings.max_loop_lag
        checks["internal:event_loop_lag"] = {
            "status": "pass" if ok else "fail",
            "lag_ms": round(lag.lag * 1000.0, 3),
        }
        if not ok:
            failing.append(
                f"event loop lag {lag.lag * 1000:.0f} ms over {settings.max_loop_lag * 1000:.0f} ms"
            )

    reasons = sorted(set(failing)) + sorted(set(degraded))
    if failing:
        return Verdict("fail", False, reasons, checks)
    if degraded:
        return Verdict("degraded", settings.degraded_is_ready, reasons, checks)
    return Verdict("pass", True, [], checks)
