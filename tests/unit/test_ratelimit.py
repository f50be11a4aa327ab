"""sidecar.pipeline.ratelimit: token buckets per principal and overall, on a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from sidecar.config.schema import RateLimitSettings, RateSettings
from sidecar.http import errors
from sidecar.pipeline.ratelimit import UNAUTHENTICATED, RateLimiter, TokenBucket
from sidecar.telemetry.metrics import Metrics
from tests.conftest import FakeClock


def rate(text: str, burst: int) -> RateSettings:
    return RateSettings.model_validate({"rate": text, "burst": burst})


class FakeShared:
    """The shared global bucket's answers: (allowed, tokens left), or why Redis did not
    decide ("busy", "queue_full", "redis_down"); the tokens the limiter owes it."""

    def __init__(self, *answers: tuple[bool, float] | str) -> None:
        self.answers = list(answers)
        self.asked: list[tuple[float, int]] = []
        self.owed = 0

    async def take_global(self, rate: float, burst: int) -> tuple[bool, float] | str:
        self.asked.append((rate, burst))
        return self.answers.pop(0)

    def owe(self) -> None:
        self.owed += 1


class Limiter:
    def __init__(
        self,
        clock: FakeClock | None = None,
        *,
        per_key: dict[str, RateSettings] | None = None,
        shared: Any = None,
        **settings: Any,
    ) -> None:
        self.clock = clock or FakeClock()
        self.metrics = Metrics()
        values: dict[str, Any] = {"enabled": True}
        values.update(settings)
        self.limiter = RateLimiter(
            RateLimitSettings.model_validate(values),
            per_key or {},
            self.metrics,
            self.clock,
            shared,
        )

    async def check(self, principal: str, label: str | None = None) -> dict[str, str]:
        fields = await self.limiter.check(principal, label or principal)
        return {name.decode(): value.decode() for _, name, value in fields}

    async def refused(self, principal: str) -> errors.RateLimited:
        with pytest.raises(errors.RateLimited) as refused:
            await self.check(principal)
        return refused.value

    def counted(self, scope: str, principal: str, mode: str = "enforced") -> float:
        value = self.metrics.registry.get_sample_value(
            "sidecar_ratelimited_total", {"scope": scope, "principal": principal, "mode": mode}
        )
        return value or 0.0

    def local(self, reason: str) -> float | None:
        """sidecar_ratelimit_local_fallback_total for ``reason``; None: no such series."""
        return self.metrics.registry.get_sample_value(
            "sidecar_ratelimit_local_fallback_total", {"reason": reason}
        )


# the bucket


def test_a_bucket_starts_full_and_each_take_costs_one_token() -> None:
    bucket = TokenBucket.full(rate("1/s", 2), now=0.0)
    assert bucket.headers() == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "2",
        "RateLimit-Reset": "0",
    }
    assert bucket.take(0.0)
    assert bucket.take(0.0)
    assert not bucket.take(0.0)
    assert bucket.headers() == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "2",
    }


def test_a_bucket_refills_at_its_rate_up_to_its_burst() -> None:
    bucket = TokenBucket.full(rate("2/s", 3), now=10.0)
    for _ in range(3):
        assert bucket.take(10.0)
    assert not bucket.take(10.25)  # half a token back
    assert bucket.tokens == 0.5
    assert bucket.take(10.5)  # exactly one token
    assert bucket.tokens == 0.0
    assert bucket.seconds_until_token() == 0.5
    assert bucket.headers()["RateLimit-Reset"] == "2"  # 1.5 s to refill three tokens
    assert bucket.take(100.0)
    assert bucket.tokens == 2.0  # refilled to the burst, not beyond


def test_a_clock_going_back_neither_adds_nor_removes_tokens() -> None:
    bucket = TokenBucket.full(rate("1/s", 2), now=10.0)
    assert bucket.take(10.0)
    assert bucket.take(9.0)
    assert (bucket.tokens, bucket.updated) == (0.0, 10.0)
    assert not bucket.take(10.5)
    assert bucket.take(11.0)


def test_a_token_given_back_never_overfills_the_bucket() -> None:
    bucket = TokenBucket.full(rate("1/s", 2), now=0.0)
    bucket.give_back()
    assert bucket.tokens == 2.0
    assert bucket.take(0.0)
    bucket.give_back()
    assert bucket.tokens == 2.0


def test_a_bucket_with_tokens_needs_no_wait_and_shows_whole_tokens() -> None:
    bucket = TokenBucket(rate=4.0, burst=5, tokens=2.75, updated=0.0)
    assert bucket.seconds_until_token() == 0.0
    assert bucket.headers() == {
        "RateLimit-Limit": "5",
        "RateLimit-Remaining": "2",
        "RateLimit-Reset": "1",  # 2.25 tokens at 4/s: 0.5625 s, rounded up
    }
    empty = TokenBucket(rate=0.5, burst=1, tokens=0.25, updated=0.0)
    assert empty.seconds_until_token() == 1.5
    assert empty.headers()["RateLimit-Reset"] == "2"


# the limiter


async def test_without_limits_every_request_passes_without_headers() -> None:
    lim = Limiter()
    for _ in range(5):
        assert await lim.check("alice") == {}


async def test_each_principal_has_its_own_bucket() -> None:
    lim = Limiter(per_principal={"rate": "1/s", "burst": 2})
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "1"
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "0"
    refused = await lim.refused("alice")
    assert refused.status == 429
    assert str(refused) == "rate limit reached (principal)"
    assert refused.headers == {
        "RateLimit-Limit": "2",
        "RateLimit-Remaining": "0",
        "RateLimit-Reset": "2",
        "Retry-After": "1",
    }
    assert lim.counted("principal", "alice") == 1.0
    assert (await lim.check("bob"))["RateLimit-Remaining"] == "1"
    lim.clock.advance(1.0)
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "0"


async def test_retry_after_is_the_whole_seconds_until_a_token_is_back() -> None:
    lim = Limiter(per_principal={"rate": "1/m", "burst": 1})
    await lim.check("alice")
    lim.clock.advance(15.0)
    refused = await lim.refused("alice")
    assert refused.headers["Retry-After"] == "45"


async def test_a_keys_own_limit_overrides_the_per_principal_one() -> None:
    lim = Limiter(per_key={"batch": rate("1/s", 5)}, per_principal={"rate": "1/s", "burst": 1})
    assert (await lim.check("batch"))["RateLimit-Limit"] == "5"
    assert (await lim.check("alice"))["RateLimit-Limit"] == "1"
    assert (await Limiter(per_key={"batch": rate("1/s", 5)}).check("alice")) == {}


async def test_the_global_limit_refuses_everyone_once_spent() -> None:
    lim = Limiter(**{"global": {"rate": "1/s", "burst": 2}})
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "1"
    assert (await lim.check("bob"))["RateLimit-Remaining"] == "0"
    refused = await lim.refused("carol")
    assert str(refused) == "rate limit reached (global)"
    assert refused.headers["Retry-After"] == "1"
    assert lim.counted("global", "carol") == 1.0
    assert lim.counted("principal", "carol") == 0.0


async def test_a_request_refused_overall_does_not_spend_the_principals_token() -> None:
    lim = Limiter(
        per_principal={"rate": "1/s", "burst": 2}, **{"global": {"rate": "1/s", "burst": 1}}
    )
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "1"  # the principal's headers
    refused = await lim.refused("bob")
    assert refused.headers["RateLimit-Remaining"] == "2"
    assert str(refused) == "rate limit reached (global)"
    lim.clock.advance(1.0)
    assert (await lim.check("bob"))["RateLimit-Remaining"] == "1"


async def test_a_principal_over_its_own_limit_does_not_spend_a_global_token() -> None:
    lim = Limiter(
        per_principal={"rate": "1/s", "burst": 1}, **{"global": {"rate": "1/s", "burst": 2}}
    )
    await lim.check("alice")
    await lim.refused("alice")
    await lim.check("bob")  # the global bucket still had this token


async def test_report_only_counts_would_be_refusals_and_refuses_nothing() -> None:
    lim = Limiter(report_only=True, per_principal={"rate": "1/s", "burst": 1})
    assert await lim.check("alice", "key-a") == {}
    assert await lim.check("alice", "key-a") == {}
    assert lim.counted("principal", "key-a", "report_only") == 1.0
    assert lim.counted("principal", "key-a", "enforced") == 0.0
    overall = Limiter(report_only=True, **{"global": {"rate": "1/s", "burst": 1}})
    await overall.check("a")
    await overall.check("b")
    assert overall.counted("global", "b", "report_only") == 1.0


async def test_the_metric_names_the_principal_by_its_label() -> None:
    lim = Limiter(per_principal={"rate": "1/s", "burst": 1})
    await lim.limiter.check("subject-123", "jwt")
    with pytest.raises(errors.RateLimited):
        await lim.limiter.check("subject-123", "jwt")
    assert lim.counted("principal", "jwt") == 1.0


async def test_the_least_recently_seen_principal_is_forgotten_beyond_the_bound() -> None:
    lim = Limiter(max_principals=2, per_principal={"rate": "1/h", "burst": 1})
    await lim.check("alice")
    await lim.check("bob")
    await lim.refused("alice")  # alice is remembered, and now the most recent
    await lim.check("carol")  # bob is forgotten
    await lim.refused("alice")
    await lim.refused("carol")
    assert (await lim.check("bob"))["RateLimit-Remaining"] == "0"  # a fresh bucket


async def test_failed_authentication_shares_one_bucket_of_the_per_principal_size() -> None:
    lim = Limiter(per_key={"alice": rate("1/s", 9)}, per_principal={"rate": "1/s", "burst": 2})
    await lim.limiter.check_failed_auth()
    await lim.limiter.check_failed_auth()
    with pytest.raises(errors.RateLimited) as refused:
        await lim.limiter.check_failed_auth()
    assert refused.value.headers["RateLimit-Limit"] == "2"
    assert lim.counted("principal", UNAUTHENTICATED) == 1.0


async def test_a_key_named_unauthenticated_keeps_its_bucket_from_failed_attempts() -> None:
    # Failed attempts took their tokens from the bucket named "unauthenticated",
    # which is also the bucket of an API key of that name (a valid key name): a
    # flood of bad keys from anyone left that key's client with 429s.
    lim = Limiter(per_principal={"rate": "1/s", "burst": 2})
    for _ in range(2):
        await lim.limiter.check_failed_auth()
    assert (await lim.check("unauthenticated"))["RateLimit-Remaining"] == "1"


async def test_the_shared_global_bucket_decides_and_its_tokens_are_shown() -> None:
    shared = FakeShared((True, 4.0), (False, 0.25))
    lim = Limiter(shared=shared, **{"global": {"rate": "2/s", "burst": 5}})
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "4"
    refused = await lim.refused("alice")
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["Retry-After"] == "1"
    assert shared.asked == [(2.0, 5), (2.0, 5)]


async def test_without_redis_the_local_global_bucket_decides() -> None:
    shared = FakeShared("redis_down", "redis_down", "redis_down")
    lim = Limiter(shared=shared, **{"global": {"rate": "1/s", "burst": 2}})
    assert (await lim.check("a"))["RateLimit-Remaining"] == "1"
    assert (await lim.check("a"))["RateLimit-Remaining"] == "0"
    await lim.refused("a")
    assert len(shared.asked) == 3
    assert shared.owed == 0  # Redis lost: each replica keeps the limit to itself
    assert lim.local("redis_down") == 3


async def test_while_redis_is_busy_the_local_copy_decides_and_owes_what_it_let_through() -> None:
    """Every connection busy (after the wait, or with the waiting line full): the
    local copy of Redis's last answer decides, counted by reason, and each token it
    lets through is owed to the shared bucket; a refusal owes nothing."""
    shared = FakeShared((True, 2.0), "busy", "queue_full", "busy")
    lim = Limiter(shared=shared, **{"global": {"rate": "1/h", "burst": 5}})
    assert (await lim.check("a"))["RateLimit-Remaining"] == "2"  # Redis's answer
    assert (await lim.check("a"))["RateLimit-Remaining"] == "1"  # its copy, locally
    assert (await lim.check("a"))["RateLimit-Remaining"] == "0"
    await lim.refused("a")
    assert shared.owed == 2
    assert (lim.local("busy"), lim.local("queue_full"), lim.local("redis_down")) == (2, 1, 0)


def test_the_refill_counts_the_time_since_the_last_take_on_any_clock_reading() -> None:
    bucket = TokenBucket.full(rate("1/s", 5), now=3.0)
    for _ in range(5):
        assert bucket.take(3.0)
    assert bucket.take(7.0)  # four tokens back, one taken
    assert bucket.tokens == 3.0


async def test_a_global_refusal_gives_back_exactly_the_one_token_it_took() -> None:
    lim = Limiter(
        per_principal={"rate": "1/h", "burst": 3}, **{"global": {"rate": "1/h", "burst": 1}}
    )
    assert (await lim.check("alice"))["RateLimit-Remaining"] == "2"
    refused = await lim.refused("alice")
    assert refused.headers["RateLimit-Remaining"] == "2"


SPENT_SETTINGS: dict[str, Any] = {
    "per_principal": {"rate": "1/h", "burst": 1},
    "global": {"rate": "1/h", "burst": 2},
}


async def spent_limiter(clock: FakeClock) -> Limiter:
    """alice's bucket and the batch key's spent, the global one at one of two."""
    before = Limiter(clock, per_key={"batch": rate("1/h", 1)}, **SPENT_SETTINGS)
    await before.check("alice")
    await before.check("batch")
    return before


async def test_a_reload_with_the_same_limits_keeps_the_buckets_as_they_are() -> None:
    """Fresh full buckets at every reload handed every client its whole burst again."""
    clock = FakeClock()
    before = await spent_limiter(clock)
    settings = SPENT_SETTINGS
    same = Limiter(clock, per_key={"batch": rate("1/h", 1)}, **settings)
    same.limiter.take_over(before.limiter)
    await same.refused("alice")  # alice's bucket is still spent
    refused = await same.refused("carol")  # and so is the global one
    assert str(refused) == "rate limit reached (global)"


async def test_a_reload_that_changes_the_limits_starts_with_full_buckets() -> None:
    clock = FakeClock()
    before = await spent_limiter(clock)
    settings = SPENT_SETTINGS
    other_key = Limiter(clock, per_key={"batch": rate("1/h", 2)}, **settings)
    other_key.limiter.take_over(before.limiter)
    assert (await other_key.check("alice"))["RateLimit-Remaining"] == "0"  # a fresh bucket
    other_limits = Limiter(
        clock,
        per_key={"batch": rate("1/h", 1)},
        per_principal={"rate": "1/h", "burst": 1},
        **{"global": {"rate": "1/h", "burst": 3}},
    )
    other_limits.limiter.take_over(before.limiter)
    assert (await other_limits.check("alice"))["RateLimit-Remaining"] == "0"
    assert (await other_limits.check("bob"))["RateLimit-Remaining"] == "0"


async def test_a_shared_bucket_below_empty_shows_none_remaining() -> None:
    """Tokens the replicas owed are charged to the shared bucket first, so Redis may
    answer with fewer than none left: RateLimit-Remaining says 0, never a negative."""
    shared = FakeShared((False, -1.5))
    lim = Limiter(shared=shared, **{"global": {"rate": "1/s", "burst": 5}})
    refused = await lim.refused("alice")
    assert refused.headers["RateLimit-Remaining"] == "0"
    assert refused.headers["Retry-After"] == "3"  # 2.5 tokens to wait for, at 1/s


async def test_only_a_shared_global_bucket_has_local_fallback_series() -> None:
    """sidecar_ratelimit_local_fallback_total is there (at 0 for every reason) when a
    global limit is shared, and absent when nothing can fall back to a local bucket."""
    shared = Limiter(shared=FakeShared(), **{"global": {"rate": "1/s", "burst": 1}})
    assert [shared.local(r) for r in ("busy", "queue_full", "redis_down")] == [0, 0, 0]
    local_only = Limiter(**{"global": {"rate": "1/s", "burst": 1}})
    no_global = Limiter(shared=FakeShared(), per_principal={"rate": "1/s", "burst": 1})
    for lim in (local_only, no_global):
        assert [lim.local(r) for r in ("busy", "queue_full", "redis_down")] == [None] * 3
