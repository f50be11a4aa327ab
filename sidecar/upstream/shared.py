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

A burst can find every connection to Redis busy (``max_connections`` calls in
progress) while Redis works: such a request waits its turn, briefly, and if it still
gets none the local bucket decides; the rate limiter owes Redis what it let through
then, and the next call charges it (see ``SharedStateSettings.max_connections``).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque

import pybreaker
import redis
import redis.asyncio as aioredis
import structlog

from sidecar.background import BackgroundTasks
from sidecar.config.schema import SharedStateSettings
from sidecar.telemetry.metrics import LOCAL_BUSY, LOCAL_QUEUE_FULL, LOCAL_REDIS_DOWN, Metrics
from sidecar.upstream.breaker import UpstreamBreaker

log = structlog.get_logger("sidecar.upstream.shared")

# ARGV[3]: tokens owed, spent by the local bucket while every connection was busy;
# charged before the take, the bucket may go below empty (refusing until it is paid).
_BUCKET_SCRIPT = """
local rate = tonumber(ARGV[1])
local burst = tonumber(ARGV[2])
local owed = tonumber(ARGV[3]) or 0
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
tokens = tokens - owed
local allowed = 0
if tokens >= 1 then
  tokens = tokens - 1
  allowed = 1
end
redis.call('HSET', KEYS[1], 'tokens', tostring(tokens), 'updated', tostring(now))
redis.call('EXPIRE', KEYS[1], math.ceil((burst - tokens) / rate) + 60)
return {allowed, tostring(tokens)}
"""

# What an exchange with Redis may raise is not only RedisError, TimeoutError and
# OSError: a server that is not Redis (or answers in a shape the client does not
# expect) makes redis-py raise AttributeError, TypeError or ValueError, from its
# handshake or from reading the answer. Whatever an exchange raises means the shared
# state is unusable: local state takes over, never a 500 or a dead sync task.


class _Slots:
    """Calls to Redis in progress, at most ``size``. A call that finds none free waits
    its turn, first come first served (a freed slot goes to the longest waiting, never
    to a newcomer), with at most ``max_waiting`` waiting at once."""

    def __init__(self, size: int, max_waiting: int, wait: float) -> None:
        self._free = size
        self._max_waiting = max_waiting
        self._wait = wait
        self._waiting: deque[asyncio.Future[None]] = deque()

    async def take(self) -> str | None:
        """None: a slot is ours (give it back with ``release``); else why not:
        LOCAL_QUEUE_FULL at once, or LOCAL_BUSY after ``wait`` seconds."""
        if self._free > 0:  # then nobody waits: a freed slot is handed to a waiter
            self._free -= 1
            return None
        if len(self._waiting) >= self._max_waiting:
            return LOCAL_QUEUE_FULL
        turn = asyncio.get_running_loop().create_future()
        self._waiting.append(turn)
        try:
            async with asyncio.timeout(self._wait):
                await turn
        except BaseException as exc:
            if turn.done() and not turn.cancelled():  # handed over as the wait ended
                if isinstance(exc, TimeoutError):
                    return None  # ours all the same
                self.release()
                raise
            if turn in self._waiting:
                self._waiting.remove(turn)
            if isinstance(exc, TimeoutError):
                return LOCAL_BUSY
            raise
        return None

    def release(self) -> None:
        while self._waiting:
            turn = self._waiting.popleft()
            if not turn.done():
                turn.set_result(None)
                return
        self._free += 1


class _Owed:
    """Tokens of the global bucket that the local copy let through while every
    connection to Redis was busy, not yet charged to Redis."""

    def __init__(self) -> None:
        self.tokens = 0


class _Link:
    """The request path's connections to one Redis, and the turns for them; shared by
    the runtimes a reload leaves on the same Redis with the same connection settings,
    and closed with the last of them."""

    def __init__(self, settings: SharedStateSettings) -> None:
        self.settings = _link_settings(settings)
        # A bounded pool: redis-py's default allows 2**31 connections, so a burst of
        # requests while Redis was slow opened one connection each. Calls in progress
        # are capped at the pool's size (``slots``), so the pool is never asked for
        # more than it has (its own "Too many connections" is only a backstop).
        pool = aioredis.ConnectionPool.from_url(
            settings.redis_url.get_secret_value(),
            max_connections=settings.max_connections,
            socket_timeout=settings.timeout,
            socket_connect_timeout=settings.timeout,
        )
        self.client = aioredis.Redis.from_pool(pool)  # closing the client closes the pool
        self.script = self.client.register_script(_BUCKET_SCRIPT)
        self.slots = _Slots(settings.max_connections, settings.max_waiting, settings.timeout)
        self.calls: set[asyncio.Task[tuple[bool, float] | str]] = set()  # in progress
        self.users = 1


def _link_settings(settings: SharedStateSettings) -> tuple[str, float, int, int]:
    return (
        settings.redis_url.get_secret_value(),
        settings.timeout,
        settings.max_connections,
        settings.max_waiting,
    )


