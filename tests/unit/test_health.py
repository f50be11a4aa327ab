"""sidecar.control.health: the readiness verdict from cached state, on a hand-built runtime."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

import sidecar.control.health
from sidecar.config.schema import HealthSettings
from sidecar.control.health import LoopLagMonitor, ProcessMonitor, Verdict, resident_bytes, verdict
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.upstreams import Check, ProbeResult


@dataclass
class Writer:
    name: str = "access"
    fill: float = 0.0
    alive: bool = True
    failing: bool = False
    last_error: str | None = None


@dataclass
class Runtime:
    """What verdict() reads of a sidecar.control.runtime.Runtime."""

    health: dict[str, Any] = field(default_factory=dict)
    draining: bool = False
    started: bool = True
    probes: dict[str, ProbeResult | None] = field(default_factory=lambda: {"model": ready_probe()})
    last_success: float | None = 123.0
    breakers: dict[str, str | None] = field(default_factory=lambda: {"model": "closed"})
    routes: list[tuple[str, str, tuple[str, ...] | None]] = field(
        default_factory=lambda: [("infer", "model", None)]
    )
    drift: dict[str, Any] = field(default_factory=dict)  # route -> its drift monitor
    shared: Any = None
    writers: list[Writer] = field(default_factory=lambda: [Writer()])
    lag: float | None = 0.0
    models: tuple[str, ...] = ()  # each upstream's model checks
    canary: object | None = None

    def verdict(self) -> Verdict:
        first_pass = asyncio.Event()
        if self.started:
            first_pass.set()
        clients = {
            name: SimpleNamespace(
                name=name,
                last_probe=probe,
                last_success=self.last_success,
                config=SimpleNamespace(
                    health=SimpleNamespace(
                        interval=1.0, timeout=1.0, models=self.models, canary=self.canary
                    )
                ),
            )
            for name, probe in self.probes.items()
        }
        runtime = SimpleNamespace(
            config=SimpleNamespace(health=HealthSettings.model_validate(self.health)),
            draining=self.draining,
            upstreams=SimpleNamespace(first_pass_done=first_pass, clients=clients),
            guards={
                name: SimpleNamespace(
                    breaker=None if state is None else SimpleNamespace(state=state)
                )
                for name, state in self.breakers.items()
            },
            paths={
                route: SimpleNamespace(
                    route=SimpleNamespace(name=route, upstream=upstream),
                    drift=self.drift.get(route),
                    fallback=None
                    if triggers is None
                    else SimpleNamespace(
                        triggers=frozenset(triggers),
                        secondaries=(),
                        answers_without_a_model=True,
                    ),
                )
                for route, upstream, triggers in self.routes
            },
            shared=self.shared,
        )
        lag = None
        if self.lag is not None:
            lag = LoopLagMonitor(Metrics())
            lag.lag = self.lag
        return verdict(runtime, SimpleNamespace(writers=self.writers), lag)  # type: ignore[arg-type]


def ready_probe(age: float = 0.0, latency: float = 0.0123456) -> ProbeResult:
    return ProbeResult(
        ready=True,
        checked_at=time.time() - age,
        latency=latency,
        error=None,
        checks=[Check("ready", True, latency, None)],
    )


def failed_probe(error: str = "/v2/health/ready answered 503") -> ProbeResult:
    return ProbeResult(
        ready=False,
        checked_at=time.time(),
        latency=0.002,
        error=error,
        checks=[Check("ready", True, 0.001, None), Check("model:iris", False, 0.001, error)],
    )


def test_a_draining_sidecar_is_not_ready() -> None:
    result = Runtime(draining=True).verdict()
    assert (result.status, result.ready, result.reasons) == (
        "fail",
        False,
        ["draining: the sidecar is shutting down"],
    )


def test_a_sidecar_is_starting_until_its_first_probe_finished() -> None:
    result = Runtime(started=False).verdict()
    assert (result.status, result.ready, result.reasons) == (
        "starting",
        False,
        ["starting: the first readiness probe has not finished"],
    )


def test_everything_healthy_passes_and_shows_every_check() -> None:
    probe = ready_probe()
    runtime = Runtime(probes={"model": probe}, lag=0.0012345)
    result = runtime.verdict()
    assert (result.status, result.ready, result.reasons) == ("pass", True, [])
    assert result.checks == {
        "upstream:model:ready": {
            "status": "pass",
            "latency_ms": 12.346,
            "last_error": None,
            "last_checked": probe.checked_at,
            "last_success": 123.0,
        },
        "breaker:model": {"status": "pass", "state": "closed"},
        "internal:log:access": {
            "status": "pass",
            "alive": True,
            "queue_fill": 0.0,
            "last_error": None,
        },
        "internal:event_loop_lag": {"status": "pass", "lag_ms": 1.234},
    }


def test_a_drift_monitor_that_stopped_is_degraded_and_says_why() -> None:
    """A drift task that ended (an exception it did not catch) left /health at pass
    while the route's PSI silently stopped moving."""
    running = SimpleNamespace(stopped=None, last_error="ValueError: one answer")
    result = Runtime(drift={"infer": running}).verdict()
    assert (result.status, result.ready) == ("pass", True)
    assert result.checks["internal:drift:infer"] == {
        "status": "pass",
        "last_error": "ValueError: one answer",
    }
    ended = SimpleNamespace(stopped="MemoryError: ", last_error=None)
    result = Runtime(drift={"infer": ended}).verdict()
    assert (result.status, result.ready) == ("degraded", True)
    assert result.reasons == ["drift monitor of route infer: stopped (MemoryError: )"]
    assert result.checks["internal:drift:infer"]["status"] == "fail"


