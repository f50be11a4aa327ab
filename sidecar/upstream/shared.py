"""State shared by replicas through Redis: the global rate limit and breaker states.

Optional (``shared_state`` in the config). The global token bucket is one atomic Lua
script per request (Redis's own clock, so replicas agree). Breaker states are kept
in pybreaker's ``CircuitRedisStorage`` and mirrored by a background task: a replica
that opens or closes its circuit publishes it; one that sees another replica's open
circuit opens its own. The hot path never waits on Redis for breakers.

If Redis cannot be reached (or answers too slowly), every replica falls back to its
local bucket and local breaker state, keeps serving, retries Redis after
``retry_after``, and says so: ``sidecar_shared_state_up`` is 0 and /health shows the
failing ``internal:redis`` check.
"""

from __future__ import annotations

import asyncio
import time

import pybreaker
import redis
import redis.asyncio as aioredis
import structlog

from sidecar.background import BackgroundTasks
from sidecar.config.schema import SharedStateSettings
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.breaker import UpstreamBreaker

log = structlog.get_logger("sidecar.upstream.shared")

_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
local data = redis.call('HMGET', KEYS[1], 'tokens', 'updated')
local tokens = tonumber(data[1])
local updated = tonumber(data[2])
if tokens == nil then
  tokens = burst
  updated = now
end
if now > updated then
  tokens = math.min(burst, tokens + (now - updated) * rate)
