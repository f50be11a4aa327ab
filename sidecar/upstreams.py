"""Upstream model servers: one long-lived client session and keep-alive pool each,
and a background readiness probe whose verdict the own endpoints read."""

from __future__ import annotations

import asyncio
import hashlib
import os
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson
import structlog
from multidict import CIMultiDict
from yarl import URL

from sidecar import errors
from sidecar.background import BackgroundTasks
from sidecar.compare import Comparer
from sidecar.config import Upstream
from sidecar.metrics import Metrics

if TYPE_CHECKING:
    from sidecar.proxy import UpstreamCall

# Tells the model server how long this attempt may take, so it can give up too.
DEADLINE_HEADER = "X-Sidecar-Timeout-Ms"

log = structlog.get_logger("sidecar.upstreams")

# A proxy must not invent request headers the client did not send: aiohttp would add
# these by default (and an added Accept-Encoding would make the model compress
# answers for clients that never asked for it).
_NO_AUTO_HEADERS = ("User-Agent", "Accept", "Accept-Encoding", "Content-Type")


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
        self.origin = URL(config.url)
        # Secrets are revealed once, here, and only ever go to this upstream.
        self.extra_headers: tuple[tuple[str, str], ...] = tuple(
            (key, value.get_secret_value()) for key, value in config.headers.items()
        )
        self._id_header = config.request_id.header
        self._id_as_uuid = config.request_id.format == "uuid"
        self._session: aiohttp.ClientSession | None = None
        self.last_probe: ProbeResult | None = None
        self.last_success: float | None = None

    def headers_for(self, call: UpstreamCall, within: float) -> CIMultiDict[str]:
        """The headers of one attempt to this upstream: the client's, this upstream's
        own, the request id in this upstream's form, and how long it has."""
        headers = call.headers.copy()
        if self._id_header:
            headers[self._id_header] = (
                _uuid_of(call.request_id) if self._id_as_uuid else call.request_id
            )
        for name, value in self.extra_headers:
            headers[name] = value
        headers[DEADLINE_HEADER] = str(max(1, int(within * 1000)))
        return headers

    def url_for(self, target: str) -> URL:
        """The URL of a request target (path and query) on this upstream.

        Concatenation keeps the client's bytes exactly: no re-encoding and no
        folding of dot segments (the routing stage checked the target is a path).
        """
        return URL(self.config.url + target, encoded=True)

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise RuntimeError(f"upstream {self.name!r} is not started")
        return self._session

    def attach(self, session: aiohttp.ClientSession) -> None:
        self._session = session

    @property
    def ready(self) -> bool:
        return self.last_probe is not None and self.last_probe.ready

    async def _check(
        self, name: str, method: str, path: str, body: Any = None, expect: Any = None
    ) -> Check:
        health = self.config.health
        started = time.perf_counter()
        error: str | None = None
        try:
            headers = dict(self.extra_headers)
            if body is not None:
                headers["Content-Type"] = "application/json"  # some servers insist (422)
            if name == "canary" and health.canary is not None:
                headers.update(health.canary.headers)
            async with asyncio.timeout(health.timeout):
                async with self.session.request(
                    method,
                    self.origin.with_path(path),
                    headers=headers,
                    data=None if body is None else orjson.dumps(body),
                ) as response:
                    payload = await response.read()
                    if response.status != 200:
                        error = f"{path} answered {response.status}"
                    elif expect is not None:
                        error = self._canary_error(payload, expect)
        except TimeoutError:
            error = f"{path} did not answer within {health.timeout:g}s"
        except aiohttp.ClientError as exc:
            error = f"{path}: {upstream_failure(self.name, exc).message}"
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
        for model in health.models:
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


