"""Token-bucket rate limits per principal and overall, with the IETF RateLimit headers.

Each bucket holds up to ``burst`` tokens and refills at ``rate`` per second; a request
takes one. Refused requests get 429 rate_limited with ``Retry-After`` (seconds until
a token is back). Every answer on a limited route carries ``RateLimit-Limit`` (the
burst), ``RateLimit-Remaining`` and ``RateLimit-Reset`` (seconds until the bucket is
full again). In report-only mode nothing is refused: would-be refusals are only
counted in ``sidecar_ratelimited_total``. The clock is injectable for tests.

With shared state, Redis holds the global bucket and the local one is its copy (for
the headers) and fallback. Each request the fallback decides is counted, by reason, in
``sidecar_ratelimit_local_fallback_total``; what it lets through while Redis is only
busy is owed, and charged to Redis with the next call.
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Final

from sidecar.config.schema import RateLimitSettings, RateSettings
from sidecar.http import errors
from sidecar.http.messages import RawField
from sidecar.telemetry.metrics import LOCAL_REASONS, LOCAL_REDIS_DOWN, Metrics

if TYPE_CHECKING:
    from sidecar.upstream.shared import SharedState


@dataclass(slots=True)
class TokenBucket:
    rate: float
    burst: int
    tokens: float
    updated: float

    @classmethod
    def full(cls, settings: RateSettings, now: float) -> TokenBucket:
        return cls(settings.rate, settings.burst, float(settings.burst), now)

    def _refill(self, now: float) -> None:
        if now > self.updated:
            self.tokens = min(self.burst, self.tokens + (now - self.updated) * self.rate)
            self.updated = now

    def take(self, now: float) -> bool:
        self._refill(now)
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return True
        return False

    def give_back(self) -> None:
        self.tokens = min(self.burst, self.tokens + 1.0)

    def seconds_until_token(self) -> float:
        return max(0.0, (1.0 - self.tokens) / self.rate)

    def fields(self) -> tuple[RawField, ...]:
        """The RateLimit fields as they go on the wire: rendered once, here, rather
        than as strings re-encoded into the answer."""
        return (
            (b"ratelimit-limit", b"RateLimit-Limit", b"%d" % self.burst),
            (b"ratelimit-remaining", b"RateLimit-Remaining", b"%d" % max(0, int(self.tokens))),
            (
                b"ratelimit-reset",
                b"RateLimit-Reset",
                b"%d" % math.ceil((self.burst - self.tokens) / self.rate),
            ),
        )

    def headers(self) -> dict[str, str]:
        return {name.decode(): value.decode() for _, name, value in self.fields()}


# The bucket of requests whose credentials failed: no key's own limit applies. Its
# name in metrics, and its key in the table: one no principal can have (a key's name
# starts with a letter or digit, a token's subject with "jwt:"), so an API key named
# "unauthenticated" keeps a bucket of its own.
UNAUTHENTICATED: Final = "unauthenticated"
_FAILED_AUTH_BUCKET: Final = "(unauthenticated)"


class RateLimiter:
    def __init__(
        self,
        settings: RateLimitSettings,
        per_key: dict[str, RateSettings],
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
        shared: SharedState | None = None,
    ) -> None:
        self._settings = settings
        # The global bucket lives in Redis when shared; the local one is the fallback.
        self._shared = shared
        self._per_key = per_key  # a key's own limit overrides per_principal
        self._clock = clock
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()
        self._global = (
            TokenBucket.full(settings.global_limit, clock()) if settings.global_limit else None
        )
        self._limited = metrics.ratelimited
        # Every reason's series from the start (at 0), so a rate() over it has a base.
        self._local_fallback = (
            {reason: metrics.ratelimit_local_fallback.labels(reason) for reason in LOCAL_REASONS}
            if shared is not None and self._global is not None
            else {}
        )

    def take_over(self, previous: RateLimiter) -> None:
        """A reload: with the same limits, keep the buckets as they are (shared with
        the retired limiter, which finishes its requests on them); fresh full buckets
        at every reload handed every client its whole burst again."""
        if previous._settings == self._settings and previous._per_key == self._per_key:
            self._buckets = previous._buckets
            self._global = previous._global

    async def _take_global(self) -> bool:
        bucket, shared = self._global, self._shared
        assert bucket is not None
        assert shared is not None
        taken = await shared.take_global(bucket.rate, bucket.burst)
        now = self._clock()  # the call may have waited
        if not isinstance(taken, str):
            allowed, tokens = taken
            bucket.tokens, bucket.updated = tokens, now  # for the headers
            return allowed
        self._local_fallback[taken].inc()
        if not bucket.take(now):
            return False
        if taken != LOCAL_REDIS_DOWN:
            shared.owe()  # Redis is only busy: the token is the fleet's, charged later
        return True

    def _bucket(self, principal: str, now: float) -> TokenBucket | None:
        bucket = self._buckets.get(principal)
        if bucket is not None:
            self._buckets.move_to_end(principal)
            return bucket
        limit = self._per_key.get(principal, self._settings.per_principal)
        if limit is None:
            return None
        bucket = TokenBucket.full(limit, now)
        self._buckets[principal] = bucket
        if len(self._buckets) > self._settings.max_principals:
            self._buckets.popitem(last=False)  # bounded: the least recently seen goes
        return bucket

    async def check_failed_auth(self) -> None:
        """A request that failed authentication still costs a token: of the global
        bucket, and of one shared by everyone unauthenticated (per_principal's size),
        so a flood of bad keys is answered 429 instead of checked forever."""
        await self.check(_FAILED_AUTH_BUCKET, UNAUTHENTICATED)

    async def check(self, principal: str, label: str) -> tuple[RawField, ...]:
        """Take a token for ``principal``; the header fields to send, or RateLimited (429).

        ``label`` names the principal in metrics: a key's name, or just "jwt" for
        token subjects, which are unbounded.
        """
        now = self._clock()
        bucket = self._bucket(principal, now)
        scope: str | None = None
        if bucket is not None and not bucket.take(now):
            scope = "principal"
        elif self._global is not None and not (
            self._global.take(now) if self._shared is None else await self._take_global()
        ):
            scope = "global"
            if bucket is not None:
                bucket.give_back()  # refused overall: this principal's token is not spent
        if self._settings.report_only:
            if scope is not None:
                self._limited.labels(scope, label, "report_only").inc()
            return ()
        shown = bucket if bucket is not None else self._global
        if scope is None:
            return shown.fields() if shown is not None else ()
        headers = shown.headers() if shown is not None else {}
        self._limited.labels(scope, label, "enforced").inc()
        refused = bucket if scope == "principal" else self._global
        assert refused is not None
        headers["Retry-After"] = str(max(1, math.ceil(refused.seconds_until_token())))
        raise errors.RateLimited(f"rate limit reached ({scope})", headers=headers)
