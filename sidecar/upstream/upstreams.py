"""Upstream model servers: one keep-alive pool and one ``send()`` each, and a
background readiness probe whose verdict the own endpoints read.

``UpstreamClient.send`` is the only way a request reaches a model server:
forwarding, retries, shadow copies, the secondary-model fallback and health probes
all use it. It owns the upstream's address, its own configured headers (never
another upstream's), the request id in its form, the deadline header and the
mapping of connection failures to the sidecar's errors.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import urlsplit

import orjson
import structlog

from sidecar.analytics.compare import Comparer
from sidecar.background import BackgroundTasks
from sidecar.config.schema import Upstream
from sidecar.http import errors
from sidecar.http.client import (
    BrokenAnswer,
    ClientResponse,
    ConnectFailed,
    Disconnected,
    Pool,
    PoolClosed,
)
from sidecar.http.messages import Headers, field_key
from sidecar.telemetry.metrics import Metrics

# Tells the model server how long this attempt may take, so it can give up too.
DEADLINE_HEADER: Final = "X-Sidecar-Timeout-Ms"
_DEADLINE_PREFIX: Final = DEADLINE_HEADER.encode() + b": "

log: Final = structlog.get_logger("sidecar.upstream.upstreams")

# Methods a request may be sent again with, after a kept-alive connection failed
# before any byte of the answer (RFC 9110 section 9.2.2).
IDEMPOTENT: Final = frozenset({"GET", "HEAD", "PUT", "DELETE", "OPTIONS"})

# Connections a readiness prober keeps to each upstream (its checks run one at a time).
_PROBE_CONNECTIONS: Final = 2


class InFlightCount:
    """What is out under one cap (a route's or the server's requests, a route's shadow
    copies), across reloads: a reload's fresh runtime counts on from the one it
    replaces, whose requests may still be out (each runtime counting its own let a
    reload pass a cap twice)."""

    __slots__ = ("bytes", "count")

    def __init__(self) -> None:
        self.count = 0
        self.bytes = 0  # what they hold (a route's shadow copies: their request bodies)


class UpstreamCall:
    """What is sent upstream; kept whole so a retry, a shadow copy or a fallback can
    replay it to whichever upstream sends it. (One per request: a plain class, as a
    compiled dataclass's ``__init__`` would run interpreted.)"""

    __slots__ = ("body", "headers", "method", "request_id", "target")

    def __init__(
        self,
        method: str,
        target: str,  # the raw path and query, exactly as the client sent them
        headers: Headers,  # the client's, for any upstream
        body: bytes | None,
        request_id: str = "",  # the id the client sees
    ) -> None:
        self.method = method
        self.target = target
        self.headers = headers
        self.body = body
        self.request_id = request_id

    def __repr__(self) -> str:
        return f"UpstreamCall({self.method} {self.target!r}, request_id={self.request_id!r})"


@dataclass(slots=True)
class Check:
    name: str  # e.g. "ready", "model:iris", "canary"
    ok: bool
    latency: float
    error: str | None


@dataclass(slots=True)
class ProbeResult:
    ready: bool
    checked_at: float  # wall-clock seconds
    latency: float
    error: str | None  # the first failing check's error
    checks: list[Check]


class UpstreamClient:
    """One upstream model server."""

    def __init__(self, name: str, config: Upstream) -> None:
        self.name = name
        self.config = config
        parts = urlsplit(config.url)
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.base_path = parts.path.rstrip("/")  # prefixed to every target
        # Secrets are revealed once, here, and only ever go to this upstream.
        self.extra_headers: tuple[tuple[str, str], ...] = tuple(
            (key, value.get_secret_value()) for key, value in config.headers.items()
        )
        self._id_header = config.request_id.header
        self._id_as_uuid = config.request_id.format == "uuid"
        self._id_header_prefix = (self._id_header or "").encode("latin-1", "replace") + b": "
        self._own_fields = Headers(self.extra_headers).render()
        # Names this upstream sets itself: a client's fields of these names are replaced.
        self._own_names = frozenset(
            field_key(name)
            for name in (
                DEADLINE_HEADER,
                self._id_header or DEADLINE_HEADER,
                *(key for key, _ in self.extra_headers),
            )
        )
        self._pool: Pool | None = None
        # Readiness probes have connections of their own: a pool whose every slot is
        # busy with slow answers is load, not an outage, and must not fail the probe.
        self._probe_pool: Pool | None = None
        self.last_probe: ProbeResult | None = None
        self.last_success: float | None = None

    def headers_for(self, call: UpstreamCall, within: float) -> list[bytes]:
        """The header fields of one attempt to this upstream, as pieces of the wire
        form (the pool joins them with the request line once): the client's, this
        upstream's own, the request id in this upstream's form, and how long it has."""
        parts: list[bytes] = []
        call.headers.render_into(parts, self._own_names)
        if self._id_header and call.request_id:
            request_id = _uuid_of(call.request_id) if self._id_as_uuid else call.request_id
            parts.append(self._id_header_prefix)
            parts.append(request_id.encode("latin-1", "replace"))
            parts.append(b"\r\n")
        parts.append(self._own_fields)
        parts.append(_DEADLINE_PREFIX)
        parts.append(b"%d\r\n" % max(1, int(within * 1000)))
        return parts

    @property
    def pool(self) -> Pool:
        if self._pool is None:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        return self._pool

    def attach(self, pool: Pool, probe_pool: Pool | None = None) -> None:
        self._pool = pool
        self._probe_pool = probe_pool

    async def send(
        self,
        call: UpstreamCall,
        *,
        within: float,
        connect_timeout: float | None = None,
        replayable: bool | None = None,
        via: Pool | None = None,
    ) -> ClientResponse:
        """Send one attempt and return once the answer's head has arrived, ``within``
        seconds. The caller owns the answer and must ``release()`` (or ``close()``)
        it. Raises ``UpstreamTimeout`` or ``UpstreamError`` (``retryable`` when a
        retry may cure it), never a Python class name or an address. ``via``: another
        pool to this upstream than the one requests share (the probes' own)."""
        if replayable is None:
            replayable = call.method in IDEMPOTENT
        pool = self.pool if via is None else via
        try:
            return await pool.request(
                call.method,
                self.base_path + call.target,
                self.headers_for(call, within),
                call.body,
                replayable=replayable,
                connect_timeout=connect_timeout,
                deadline=pool.loop.time() + within,
            )
        except TimeoutError:
            raise errors.UpstreamTimeout(
                f"upstream {self.name!r} did not start answering within {within:g}s",
                retryable=True,
            ) from None
        except ConnectFailed as exc:
            raise errors.UpstreamError(
                f"cannot connect to upstream {self.name!r}: {exc.reason}", retryable=True
            ) from None
        except PoolClosed:
            # Not the model: a reload retired the config this request arrived under,
            # and the request outlasted that config's drain time.
            raise errors.Reloaded(
                "the sidecar's config was reloaded during this request, which outlasted "
                "the old config's drain time (server.drain_timeout): it was not sent on "
                f"to upstream {self.name!r}; send it again"
            ) from None
        except Disconnected:
            raise errors.UpstreamError(
                f"upstream {self.name!r} closed the connection before answering"
            ) from None
        except BrokenAnswer:
            raise errors.UpstreamError(
                f"upstream {self.name!r} sent an answer that is not valid HTTP"
            ) from None

    @property
    def ready(self) -> bool:
        return self.last_probe is not None and self.last_probe.ready

    async def _check(
        self, name: str, method: str, path: str, body: Any = None, expect: Any = None
    ) -> Check:
        health = self.config.health
        started = time.perf_counter()
        error: str | None = None
        headers = Headers()
        if body is not None:
            headers["Content-Type"] = "application/json"  # some servers insist (422)
        if name == "canary" and health.canary is not None:
            headers.update(health.canary.headers)
        call = UpstreamCall(
            method, path, headers, None if body is None else orjson.dumps(body), request_id=""
        )
        try:
            async with asyncio.timeout(health.timeout):
                response = await self.send(
                    call, within=health.timeout, replayable=True, via=self._probe_pool
                )
                try:
                    payload = await response.read()
                except BrokenAnswer:
                    raise errors.UpstreamError(
                        f"upstream {self.name!r} broke off its answer"
                    ) from None
                finally:
                    # Whatever happens (broken, or the timeout in the middle of the
                    # body): read whole it goes back to the pool, else it is closed and
                    # its slot freed.
                    response.release()
                if response.status != 200:
                    error = f"{path} answered {response.status}"
                elif expect is not None:
                    error = self._canary_error(payload, expect)
        except (TimeoutError, errors.UpstreamTimeout):
            error = f"{path} did not answer within {health.timeout:g}s"
        except errors.UpstreamError as exc:
            error = f"{path}: {exc.message}"
        return Check(name, error is None, time.perf_counter() - started, error)

    def _canary_error(self, payload: bytes, expect: Any) -> str | None:
        canary = self.config.health.canary
        assert canary is not None
        comparison = Comparer(canary.compare).compare(200, orjson.dumps(expect), 200, payload)
        if comparison.result == "match":
            return None
        detail = "; ".join(
            f"{d['field']}: expected {d['primary']}, got {d['shadow']}"
            for d in comparison.differences[:3]
        )
        return f"canary answer differs from the expected one ({detail or comparison.reason})"

    async def probe(self) -> ProbeResult:
        """Server readiness, each model's readiness, then the canary, in that order."""
        health = self.config.health
        started = time.perf_counter()
        checks = [await self._check("ready", "GET", health.path)]
        # A server that is not ready says enough: its model checks would each wait out
        # the timeout too (a hung server would hold a pass for (1 + models) timeouts).
        for model in health.models if checks[0].ok else ():
            path = health.model_ready_path.format(name=model)
            checks.append(await self._check(f"model:{model}", "GET", path))
        canary = health.canary
        if canary is not None and all(c.ok for c in checks):
            checks.append(
                await self._check("canary", canary.method, canary.path, canary.body, canary.expect)
            )
        failing = next((c for c in checks if not c.ok), None)
        now = time.time()
        result = ProbeResult(
            failing is None,
            now,
            time.perf_counter() - started,
            None if failing is None else failing.error,
            checks,
        )
        if result.ready:
            self.last_success = now
        self.last_probe = result
        return result


def _uuid_of(request_id: str) -> str:
    """A UUID standing for a request id: the same for every attempt of one request."""
    try:
        return str(uuid.UUID(request_id))
    except ValueError:
        digest = hashlib.blake2b(request_id.encode(), digest_size=16).digest()
        return str(uuid.UUID(bytes=digest, version=4))


class ConnectionPools:
    """Keep-alive pools shared by every config that names the same upstream with the
    same settings, so a reload keeps warm connections. Each pool's stray and replayed
    counts reach ``metrics`` at every publish (and when the pool closes)."""

    def __init__(self, metrics: Metrics | None = None) -> None:
        self._pools: dict[tuple[object, ...], Pool] = {}
        self._users: dict[tuple[object, ...], int] = {}
        self._metrics = metrics
        self._published: dict[tuple[object, ...], tuple[int, int]] = {}
        if metrics is not None:
            metrics.on_publish(self.publish)

    @staticmethod
    def _size(config: Upstream, probes: bool) -> int:
        return _PROBE_CONNECTIONS if probes else config.max_connections

    def _key(self, name: str, config: Upstream, probes: bool) -> tuple[object, ...]:
        # Only what shapes the pool; headers and probes are applied per request.
        return (name, config.url, self._size(config, probes), config.connect_timeout, probes)

    def acquire(self, name: str, config: Upstream, *, probes: bool = False) -> Pool:
        """The upstream's pool for requests, or (``probes``) its readiness probes'
        own small one."""
        key = self._key(name, config, probes)
        pool = self._pools.get(key)
        if pool is None:
            parts = urlsplit(config.url)
            pool = Pool(
                parts.hostname or "127.0.0.1",
                parts.port or 80,
                max_connections=self._size(config, probes),
                connect_timeout=config.connect_timeout,
            )
            self._pools[key] = pool
        self._users[key] = self._users.get(key, 0) + 1
        return pool

    def publish(self) -> None:
        for key, pool in self._pools.items():
            self._publish_one(key, pool)

    def _publish_one(self, key: tuple[object, ...], pool: Pool) -> None:
        metrics = self._metrics
        if metrics is None:
            return
        name = str(key[0])
        stray, replayed = self._published.get(key, (0, 0))
        if pool.stray > stray:
            metrics.upstream_stray.labels(name).inc(pool.stray - stray)
        if pool.replayed > replayed:
            metrics.upstream_replayed.labels(name).inc(pool.replayed - replayed)
        self._published[key] = (pool.stray, pool.replayed)

    async def release(self, name: str, config: Upstream, *, probes: bool = False) -> None:
        key = self._key(name, config, probes)
        if key not in self._users:
            return  # closed with every other pool (the sidecar stopped mid-reload)
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key]
            pool = self._pools.pop(key)
            self._publish_one(key, pool)
            self._published.pop(key, None)
            pool.close()

    async def close(self) -> None:
        self.publish()
        for pool in self._pools.values():
            pool.close()
        self._pools.clear()
        self._users.clear()
        self._published.clear()


