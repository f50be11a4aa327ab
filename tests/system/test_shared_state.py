"""Redis-shared limits and breaker state, and what happens when Redis goes away."""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import subprocess
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web

from tests.conftest import (
    LOOPBACK,
    FakeModel,
    SidecarHandle,
    StartSidecar,
    base_config,
    closed_port,
    start_sidecar_process,
)
from tests.integration.test_endpoints import metric_value

pytestmark = pytest.mark.skipif(
    shutil.which("redis-server") is None, reason="redis-server is not installed"
)


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port = sock.getsockname()[1]
    process = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            LOOPBACK,
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(tmp_path),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    assert process.stdout is not None
    for line in iter(process.stdout.readline, b""):  # until it accepts connections
        if b"Ready to accept connections" in line:
            break
    yield process, f"redis://{LOOPBACK}:{port}/0"
    process.kill()
    process.communicate(timeout=10)


def shared_config(upstream: str, redis_url: str, **extra: Any) -> dict[str, Any]:
    config = base_config(upstream)
    config["shared_state"] = {
        "redis_url": redis_url,
        "key_prefix": "test",
        "timeout": "500ms",
        "retry_after": "1h",
        "sync_interval": "1h",
    }
    config.update(extra)
    return config


async def test_a_global_limit_holds_across_two_sidecar_processes(
    fake_model: FakeModel, redis_server: tuple[Any, str], tmp_path: Path
) -> None:
    _, redis_url = redis_server
    config = shared_config(
        fake_model.url,
        redis_url,
        rate_limit={"enabled": True, "global": {"rate": "1/h", "burst": 5}},
    )
    processes = []
    ports = []
    for index in range(2):
        path = tmp_path / f"sidecar-{index}.yaml"
        path.write_text(yaml.safe_dump(config))
        process, port, _ = await start_sidecar_process(path)
        processes.append(process)
        ports.append(port)
    try:
        statuses = []
        async with aiohttp.ClientSession() as session:
            for index in range(8):
                port = ports[index % 2]  # alternate between the two replicas
                async with session.get(f"http://{LOOPBACK}:{port}/x") as resp:
                    statuses.append(resp.status)
        assert statuses == [200] * 5 + [429] * 3
    finally:
        for process in processes:
            process.terminate()
            await process.wait()