def test_a_failing_upstream_without_a_fallback_fails_readiness() -> None:
    result = Runtime(probes={"model": failed_probe()}).verdict()
    assert (result.status, result.ready) == ("fail", False)
    assert result.reasons == ["upstream model: /v2/health/ready answered 503"]
    assert result.checks["upstream:model:ready"]["status"] == "pass"
    assert result.checks["upstream:model:model:iris"]["status"] == "fail"
    assert result.checks["upstream:model:model:iris"]["last_error"] == (
        "/v2/health/ready answered 503"
    )


def test_an_upstream_not_probed_yet_fails() -> None:
    result = Runtime(probes={"model": None}).verdict()
    assert result.reasons == ["upstream model: not probed yet"]
    assert not any(name.startswith("upstream:") for name in result.checks)


def test_a_failing_upstream_behind_a_fallback_is_degraded() -> None:
    for trigger in ("circuit_open", "upstream_error", "timeout"):
        result = Runtime(
            probes={"model": failed_probe()}, routes=[("infer", "model", (trigger,))]
        ).verdict()
        assert (result.status, result.ready) == ("degraded", True), trigger
        assert result.reasons == [
            "upstream model: /v2/health/ready answered 503; route infer answers from its fallback"
        ]


def test_degraded_is_not_ready_when_the_operator_says_so() -> None:
    runtime = Runtime(
        probes={"model": failed_probe()},
        routes=[("infer", "model", ("timeout",))],
        health={"degraded_is_ready": False},
    )
    assert (runtime.verdict().status, runtime.verdict().ready) == ("degraded", False)


def test_a_fallback_only_for_overload_does_not_cover_a_failing_upstream() -> None:
    result = Runtime(
        probes={"model": failed_probe()}, routes=[("infer", "model", ("overloaded",))]
    ).verdict()
    assert result.status == "fail"


def test_a_probe_that_stopped_running_does_not_keep_the_sidecar_ready() -> None:
    stale = Runtime(
        probes={"model": ready_probe(age=16.4)}
    ).verdict()  # stale after 3 * (1 s + 1 s)
    assert stale.status == "fail"
    assert stale.reasons == ["upstream model: readiness probe stale (last ran 16s ago)"]
    assert Runtime(probes={"model": ready_probe(age=7.0)}).verdict().status == "fail"
    assert Runtime(probes={"model": ready_probe(age=5.0)}).verdict().status == "pass"


def test_a_pass_of_many_slow_checks_is_not_taken_for_a_stopped_prober() -> None:
    """A pass runs its checks one after another, each up to the timeout: with two
    models and a canary it may take 4 s, so it is stale only after 3 * (1 s + 4 s)."""
    models = ("a", "b")
    slow = Runtime(probes={"model": ready_probe(age=14.0)}, models=models, canary=object())
    assert slow.verdict().status == "pass"
    assert Runtime(probes={"model": ready_probe(age=9.0)}, models=models).verdict().ready
    assert Runtime(probes={"model": ready_probe(age=13.0)}, models=models).verdict().status == (
        "fail"
    )
    late = Runtime(probes={"model": ready_probe(age=16.0)}, models=models, canary=object())
    assert late.verdict().status == "fail"


def test_routes_of_another_upstream_are_not_affected() -> None:
    runtime = Runtime(
        probes={"model": ready_probe(), "other": failed_probe("down")},
        routes=[("infer", "model", None)],
    )
    assert runtime.verdict().status == "pass"