class Upstreams:
    """All upstreams of a config, started and stopped together."""

    def __init__(
        self,
        configs: Mapping[str, Upstream],
        metrics: Metrics,
        pools: ConnectionPools,
        *,
        previous: Upstreams | None = None,
    ) -> None:
        """``previous``: the upstreams of the config a reload replaces; the last probe
        of each upstream whose settings are unchanged carries on, so its readiness is
        known at once."""
        self.clients = {name: UpstreamClient(name, cfg) for name, cfg in configs.items()}
        self._metrics = metrics
        self._pools = pools
        self._tasks = BackgroundTasks()
        self._released = False
        # Set once every upstream readiness rests on (``needed``) has a probe result.
        self.first_pass_done = asyncio.Event()
        # The upstreams of routes and of their fallbacks; the runtime narrows it (a
        # shadow candidate that hangs must not hold back start-up or a reload).
        self.needed: frozenset[str] = frozenset(self.clients)
        self._was_ready: dict[str, bool] = {}
        for name, client in self.clients.items():
            before = previous.clients.get(name) if previous is not None else None
            if before is not None and before.config == client.config:
                client.last_probe, client.last_success = before.last_probe, before.last_success
                if before.last_probe is not None:
                    self._was_ready[name] = before.last_probe.ready
        # Called with an upstream's name when its probe passes (the runtime lets its
        # open breaker half-open).
        self.on_probe_passed: Callable[[str], None] | None = None

    def __getitem__(self, name: str) -> UpstreamClient:
        return self.clients[name]

    async def start(self) -> None:
        for client in self.clients.values():
            client.attach(
                self._pools.acquire(client.name, client.config),
                self._pools.acquire(client.name, client.config, probes=True),
            )
        self._tasks.spawn(self._probe_forever(), name="upstream-prober")

    async def stop_probing(self) -> None:
        await self._tasks.stop()

    @property
    def probing(self) -> bool:
        return len(self._tasks) > 0

    async def stop(self) -> None:
        await self._tasks.stop()
        if self._released:
            return
        self._released = True
        for client in self.clients.values():
            await self._pools.release(client.name, client.config)
            await self._pools.release(client.name, client.config, probes=True)

    async def probe_all(self) -> None:
        """One pass over every upstream now, all at once, whatever readiness rests on
        (for tests and tools; the sidecar's own probes run on each upstream's schedule
        and a reload waits on ``first_pass_done``)."""
        await asyncio.gather(*(self._probe_one(c) for c in self.clients.values()))
        self.first_pass_done.set()

    async def _probe_one(self, client: UpstreamClient) -> None:
        result = await client.probe()
        self._metrics.upstream_ready.labels(client.name).set(1 if result.ready else 0)
        if result.ready and self.on_probe_passed is not None:
            self.on_probe_passed(client.name)
        if result.ready != self._was_ready.get(client.name):
            # Log changes only: a probe every few seconds must not flood the log.
            if result.ready:
                log.info("upstream_ready", upstream=client.name)
            else:
                log.warning("upstream_not_ready", upstream=client.name, error=result.error)
            self._was_ready[client.name] = result.ready

    async def _probe_forever(self) -> None:
        """Each upstream on its own schedule: one whose probes hang (a shadow candidate,
        a secondary model with a long probe timeout) must not hold back another's, whose
        last result would then go stale and take the pod out of service."""
        awaited: list[asyncio.Event] = []
        for client in self.clients.values():
            probed = asyncio.Event()
            if client.name in self.needed and client.last_probe is None:
                awaited.append(probed)
            self._tasks.spawn(
                self._probe_client_forever(client, probed), name=f"upstream-prober-{client.name}"
            )
        for probed in awaited:
            await probed.wait()
        self.first_pass_done.set()

    async def _probe_client_forever(self, client: UpstreamClient, probed: asyncio.Event) -> None:
        while True:
            try:
                await self._probe_one(client)
            except Exception:
                # One bad pass must not end probing for good (readiness would freeze).
                log.exception("readiness_probe_failed", upstream=client.name)
            probed.set()
            await asyncio.sleep(client.config.health.interval)