def upstream_failure(name: str, exc: aiohttp.ClientError) -> errors.UpstreamError:
    """What went wrong, for the client: never a Python class name or an address."""
    if isinstance(exc, aiohttp.ClientConnectorError):
        errno = exc.os_error.errno
        reason = os.strerror(errno).lower() if errno else "the connection failed"
        return errors.UpstreamError(
            f"cannot connect to upstream {name!r}: {reason}", retryable=True
        )
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return errors.UpstreamError(f"upstream {name!r} closed the connection before answering")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return errors.UpstreamError(f"upstream {name!r} broke off its answer")
    if isinstance(exc, aiohttp.ClientResponseError):
        return errors.UpstreamError(f"upstream {name!r} sent an answer that is not valid HTTP")
    return errors.UpstreamError(f"upstream {name!r} failed to answer")


class ConnectionPools:
    """Client sessions (keep-alive pools) shared by every config that names the same
    upstream with the same settings, so a reload keeps warm connections."""

    def __init__(self) -> None:
        self._sessions: dict[tuple[object, ...], aiohttp.ClientSession] = {}
        self._users: dict[tuple[object, ...], int] = {}

    @staticmethod
    def _key(name: str, config: Upstream) -> tuple[object, ...]:
        # Only what shapes the session; headers and probes are applied per request.
        return (name, config.url, config.max_connections, config.connect_timeout)

    def acquire(self, name: str, config: Upstream) -> aiohttp.ClientSession:
        key = self._key(name, config)
        session = self._sessions.get(key)
        if session is None:
            session = _new_session(config)
            self._sessions[key] = session
        self._users[key] = self._users.get(key, 0) + 1
        return session

    async def release(self, name: str, config: Upstream) -> None:
        key = self._key(name, config)
        self._users[key] -= 1
        if self._users[key] == 0:
            del self._users[key]
            await self._sessions.pop(key).close()

    async def close(self) -> None:
        for session in self._sessions.values():
            await session.close()
        self._sessions.clear()
        self._users.clear()


def _new_session(config: Upstream) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(
        limit=config.max_connections,
        limit_per_host=0,
        keepalive_timeout=30.0,
    )
    return aiohttp.ClientSession(
        connector=connector,
        # Time to the first byte and silence mid-answer are bounded per request, by
        # the route's deadlines and its idle timeout, each with its own message.
        timeout=aiohttp.ClientTimeout(total=None, sock_connect=config.connect_timeout),
        auto_decompress=False,  # bytes pass through exactly as the model sent them
        cookie_jar=aiohttp.DummyCookieJar(),  # one client's cookies never reach another
        skip_auto_headers=_NO_AUTO_HEADERS,
        trust_env=False,
    )


class Upstreams:
    """All upstreams of a config, started and stopped together."""

    def __init__(
        self, configs: Mapping[str, Upstream], metrics: Metrics, pools: ConnectionPools
    ) -> None:
        self.clients = {name: UpstreamClient(name, cfg) for name, cfg in configs.items()}
        self._metrics = metrics
        self._pools = pools
        self._tasks = BackgroundTasks()
        self._released = False
        self.first_pass_done = asyncio.Event()
        self._was_ready: dict[str, bool] = {}
        # Called with an upstream's name when its probe passes (the runtime lets its
        # open breaker half-open).
        self.on_probe_passed: Callable[[str], None] | None = None

    def __getitem__(self, name: str) -> UpstreamClient:
        return self.clients[name]

    async def start(self) -> None:
        for client in self.clients.values():
            client.attach(self._pools.acquire(client.name, client.config))
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

    async def probe_all(self) -> None:
        results = await asyncio.gather(*(c.probe() for c in self.clients.values()))
        for client, result in zip(self.clients.values(), results, strict=True):
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
        self.first_pass_done.set()

    async def _probe_forever(self) -> None:
        interval = min(c.config.health.interval for c in self.clients.values())
        while True:
            try:
                await self.probe_all()
            except Exception:
                # One bad pass must not end probing for good (readiness would freeze).
                log.exception("readiness_probe_failed")
            await asyncio.sleep(interval)