def test_an_open_circuit_while_probes_pass_is_degraded_and_says_what_the_route_answers() -> None:
    plain = Runtime(breakers={"model": "open"}).verdict()
    assert (plain.status, plain.ready) == ("degraded", True)
    assert plain.checks["breaker:model"] == {"status": "fail", "state": "open"}
    assert plain.reasons == [
        "upstream model: circuit open while its probes pass; route infer answers 503 "
        "circuit_open until a request closes it"
    ]
    covered = Runtime(breakers={"model": "open"}, routes=[("infer", "model", ("circuit_open",))])
    assert covered.verdict().reasons == [
        "upstream model: circuit open while its probes pass; route infer answers from its "
        "fallback until a request closes it"
    ]
    other = Runtime(breakers={"model": "open"}, routes=[("infer", "model", ("timeout",))])
    assert "answers 503 circuit_open" in other.verdict().reasons[0]


def test_a_half_open_or_disabled_breaker_passes() -> None:
    half = Runtime(breakers={"model": "half-open"}).verdict()
    assert (half.status, half.checks["breaker:model"]) == (
        "pass",
        {"status": "pass", "state": "half-open"},
    )
    disabled = Runtime(breakers={"model": None}).verdict()
    assert disabled.checks["breaker:model"] == {"status": "pass", "state": "disabled"}


def test_redis_down_is_degraded_and_up_passes() -> None:
    down = Runtime(shared=SimpleNamespace(up=False, last_error="ConnectionError")).verdict()
    assert (down.status, down.reasons) == (
        "degraded",
        ["redis unreachable: using local rate limits and breaker state"],
    )
    assert down.checks["internal:redis"] == {"status": "fail", "last_error": "ConnectionError"}
    up = Runtime(shared=SimpleNamespace(up=True, last_error=None)).verdict()
    assert (up.status, up.checks["internal:redis"]) == (
        "pass",
        {"status": "pass", "last_error": None},
    )


def test_a_stopped_or_failing_log_writer_is_degraded() -> None:
    stopped = Runtime(writers=[Writer(alive=False)]).verdict()
    assert (stopped.status, stopped.reasons) == ("degraded", ["log writer access: stopped"])
    assert stopped.checks["internal:log:access"]["alive"] is False
    failing = Runtime(writers=[Writer("payload", failing=True, last_error="disk full")]).verdict()
    assert failing.reasons == ["log writer payload: cannot write (disk full)"]
    assert failing.checks["internal:log:payload"] == {
        "status": "fail",
        "alive": True,
        "queue_fill": 0.0,
        "last_error": "disk full",
    }
    stale_error = Runtime(writers=[Writer(last_error="disk full")]).verdict()
    assert stale_error.checks["internal:log:access"]["last_error"] is None  # it writes again


def test_a_nearly_full_log_queue_is_degraded_from_the_limit_on() -> None:
    full = Runtime(writers=[Writer(fill=0.912345)], health={"max_log_queue_fill": 0.9}).verdict()
    assert full.reasons == ["log writer access: queue 91% full"]
    assert full.checks["internal:log:access"]["queue_fill"] == 0.9123
    at_limit = Runtime(writers=[Writer(fill=0.9)], health={"max_log_queue_fill": 0.9}).verdict()
    assert at_limit.status == "degraded"
    below = Runtime(writers=[Writer(fill=0.89)], health={"max_log_queue_fill": 0.9}).verdict()
    assert below.status == "pass"


def test_a_sidecar_that_must_log_is_not_ready_when_it_cannot() -> None:
    result = Runtime(writers=[Writer(alive=False)], health={"log_failure": "not_ready"}).verdict()
    assert (result.status, result.ready) == ("fail", False)


def test_a_lagging_event_loop_fails_from_the_limit_on() -> None:
    lagging = Runtime(lag=0.6, health={"max_loop_lag": "500ms"}).verdict()
    assert (lagging.status, lagging.reasons) == ("fail", ["event loop lag 600 ms over 500 ms"])
    assert lagging.checks["internal:event_loop_lag"] == {"status": "fail", "lag_ms": 600.0}
    assert Runtime(lag=0.5, health={"max_loop_lag": "500ms"}).verdict().status == "fail"
    assert Runtime(lag=1.5, health={"max_loop_lag": "1s"}).verdict().reasons == [
        "event loop lag 1500 ms over 1000 ms"
    ]
    assert Runtime(lag=0.4, health={"max_loop_lag": "500ms"}).verdict().status == "pass"
    assert "internal:event_loop_lag" not in Runtime(lag=None).verdict().checks