async def test_breaker_state_is_shared_between_replicas(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    async def down(request: web.Request) -> web.Response:
        return web.json_response({}, status=503)

    fake_model.on("/infer", down)
    config = shared_config(fake_model.url, redis_url=redis_server[1])
    config["upstreams"]["model"]["breaker"] = {"failures": 1, "reset_timeout": "1h"}
    first, second = await start_sidecar(config), await start_sidecar(config)
    async with first.session.post(first.url + "/infer", data=b"{}") as resp:
        assert resp.status == 503  # the model's answer; this opens the first's circuit
    for sidecar in (first, second):  # publish, then follow
        await sidecar.running.runtime.breaker_syncs[0].sync_once()
    assert second.running.runtime.guards["model"].breaker is not None
    assert second.running.runtime.guards["model"].breaker.state == "open"
    hits = len(fake_model.hits_for("/infer"))
    async with second.session.post(second.url + "/infer", data=b"{}") as resp:
        assert (await resp.json())["error"]["type"] == "circuit_open"
    assert len(fake_model.hits_for("/infer")) == hits  # the second never called the model


async def test_losing_redis_falls_back_to_local_state_and_says_so(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    process, redis_url = redis_server
    config = shared_config(
        fake_model.url,
        redis_url,
        rate_limit={"enabled": True, "global": {"rate": "1000/s", "burst": 1000}},
    )
    sidecar = await start_sidecar(config)
    async with sidecar.session.get(sidecar.url + "/x") as resp:
        assert resp.status == 200
    process.kill()
    process.wait(timeout=10)
    for _ in range(20):
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 200
            assert "RateLimit-Remaining" in resp.headers  # the local bucket took over
    async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
        health = await resp.json()
    assert health["checks"]["internal:redis"]["status"] == "fail"
    assert health["ready"] is True
    assert health["status"] == "degraded"
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_shared_state_up") == 0


async def test_a_server_that_is_not_redis_is_redis_lost_never_a_500(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """``redis_url`` pointing at something that answers, but not as Redis does (here
    ``+OK`` to everything, which redis-py's handshake reads as a map): requests got
    500 internal_error (AttributeError out of redis-py) and the breaker sync task
    died of the same error, for good."""

    async def not_redis(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        while await reader.read(65536):
            writer.write(b"+OK\r\n")
        writer.close()

    server = await asyncio.start_server(not_redis, LOOPBACK, 0)
    port = server.sockets[0].getsockname()[1]
    try:
        config = shared_config(
            fake_model.url,
            f"redis://{LOOPBACK}:{port}/0",
            rate_limit={"enabled": True, "global": {"rate": "1000/s", "burst": 1000}},
        )
        sidecar = await start_sidecar(config)
        for _ in range(5):
            async with sidecar.session.get(sidecar.url + "/x") as resp:
                assert resp.status == 200
                assert "RateLimit-Remaining" in resp.headers  # the local bucket
        sync = sidecar.running.runtime.breaker_syncs[0]
        await sync.sync_once()  # raised AttributeError
        async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
            health = await resp.json()
        assert health["checks"]["internal:redis"]["status"] == "fail"
        assert health["status"] == "degraded"
        async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
            assert metric_value(await resp.text(), "sidecar_shared_state_up") == 0
    finally:
        server.close()
        await server.wait_closed()


async def test_a_circuit_opened_just_before_a_reload_stays_open_and_is_published(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """A reload that leaves the breaker alone carries it on, open; its new sync must
    publish the open circuit, not take Redis's older "closed" for another replica's
    verdict and close it."""

    async def down(request: web.Request) -> web.Response:
        return web.json_response({}, status=503)

    fake_model.on("/infer", down)
    config = shared_config(fake_model.url, redis_url=redis_server[1])
    config["upstreams"]["model"]["breaker"] = {"failures": 1, "reset_timeout": "1h"}
    sidecar = await start_sidecar(config)
    await sidecar.running.runtime.breaker_syncs[0].sync_once()  # Redis holds "closed"
    async with sidecar.session.post(sidecar.url + "/infer", data=b"{}") as resp:
        assert resp.status == 503  # the model's answer; this opens the circuit
    config["routes"][0]["timeout"] = "7s"
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    runtime = sidecar.running.runtime
    await runtime.breaker_syncs[0].sync_once()
    breaker = runtime.guards["model"].breaker
    assert breaker is not None
    assert breaker.state == "open"
    other = await start_sidecar(config)  # another replica follows what was published
    await other.running.runtime.breaker_syncs[0].sync_once()
    other_breaker = other.running.runtime.guards["model"].breaker
    assert other_breaker is not None
    assert other_breaker.state == "open"


async def reload_held_in_its_probe(
    sidecar: SidecarHandle, fake_model: FakeModel, config: dict[str, Any]
) -> tuple[asyncio.Task[dict[str, Any]], asyncio.Event]:
    """Reload to ``config`` with the model's readiness path changed to one that holds
    its answer: the reload is built and waits for that probe (before the swap) until
    the returned event is set; the reload's task."""
    probed, release = asyncio.Event(), asyncio.Event()

    async def slow_health(request: web.Request) -> web.Response:
        probed.set()
        await release.wait()
        return web.json_response({})

    fake_model.on("/slow-health", slow_health)
    config["upstreams"]["model"]["health"] = {"path": "/slow-health", "interval": "1h"}
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    reload = asyncio.create_task(sidecar.running.reload())
    await asyncio.wait_for(probed.wait(), 10)
    return reload, release


def breaker_sync_tasks() -> int:
    return sum(1 for t in asyncio.all_tasks() if t.get_name() == "breaker-sync-model")


async def test_a_carried_breaker_is_synced_by_one_runtime_at_a_time(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """While a reload waits for its probes, the breaker it carries on is still synced
    by the runtime in service alone; the new runtime's sync starts at the swap, from
    what the old one last agreed with Redis, and the old one exchanges no more. (Two at
    once would each publish from their own view of Redis.)"""
    config = shared_config(fake_model.url, redis_url=redis_server[1])
    sidecar = await start_sidecar(config)
    old = sidecar.running.runtime.breaker_syncs[0]
    assert breaker_sync_tasks() == 1
    reload, release = await reload_held_in_its_probe(sidecar, fake_model, config)
    assert breaker_sync_tasks() == 1  # the old runtime's only
    release.set()
    assert (await asyncio.wait_for(reload, 10))["result"] == "ok"
    new = sidecar.running.runtime.breaker_syncs[0]
    assert new is not old
    assert new.breaker is old.breaker  # carried on (its URL and settings unchanged)
    assert new.published == old.published
    assert old._handed_over
    [retiring] = [t for t in asyncio.all_tasks() if t.get_name() == "retire-runtime"]
    await asyncio.wait_for(retiring, 10)  # the old runtime's Redis clients closed


async def test_a_reloads_redis_check_shows_only_once_in_service(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """A reload to another Redis, one that is down, checks it before the swap: the
    gauge went 0 while the Redis in service was up (and stayed 0 had the reload
    failed). It shows the new Redis's state once that runtime is in service."""
    config = shared_config(fake_model.url, redis_url=redis_server[1])
    sidecar = await start_sidecar(config)
    assert (await redis_health(sidecar))[1] == 1
    config["shared_state"]["redis_url"] = f"redis://{LOOPBACK}:{closed_port()}/0"
    reload, release = await reload_held_in_its_probe(sidecar, fake_model, config)
    assert (await redis_health(sidecar))[1] == 1  # the Redis in service is up
    release.set()
    assert (await asyncio.wait_for(reload, 10))["result"] == "ok"
    assert (await redis_health(sidecar))[1] == 0  # now the one in service is down
    [retiring] = [t for t in asyncio.all_tasks() if t.get_name() == "retire-runtime"]
    await asyncio.wait_for(retiring, 10)  # the old runtime's Redis clients closed


async def redis_health(sidecar: SidecarHandle) -> tuple[str, float | None]:
    """The internal:redis check's status and sidecar_shared_state_up."""
    async with sidecar.session.get(sidecar.admin_url + "/health") as resp:
        status = (await resp.json())["checks"]["internal:redis"]["status"]
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        return status, metric_value(await resp.text(), "sidecar_shared_state_up")


async def test_a_reload_reports_the_redis_state_it_knows_not_up(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """A reload's new runtime said Redis was up (check and gauge) until its next call
    to Redis found out it was not. Breaker sharing is off here: its sync would also
    call Redis as soon as it starts, and the test would race it."""
    process, redis_url = redis_server
    config = shared_config(
        fake_model.url,
        redis_url,
        rate_limit={"enabled": True, "global": {"rate": "1000/s", "burst": 1000}},
    )
    config["shared_state"]["breakers"] = False
    sidecar = await start_sidecar(config)
    assert await redis_health(sidecar) == ("pass", 1)
    process.kill()
    process.wait(timeout=10)
    async with sidecar.session.get(sidecar.url + "/x") as resp:
        assert resp.status == 200  # the call to Redis fails: the local bucket answers
    assert await redis_health(sidecar) == ("fail", 0)
    config["routes"][0]["timeout"] = "7s"  # the same Redis: what is known carries on
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    assert await redis_health(sidecar) == ("fail", 0)
    # Another Redis, which nothing serves: asked when the new runtime starts.
    config["shared_state"]["redis_url"] = f"redis://{LOOPBACK}:{closed_port()}/0"
    config["shared_state"]["retry_after"] = "1s"
    sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
    assert (await sidecar.running.reload())["result"] == "ok"
    assert await redis_health(sidecar) == ("fail", 0)


async def remaining(sidecar: SidecarHandle) -> str:
    """RateLimit-Remaining of a request's answer: the global bucket's tokens left."""
    async with sidecar.session.get(sidecar.url + "/x") as resp:
        return resp.headers["RateLimit-Remaining"]


async def connections_received(admin: Any) -> int:
    """How many connections the redis-server has taken since it started."""
    received: int = (await admin.info("stats"))["total_connections_received"]
    return received


def global_limit_config(
    upstream: str, redis_url: str, rate: str, burst: int, **shared_state: Any
) -> dict[str, Any]:
    """``shared_config`` with a global rate limit of ``burst`` tokens refilled at
    ``rate``; ``shared_state``: the Redis client's settings that differ."""
    limit = {"enabled": True, "global": {"rate": rate, "burst": burst}}
    config = shared_config(upstream, redis_url, rate_limit=limit)
    config["shared_state"].update(shared_state)
    return config


def holding_answers(fake_model: FakeModel, path: str) -> tuple[asyncio.Event, asyncio.Event]:
    """Make the model hold its answers at ``path``: the event set once a request has
    arrived there, and the one that lets them go."""
    arrived, release = asyncio.Event(), asyncio.Event()

    async def held(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({})

    fake_model.on(path, held)
    return arrived, release


async def test_calls_to_redis_are_capped_and_requests_past_the_cap_wait_their_turn_bounded(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """The async client's pool had no cap: with Redis stalled (here paused), a burst
    of requests opened a connection each and every one waited on Redis. Capped at
    ``max_connections``, requests past the cap wait for a connection, ``max_waiting``
    of them at most: the others take the local bucket at once (queue_full), and only
    ``max_connections`` connections are ever opened."""
    import redis.asyncio as aioredis

    _, redis_url = redis_server
    config = global_limit_config(
        fake_model.url,
        redis_url,
        "1000/s",
        1000,
        timeout="10s",
        max_connections=4,
        max_waiting=8,
        breakers=False,
    )
    sidecar = await start_sidecar(config)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        before = await connections_received(admin)
        # Every client's commands wait for 2 s (CLIENT UNPAUSE would wait too).
        await admin.client_pause(2000, all=True)
        requests = [
            asyncio.ensure_future(sidecar.session.get(sidecar.url + "/x")) for _ in range(40)
        ]
        try:
            answered = []
            async with asyncio.timeout(1.5):  # well before the pause ends
                for next_done in asyncio.as_completed(requests):
                    answered.append(await next_done)
                    if len(answered) == 28:
                        break
            # 4 hold the connections, 8 wait their turn (the wait is 10 s)
            assert sum(not r.done() for r in requests) == 12
            for resp in answered:
                assert resp.status == 200
                assert "RateLimit-Remaining" in resp.headers  # the local bucket answered
            for resp in await asyncio.wait_for(asyncio.gather(*requests), 10):
                assert resp.status == 200  # Redis answered once the pause ended
        finally:
            for request in requests:
                if request.done() and not request.cancelled():
                    request.result().release()
                else:
                    request.cancel()
        after = await connections_received(admin)
        assert after - before <= 4
        assert await local_fallbacks(sidecar) == {"busy": 0, "queue_full": 28, "redis_down": 0}
        assert (await redis_health(sidecar))[1] == 1  # busy is not lost
    finally:
        await admin.aclose()


async def local_fallbacks(sidecar: SidecarHandle) -> dict[str, float]:
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    return {
        reason: metric_value(text, "sidecar_ratelimit_local_fallback_total", reason=reason)
        for reason in ("busy", "queue_full", "redis_down")
    }


class SlowRedis:
    """A TCP relay in front of a redis-server that holds each command it passes on for
    ``delay`` seconds (per connection, in order): a Redis that answers, slowly."""

    def __init__(self, redis_url: str) -> None:
        host_port = redis_url.split("//", 1)[1].split("/", 1)[0]
        self.host, port = host_port.rsplit(":", 1)
        self.port = int(port)
        self.delay = 0.0
        # When set, each command instead waits here until the test lets it pass
        # (``gate.release()``); ``held`` counts those waiting.
        self.gate: asyncio.Semaphore | None = None
        self.held = 0
        self.url = ""  # the relay's, once started
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._relay, LOOPBACK, 0)
        self.url = f"redis://{LOOPBACK}:{self._server.sockets[0].getsockname()[1]}/0"

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(self.host, self.port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter, slow: bool) -> None:
            try:
                while chunk := await src.read(65536):
                    if slow and self.gate is not None:
                        self.held += 1
                        try:
                            await self.gate.acquire()
                        finally:
                            self.held -= 1
                    elif slow and self.delay:
                        await asyncio.sleep(self.delay)
                    dst.write(chunk)
                    await dst.drain()
            except OSError:
                pass
            finally:
                dst.close()

        task = asyncio.ensure_future(pipe(up_reader, writer, False))
        self._tasks.add(task)
        try:
            await pipe(reader, up_writer, True)
        finally:
            await task
            self._tasks.discard(task)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def slow_redis(redis_server: tuple[Any, str]) -> AsyncIterator[SlowRedis]:
    """A SlowRedis in front of the test's redis-server (not holding commands yet):
    stopped after the test, whether it passed or not."""
    slow = SlowRedis(redis_server[1])
    await slow.start()
    yield slow
    await slow.close()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait, 5 s at most, until ``condition()`` holds; ``what`` it says, if it never does."""
    for _ in range(500):
        if condition():
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"not so after 5 s: {what}")


async def test_a_request_finding_every_connection_busy_waits_its_turn_then_owes_redis(
    fake_model: FakeModel, start_sidecar: StartSidecar, slow_redis: SlowRedis
) -> None:
    """In a burst against a slow Redis (one connection), requests past the connection
    cap took the local copy of the global bucket at once and spent the tokens Redis
    had last shown, which every replica spends alike: the fleet could let through N
    times its limit. Now a request waits its turn (first come, first served) for up
    to ``timeout``, ``max_waiting`` of them at most; one that still gets no
    connection is decided by the local copy, counted by reason, and what it lets
    through is charged to Redis with the next call.

    The relay holds each command until the test lets it pass, so which request is
    answered by whom, and in what order, does not depend on how busy the host is.
    Each answer's RateLimit-Remaining says who decided it: Redis's bucket (20 tokens)
    or the local copy of what Redis last showed."""
    config = global_limit_config(
        fake_model.url,
        slow_redis.url,
        "1/h",
        20,
        timeout="2s",
        max_connections=1,
        max_waiting=3,
        breakers=False,
    )
    sidecar = await start_sidecar(config)
    assert await remaining(sidecar) == "19"  # connected, script loaded
    shared = sidecar.running.runtime.shared
    assert shared is not None
    slots = shared._link.slots
    loop = asyncio.get_running_loop()

    async def answer() -> tuple[str, float]:
        """RateLimit-Remaining of a request's answer, and how long it took."""
        sent = loop.time()
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 200
            return resp.headers["RateLimit-Remaining"], loop.time() - sent

    async def line_up() -> asyncio.Task[tuple[str, float]]:
        """A request sent once the one before it waits its turn; it waits too."""
        ahead = len(slots._waiting)
        request = asyncio.ensure_future(answer())
        await until(lambda: len(slots._waiting) == ahead + 1, "the request waits its turn")
        return request

    slow_redis.gate = asyncio.Semaphore(0)
    holder = asyncio.ensure_future(answer())
    await until(lambda: slow_redis.held == 1, "the first call is at Redis")
    waiters = [await line_up() for _ in range(3)]
    # The line is full: these two are decided by the local copy at once (19 shown
    # by Redis), owed, while the first call is still held.
    assert [await remaining(sidecar) for _ in range(2)] == ["18", "17"]
    assert await local_fallbacks(sidecar) == {"busy": 0, "queue_full": 2, "redis_down": 0}
    assert not holder.done()
    assert not any(waiter.done() for waiter in waiters)
    # Each waiter's call will run under its own timeout (2 s, as the wait): the
    # second's, which is held while the third waits out its turn, must end later
    # than that wait, so the calls begin a second after the waits did.
    await asyncio.sleep(1)
    slow_redis.gate.release()
    assert (await holder)[0] == "18"  # Redis's: 20 - the first - this one
    # The connection went to the first in line, not to a newcomer or the last.
    await until(lambda: slow_redis.held == 1, "the first waiter's call is at Redis")
    assert not any(waiter.done() for waiter in waiters)
    slow_redis.gate.release()
    assert (await waiters[0])[0] == "15"  # Redis's, charged the 2 owed
    await until(lambda: slow_redis.held == 1, "the second waiter's call is at Redis")
    # The third's turn comes when the second's call ends: its wait ends first
    # (busy), and the local copy (15, as Redis last showed) decides, owed.
    third, waited = await asyncio.wait_for(waiters[2], 10)
    assert (third, waiters[1].done()) == ("14", False)
    assert waited >= 2.0  # it waited its whole timeout
    assert await local_fallbacks(sidecar) == {"busy": 1, "queue_full": 2, "redis_down": 0}
    slow_redis.gate.release()
    # Redis's: its call began before the third was let through, and carried
    # nothing owed.
    assert (await waiters[1])[0] == "14"
    slow_redis.gate = None
    assert await local_fallbacks(sidecar) == {"busy": 1, "queue_full": 2, "redis_down": 0}
    assert (await redis_health(sidecar))[1] == 1  # busy is not lost
    # 8 let through so far (1 + 6 + this one): the 3 the local copy let through
    # were charged to Redis (the last with this call), whose bucket shows it to
    # every replica.
    assert await remaining(sidecar) == "12"


async def test_what_was_owed_when_redis_was_lost_is_not_charged_when_it_is_back(
    fake_model: FakeModel,
    redis_server: tuple[Any, str],
    start_sidecar: StartSidecar,
    slow_redis: SlowRedis,
) -> None:
    """Tokens owed while Redis was busy, just before it was lost, stayed owed through
    the outage and were charged when it came back, so the fleet refused for owed /
    rate seconds as it recovered, where an outage's traffic is not charged."""
    import redis.asyncio as aioredis

    config = global_limit_config(
        fake_model.url,
        slow_redis.url,
        "1/h",
        20,
        timeout="400ms",
        retry_after="300ms",
        max_connections=1,
        max_waiting=0,
        breakers=False,
    )
    sidecar = await start_sidecar(config)
    admin = aioredis.Redis.from_url(redis_server[1])
    try:
        assert await remaining(sidecar) == "19"  # connected, script loaded
        slow_redis.delay = 1.0

        # One call holds the connection and times out (Redis lost); three find no
        # connection and no place to wait: the local copy lets them through, owed.
        async def status() -> int:
            async with sidecar.session.get(sidecar.url + "/x") as resp:
                return resp.status

        statuses = await asyncio.wait_for(asyncio.gather(*(status() for _ in range(4))), 10)
        assert statuses == [200] * 4
        assert await local_fallbacks(sidecar) == {"busy": 0, "queue_full": 3, "redis_down": 1}
        # The held command still reaches Redis (the relay passes it on late): one token.
        for _ in range(100):  # bounded: 5 s
            tokens = await admin.hget("test:ratelimit:global", "tokens")
            if tokens is not None and float(tokens) < 19:
                break
            await asyncio.sleep(0.05)
        slow_redis.delay = 0.0  # and retry_after (from 0.4 s) has passed: Redis is asked again
        # 20 - the first - the held one - this one; the 3 owed went with the outage.
        assert await remaining(sidecar) == "17"
        assert (await redis_health(sidecar))[1] == 1
    finally:
        await admin.aclose()


async def test_redis_connections_are_the_cap_plus_one_per_shared_breaker(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    import redis.asyncio as aioredis

    _, redis_url = redis_server
    config = global_limit_config(
        fake_model.url, redis_url, "1000/s", 1000, max_connections=2, breakers=True
    )
    for name in ("a", "b", "c"):
        config["upstreams"][name] = {"url": fake_model.url}
    sidecar = await start_sidecar(config)
    syncs = sidecar.running.runtime.breaker_syncs
    assert len(syncs) == 4
    for _ in range(250):  # every sync has made its first exchange
        if all(sync.published is not None and sync._storage is not None for sync in syncs):
            break
        await asyncio.sleep(0.02)
    for _ in range(5):
        async with sidecar.session.get(sidecar.url + "/x") as resp:
            assert resp.status == 200
    admin = aioredis.Redis.from_url(redis_url)
    try:
        clients = len(await admin.client_list()) - 1  # not the admin's own
    finally:
        await admin.aclose()
    # Requests share the capped pool; each shared breaker keeps one connection of its
    # own (its exchanges run in a thread, one at a time), as the README says.
    assert clients <= 2 + len(syncs), f"{clients} connections to Redis, max_connections 2"


async def redis_clients(redis_url: str) -> int:
    """Connections open on the redis-server, other than the one asking."""
    import redis.asyncio as aioredis

    admin = aioredis.Redis.from_url(redis_url)
    try:
        return len(await admin.client_list()) - 1
    finally:
        await admin.aclose()


async def test_stopping_during_a_reloads_drain_closes_the_retired_runtimes_redis_clients(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """SIGTERM (``stop()``) while a retired runtime waits for its request in flight:
    the sidecar's stop cancelled the retirement, and the retired runtime's Redis
    client (the rate limit's pool) was left open, to the garbage collector."""
    arrived, never = holding_answers(fake_model, "/held")
    _, redis_url = redis_server
    config = global_limit_config(fake_model.url, redis_url, "1000/s", 1000)
    config["server"]["drain_timeout"] = "60s"  # the retired runtime's: it waits
    sidecar = await start_sidecar(config)
    first = sidecar.running.runtime  # kept: nothing of it is collected meanwhile
    in_flight = asyncio.ensure_future(sidecar.session.post(sidecar.url + "/held", data=b"{}"))
    try:
        await asyncio.wait_for(arrived.wait(), 10)  # its global token came from Redis
        assert first.active == 1
        config["server"]["drain_timeout"] = "100ms"  # the sidecar's own stop: short
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        await asyncio.sleep(0.1)  # the retirement waits for the request
        assert sidecar.running.runtime is not first
        assert first.active == 1
        assert await redis_clients(redis_url) >= 1
        await sidecar.running.stop()
        assert await redis_clients(redis_url) == 0
    finally:
        never.set()
        with contextlib.suppress(aiohttp.ClientError):
            (await in_flight).release()


async def test_a_reloads_drain_holds_no_more_redis_connections_than_the_cap(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """While a retired runtime drained, it and the new one each had a pool of
    ``max_connections``: twice the cap, open to the same Redis. A reload that keeps
    the Redis settings now shares the connections; the old runtime's stop leaves
    them to the new one."""
    import redis.asyncio as aioredis

    arrived, release = holding_answers(fake_model, "/held")
    _, redis_url = redis_server
    config = global_limit_config(
        fake_model.url, redis_url, "1/h", 100, timeout="5s", max_connections=2, breakers=False
    )
    config["server"]["drain_timeout"] = "60s"
    sidecar = await start_sidecar(config)
    admin = aioredis.Redis.from_url(redis_url)

    async def burst() -> list[str]:
        """Four requests at once while Redis holds every command: the pool opens all
        the connections it may."""
        await admin.client_pause(300, all=True)
        resps = await asyncio.wait_for(
            asyncio.gather(*(sidecar.session.get(sidecar.url + "/x") for _ in range(4))), 10
        )
        for resp in resps:
            resp.release()
        return [resp.headers["RateLimit-Remaining"] for resp in resps]

    first = sidecar.running.runtime
    in_flight = asyncio.ensure_future(sidecar.session.post(sidecar.url + "/held", data=b"{}"))
    try:
        await asyncio.wait_for(arrived.wait(), 10)
        await burst()
        assert await redis_clients(redis_url) - 1 == 2  # not the admin's own
        config["routes"][0]["timeout"] = "7s"  # Redis's settings as they were
        sidecar.running.live.config_path.write_text(yaml.safe_dump(config))
        assert (await sidecar.running.reload())["result"] == "ok"
        assert first.active == 1  # the old runtime drains
        await burst()
        assert await redis_clients(redis_url) - 1 == 2  # 4 before
        release.set()
        (await asyncio.wait_for(in_flight, 10)).release()
        for _ in range(500):  # bounded: the old runtime stops once its request ended
            if first.upstreams._released:
                break
            await asyncio.sleep(0.01)
        assert first.upstreams._released
        # The new runtime's requests still reach Redis (100 tokens, 9 taken before).
        assert sorted(await burst()) == ["87", "88", "89", "90"]
        assert await local_fallbacks(sidecar) == {"busy": 0, "queue_full": 0, "redis_down": 0}
    finally:
        release.set()
        if not in_flight.done():
            in_flight.cancel()
        await admin.aclose()


async def test_a_client_leaving_mid_call_neither_charges_owed_twice_nor_reconnects(
    fake_model: FakeModel,
    redis_server: tuple[Any, str],
    start_sidecar: StartSidecar,
    slow_redis: SlowRedis,
) -> None:
    """A request whose client leaves while its call to Redis is in progress is
    cancelled. The call was cut short with it: redis-py drops the connection (Redis
    still runs the command it was sent), so the slot went to a new connection beside
    it, and the tokens owed the call carried, which Redis had charged, were owed
    again and charged a second time by the next call."""
    import redis.asyncio as aioredis

    config = global_limit_config(
        fake_model.url,
        slow_redis.url,
        "1/h",
        100,
        timeout="3s",
        max_connections=1,
        max_waiting=0,
        breakers=False,
    )
    sidecar = await start_sidecar(config)
    admin = aioredis.Redis.from_url(redis_server[1])
    try:
        assert await remaining(sidecar) == "99"  # connected
        connections = await connections_received(admin)
        slow_redis.delay = 0.4
        holding = asyncio.ensure_future(sidecar.session.get(sidecar.url + "/x"))
        await asyncio.sleep(0.1)
        for _ in range(3):  # the connection is busy, none may wait: owed
            async with sidecar.session.get(sidecar.url + "/x") as resp:
                assert resp.status == 200
        (await asyncio.wait_for(holding, 10)).release()
        assert await local_fallbacks(sidecar) == {"busy": 0, "queue_full": 3, "redis_down": 0}
        for _ in range(3):  # each carries what is owed to Redis; its client leaves
            async with aiohttp.ClientSession() as leaving:
                with pytest.raises(asyncio.TimeoutError):
                    await leaving.get(sidecar.url + "/x", timeout=aiohttp.ClientTimeout(total=0.1))
            await asyncio.sleep(0.5)  # Redis has run the command it was sent
        slow_redis.delay = 0.0
        # 1 + 1 + 3 owed + 3 whose clients left + this one: 9 taken, each once.
        assert await remaining(sidecar) == "91"
        new = await connections_received(admin) - connections
        assert new == 0  # the capped connection was kept: no second one opened
    finally:
        await admin.aclose()


async def test_requests_waiting_when_redis_is_lost_do_not_call_it_again(
    fake_model: FakeModel, redis_server: tuple[Any, str], start_sidecar: StartSidecar
) -> None:
    """Redis stalls (paused) with one connection held and five requests waiting their
    turn. The call holding it times out and marks Redis lost; each waiter then gets
    its turn, sees Redis lost and is decided by the local bucket at once (nothing
    owed), instead of calling the stalled Redis in turn (five more timeouts, one
    after the other, each on a new connection). The slot comes back: once Redis
    answers again, so does the next request."""
    import redis.asyncio as aioredis

    _, redis_url = redis_server
    config = global_limit_config(
        fake_model.url,
        redis_url,
        "1/h",
        100,
        timeout="300ms",
        retry_after="1s",
        max_connections=1,
        max_waiting=5,
        breakers=False,
    )
    sidecar = await start_sidecar(config)
    admin = aioredis.Redis.from_url(redis_url)
    try:
        assert await remaining(sidecar) == "99"  # connected
        connections = await connections_received(admin)
        await admin.client_pause(1500, all=True)
        loop = asyncio.get_running_loop()
        began = loop.time()

        async def timed() -> float:
            async with sidecar.session.get(sidecar.url + "/x") as resp:
                assert resp.status == 200
                return loop.time() - began

        holding = asyncio.ensure_future(timed())
        await asyncio.sleep(0.1)  # its call is in progress; their waits end after it
        waiting = [asyncio.ensure_future(timed()) for _ in range(5)]
        times = await asyncio.wait_for(asyncio.gather(holding, *waiting), 10)
        # All at the holder's timeout (0.3 s): none calls the lost Redis again, whose
        # timeout would end at 0.6 s at the earliest (the margin is for a busy host).
        assert max(times) < 0.55, times
        assert await local_fallbacks(sidecar) == {"busy": 0, "queue_full": 0, "redis_down": 6}
        assert (await redis_health(sidecar))[1] == 0
        await asyncio.sleep(max(0.0, 1.6 - (loop.time() - began)))  # unpaused, retry due
        # Redis's: the first and this one (the held call's connection was gone
        # before the pause ended: Redis dropped its command).
        assert await remaining(sidecar) == "98"
        assert (await redis_health(sidecar))[1] == 1
        # The held call's connection, dropped at its timeout, and this one's: none
        # for the waiters.
        new = await connections_received(admin) - connections
        assert new == 1
    finally:
        await admin.aclose()