class SharedState:
    def __init__(
        self,
        settings: SharedStateSettings,
        metrics: Metrics,
        previous: SharedState | None = None,
    ) -> None:
        """``previous``: the shared state of the runtime a reload replaces. With the
        same Redis URL, what it knows of Redis carries on (``take_over``); with the
        same connection settings too, so do its connections: during the reload's
        drain both runtimes' requests hold at most ``max_connections`` between them."""
        self.settings = settings
        self._closed = False
        self._link: _Link
        if (
            previous is not None
            and not previous._closed
            and previous._link.settings == _link_settings(settings)
        ):
            self._link = previous._link
            self._link.users += 1
        else:
            self._link = _Link(settings)
        self._client = self._link.client
        self._script = self._link.script
        self._slots = self._link.slots
        self._key = f"{settings.key_prefix}:ratelimit:global"
        self._owed = _Owed()
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
        if previous is not None:
            self.take_over(previous)

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
        if previous._key == self._key:  # the same bucket: whichever reaches it charges
            self._owed = previous._owed

    async def check(self) -> None:
        """Ask Redis once (PING) and report what it says. Within a failure's
        ``retry_after``, or with every connection busy, nothing is asked: what is
        known stands."""
        if await self._turn() is not None:
            self._publish()
            return
        started = time.monotonic()
        try:
            async with asyncio.timeout(self.settings.timeout):
                await self._client.ping()
        except Exception as exc:  # noqa: BLE001 - any failure: local state
            self.failed(exc)
            return
        finally:
            self._slots.release()
        self.succeeded(started)

    async def _turn(self) -> str | None:
        """None: a connection is this call's (give it back with ``_slots.release``).
        Else why not: LOCAL_REDIS_DOWN (lost, also while it waited: it is not asked
        again within ``retry_after``), LOCAL_QUEUE_FULL or LOCAL_BUSY."""
        if not self.usable():
            return LOCAL_REDIS_DOWN
        busy = await self._slots.take()
        if busy is not None:  # no connection: lost meanwhile, or only busy (then owed)
            return busy if self.usable() else LOCAL_REDIS_DOWN
        if not self.usable():  # lost while this call waited: do not wait on it again
            self._slots.release()
            return LOCAL_REDIS_DOWN
        return None

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
        # What was owed goes with Redis: an outage's traffic is not charged when it is
        # back (the fleet would refuse for owed / rate seconds as it recovers).
        self._owed.tokens = 0
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

    async def take_global(self, rate: float, burst: int) -> tuple[bool, float] | str:
        """One token from the shared global bucket: (allowed, tokens left). Or why
        Redis did not decide (LOCAL_*): the local bucket decides.

        With every connection busy (``max_connections`` calls in progress) the call
        waits its turn for up to ``timeout``; ``max_waiting`` calls wait at most, any
        more are LOCAL_QUEUE_FULL at once. Redis is not marked lost for either (a burst
        is not a failure); if Redis is failing, the calls holding the connections time
        out and say so, and the waiters then see it lost. Tokens owed (``owe``) are
        charged to the bucket first."""
        no_turn = await self._turn()
        if no_turn is not None:
            return no_turn
        # Once begun, the call runs to its end (``timeout`` at most), its slot held,
        # even if the request is cancelled (its client left): cut short, redis-py
        # drops the connection while Redis still runs the command it was sent, so the
        # slot went to a new connection beside that one, and the tokens owed the call
        # carried, charged by Redis, were owed again and charged twice.
        call = asyncio.ensure_future(self._take_global(rate, burst))
        self._link.calls.add(call)
        call.add_done_callback(self._link.calls.discard)
        return await asyncio.shield(call)

    async def _take_global(self, rate: float, burst: int) -> tuple[bool, float] | str:
        """The call itself, a slot taken: its slot is released at its end."""
        owed, self._owed.tokens = self._owed.tokens, 0  # others in progress charge none
        started = time.monotonic()
        taken: tuple[bool, float] | None = None
        try:
            async with asyncio.timeout(self.settings.timeout):
                allowed, tokens = await self._script(keys=[self._key], args=[rate, burst, owed])
            taken = bool(int(allowed)), float(tokens)
        except Exception as exc:  # noqa: BLE001 - any failure: local state
            self.failed(exc)
            return LOCAL_REDIS_DOWN
        finally:
            if taken is None and self.up:  # cut short at close: still owed
                self._owed.tokens += owed
            self._slots.release()
        self.succeeded(started)
        return taken

    def owe(self) -> None:
        """The local bucket let a request through while Redis was busy, not lost: the
        token is charged to the shared bucket with the next call, so a slow Redis
        delays when a request counts against the fleet-wide limit, not whether."""
        self._owed.tokens += 1

    async def close(self) -> None:
        if not self._closed:  # once: the connections may be another runtime's too
            self._closed = True
            self._link.users -= 1
        if self._link.users == 0:  # again if a stop cut short left them open
            # Calls whose requests were cancelled may still be in progress: they end
            # within ``timeout``, before the connections they use are closed. Waited
            # for, never cancelled (as gather would, were this stop cut short): one cut
            # short would owe again tokens Redis may have charged.
            if self._link.calls:
                await asyncio.wait(set(self._link.calls))
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
