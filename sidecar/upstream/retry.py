"""Retry decisions: jittered backoff, Retry-After, and a budget against retry storms."""

from __future__ import annotations

import random
import time
from email.utils import parsedate_to_datetime

from sidecar.config.schema import RetryBudgetSettings, RetryPolicy


def backoff_delay(policy: RetryPolicy, retry_number: int, rng: random.Random) -> float:
    """Full jitter (AWS architecture blog): uniform in [0, min(max, base * 2^(n-1))]."""
    ceiling = min(policy.backoff_max, policy.backoff_base * (2 ** (retry_number - 1)))
    return rng.uniform(0.0, ceiling)


def parse_retry_after(value: str | None, *, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header (delta-seconds or an HTTP date)."""
    if not value:
        return None
    value = value.strip()
    # ASCII digits only: "²" (a latin-1 byte a model may send) is a digit to isdigit()
    # but not to float().
    if value.isascii() and value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    current = time.time() if now is None else now
    return max(0.0, when.timestamp() - current)


class RetryBudget:
    """Caps retries in flight at a share of the requests in flight (Envoy's retry budget).

    In a full outage every request fails, but only ``ratio`` of the active requests
    (at least ``min_retries``) may be retrying at once, so the upstream sees at most
    about ``1 + ratio`` times the client's requests instead of ``attempts`` times.
    """

    def __init__(self, settings: RetryBudgetSettings) -> None:
        self.ratio = settings.ratio
        self.min_retries = settings.min_retries
        self.active_requests = 0
        self.active_retries = 0

    def try_acquire(self) -> bool:
        allowed = max(self.min_retries, self.ratio * self.active_requests)
        if self.active_retries + 1 > allowed:
            return False
        self.active_retries += 1
        return True

    def release(self) -> None:
        self.active_retries -= 1