def test_reasons_are_listed_once_failures_first_then_in_order() -> None:
    runtime = Runtime(
        probes={"model": failed_probe("down"), "b": failed_probe("gone")},
        breakers={},
        routes=[
            ("r1", "model", None),
            ("r2", "model", None),
            ("r3", "b", ("timeout",)),
        ],
        writers=[Writer("z", alive=False), Writer("a", alive=False)],
    )
    assert runtime.verdict().reasons == [
        "upstream model: down",
        "log writer a: stopped",
        "log writer z: stopped",
        "upstream b: gone; route r3 answers from its fallback",
    ]


# monitors


def test_resident_memory_is_what_the_kernel_reports() -> None:
    status = Path("/proc/self/status").read_text()
    vm_rss_kib = int(
        next(line for line in status.splitlines() if line.startswith("VmRSS:")).split()[1]
    )
    assert abs(resident_bytes() - vm_rss_kib * 1024) < 8 * 1024 * 1024


def test_process_monitor_counts_cpu_time_and_shows_memory() -> None:
    metrics = Metrics()
    monitor = ProcessMonitor(metrics)
    monitor.sample()
    first = metrics.registry.get_sample_value("sidecar_process_cpu_seconds_total")
    assert first is not None
    assert abs(first - time.process_time()) < 0.5
    spent = time.process_time()
    deadline = spent + 0.05
    while time.process_time() < deadline:  # burn a little CPU
        pass
    monitor.sample()
    second = metrics.registry.get_sample_value("sidecar_process_cpu_seconds_total")
    assert second is not None
    assert 0.05 <= second - first < 0.5
    memory = metrics.registry.get_sample_value("sidecar_process_resident_memory_bytes")
    assert memory is not None
    assert abs(memory - resident_bytes()) < 8 * 1024 * 1024


async def test_process_monitor_samples_when_started() -> None:
    metrics = Metrics()
    monitor = ProcessMonitor(metrics, interval=3600.0)
    monitor.start()
    try:
        assert (metrics.registry.get_sample_value("sidecar_process_resident_memory_bytes") or 0) > 0
    finally:
        await monitor.stop()


async def test_a_blocked_event_loop_shows_as_lag() -> None:
    metrics = Metrics()
    monitor = LoopLagMonitor(metrics, interval=0.3)
    monitor.start()
    try:
        await asyncio.sleep(0)  # let the monitor start its first timer
        time.sleep(0.4)  # noqa: ASYNC251 - blocking the loop is what is measured
        for _ in range(200):
            if monitor.lag > 0:
                break
            await asyncio.sleep(0.005)
        assert 0.09 <= monitor.lag < 0.3  # woken 0.1 s late, not 0.4 s
        assert metrics.registry.get_sample_value("sidecar_event_loop_lag_seconds") == monitor.lag
    finally:
        await monitor.stop()


class Statm:
    """A stand-in for Path where /proc is missing or says something unreadable."""

    def __init__(self, text: str | None) -> None:
        self.text = text

    def __call__(self, path: str) -> Statm:
        return self

    def read_text(self) -> str:
        if self.text is None:
            raise FileNotFoundError("/proc/self/statm")
        return self.text


@pytest.mark.parametrize("statm", [None, "many pages", "12"])
def test_without_a_readable_proc_resident_memory_is_the_peak(
    monkeypatch: pytest.MonkeyPatch, statm: str | None
) -> None:
    import resource

    monkeypatch.setattr(sidecar.control.health, "Path", Statm(statm))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    measured = resident_bytes()
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    assert before <= measured <= after


async def test_a_started_process_monitor_samples_every_interval() -> None:
    metrics = Metrics()
    monitor = ProcessMonitor(metrics, interval=0.01)
    monitor.start()
    try:
        first = metrics.registry.get_sample_value("sidecar_process_cpu_seconds_total") or 0.0
        deadline = time.process_time() + 0.05
        while time.process_time() < deadline:  # burn a little CPU
            pass
        for _ in range(500):
            value = metrics.registry.get_sample_value("sidecar_process_cpu_seconds_total") or 0.0
            if value >= first + 0.05:
                break
            await asyncio.sleep(0.01)
        assert value >= first + 0.05
    finally:
        await monitor.stop()


def test_monitors_measure_twice_a_second_and_every_five_seconds_and_start_at_no_lag() -> None:
    lag = LoopLagMonitor(Metrics())
    assert (lag.interval, lag.lag) == (0.5, 0.0)
    assert ProcessMonitor(Metrics()).interval == 5.0