end
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil(burst / rate) + 60)
return {allowed, tostring(tokens)}
"""

# What an exchange with Redis may raise is not only RedisError, TimeoutError and
# OSError: a server that is not Redis (or answers in a shape the client does not
# expect) makes redis-py raise AttributeError, TypeError or ValueError, from its
# handshake or from reading the answer. Whatever an exchange raises means the shared
# state is unusable: local state takes over, never a 500 or a dead sync task.


class SharedState:
    def __init__(self, settings: SharedStateSettings, metrics: Metrics) -> None:
        self.settings = settings
        url = settings.redis_url.get_secret_value()
        # A bounded pool: redis-py's default allows 2**31 connections, so a burst of
        # requests while Redis was slow opened one connection each. Calls in progress
        # are capped at the pool's size (``_calls``), so the pool is never asked for
        # more than it has (its own "Too many connections" is only a backstop).
        pool = aioredis.ConnectionPool.from_url(
            url,
            max_connections=settings.max_connections,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
        )
        self._client = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        self._calls = 0
        self._script = self._client.register_script(_BUCKET_SCRIPT)
        self._gauge = metrics.shared_state_up
        # Not yet asked: start() checks (or take_over() knows) before anything reports it.
        self.up = True
        self.last_error: str | None = None
        self._down_until = 0.0
        self._failed_at = float("-inf")
        # Only the runtime in service reaches sidecar_shared_state_up: a reload's,
        # checking another Redis before the swap, or a retired one's stragglers, must
        # not show that Redis's state for the one in service.
        self._in_service = False

    def put_in_service(self) -> None:
        self._in_service = True
        self._publish()

    def retire(self) -> None:
        self._in_service = False

    def _publish(self) -> None:
        if self._in_service:
            self._gauge.set(1 if self.up else 0)

    def take_over(self, previous: SharedState) -> None:
        """What ``previous`` (of the runtime a reload replaces) knows of the same Redis:
        a Redis lost stays lost (and is not retried before its ``retry_after``), where a
        new SharedState said "up" until its first call found out otherwise."""
        if (
            previous.settings.redis_url.get_secret_value()
            != self.settings.redis_url.get_secret_value()
        ):
            return  # another Redis: start() checks it
        self.up, self.last_error = previous.up, previous.last_error
        self._down_until, self._failed_at = previous._down_until, previous._failed_at

    async def check(self) -> None:
        """Ask Redis once (PING) and report what it says. Within a failure's
        ``retry_after`` nothing is asked: what is known stands."""
        if not self.usable():
            self._publish()
            return
        started = time.monotonic()
        self._calls += 1
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure: local state
            self.failed(exc)
            return
        finally:
            self._calls -= 1
        self.succeeded(started)

    def usable(self) -> bool:
        return time.monotonic() >= self._down_until

    def failed(self, exc: BaseException) -> None:
        if self.up:
            log.warning(
                "shared_state_lost",
                error=type(exc).__name__,
                fallback="local rate limits and breaker state",
            )
        self.up = False
        self.last_error = f"{type(exc).__name__}: {exc}"[:200]
        self._failed_at = time.monotonic()
        self._down_until = self._failed_at + self.settings.retry_after
        self._publish()

    def succeeded(self, started: float) -> None:
        """A call that began at ``started`` worked; older news never hides a newer failure."""
        if started < self._failed_at:
            return
        if not self.up:
            log.info("shared_state_restored")
        self.up = True
        self.last_error = None
        self._publish()

    async def take_global(self, rate: float, burst: int) -> tuple[bool, float] | None:
        """One token from the shared global bucket; None means: use the local one.

        With every connection busy (``max_connections`` calls in progress) the answer
        is None at once, without waiting: this request takes the local bucket, as when
        Redis is lost. Redis is not marked lost for it (a burst is not a failure); if
        Redis is failing, the calls holding the connections time out and say so."""
        if not self.usable() or self._calls >= self.settings.max_connections:
            return None
        key = f"{self.settings.key_prefix}:ratelimit:global"
        started = time.monotonic()
        self._calls += 1
        try:
            async with asyncio.timeout(self.settings.timeout):
                allowed, tokens = await self._script(keys=[key], args=[rate, burst])
            taken = bool(int(allowed)), float(tokens)
        except Exception as exc:  # noqa: BLE001 - any failure: local state
            self.failed(exc)
            return None
        finally:
            self._calls -= 1
        self.succeeded(started)
        return taken

    async def close(self) -> None:
        await self._client.aclose()


class BreakerSync:
    """Mirrors one upstream's breaker state with the other replicas, in the background."""

    def __init__(self, breaker: UpstreamBreaker, shared: SharedState) -> None:
        self.breaker = breaker
        self.shared = shared
        settings = shared.settings
        self._redis = redis.Redis.from_url(
            settings.redis_url.get_secret_value(),
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
        )
        self._namespace = f"{settings.key_prefix}:breaker:{breaker.upstream}"
        self._storage: pybreaker.CircuitRedisStorage | None = None
        # A fresh breaker is closed, and so is a circuit nobody published yet.
        self._published = pybreaker.STATE_CLOSED
        self._lock = asyncio.Lock()
        self._tasks = BackgroundTasks()
        # Set when a reload carries the breaker on: the sync of the runtime in service
        # takes over, and this one exchanges no more.
        self._handed_over = False
        self._predecessor: BreakerSync | None = None

    @property
    def published(self) -> str:
        return self._published

    def start(self) -> None:
        self._tasks.spawn(self._run(), name=f"breaker-sync-{self.breaker.upstream}")

    def hand_over(self, successor: BreakerSync) -> None:
        """A reload carried this sync's breaker on: from now ``successor`` (the new
        runtime's, started at the swap) alone exchanges with Redis, starting from
        what this one last agreed with it, so a change not yet published is published,
        not taken for another replica's and overwritten."""
        self._handed_over = True
        successor._published = self._published
        successor._predecessor = self  # an exchange of ours in progress may change it

    async def stop(self) -> None:
        await self._tasks.stop()
        await asyncio.to_thread(self._redis.close)

    async def _run(self) -> None:
        predecessor = self._predecessor
        if predecessor is not None:
            async with predecessor._lock:  # its exchange in progress, if any, ends first
                self._published = predecessor._published
            self._predecessor = None
        while True:
            if self.shared.usable():
                await self.sync_once()
            await asyncio.sleep(self.shared.settings.sync_interval)

    async def sync_once(self) -> None:
        async with self._lock:  # one exchange at a time: the background loop or a caller
            if self._handed_over:
                return
            local = self.breaker.state
            started = time.monotonic()
            try:
                shared = await asyncio.to_thread(self._exchange, local)
            except Exception as exc:  # noqa: BLE001 - any failure: local state
                self.shared.failed(exc)
                return
            self.shared.succeeded(started)
            if shared is None:
                self._published = local  # Redis now holds our state
                return
            self._published = shared
            # Follow another replica's verdict, unless ours changed meanwhile (that
            # change is published on the next exchange).
            if shared != local and self.breaker.state == local:
                self.breaker.force_state(shared)
                self._published = self.breaker.state

    def _exchange(self, local: str) -> str | None:
        """(In a thread.) Publish a local change, else read the shared state."""
        self._redis.ping()  # pybreaker's storage hides Redis errors; this surfaces them
        if self._storage is None:
            self._storage = pybreaker.CircuitRedisStorage(
                local, self._redis, namespace=self._namespace
            )
        if local != self._published:
            self._storage.state = local
            return None
        return str(self._storage.state)
