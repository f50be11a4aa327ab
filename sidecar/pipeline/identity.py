"""Request identity: X-Request-ID and W3C trace context."""

from __future__ import annotations

import random
import re
from typing import Final

_SAFE_REQUEST_ID: Final = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_TRACEPARENT: Final = re.compile(r"([0-9a-f]{2})-([0-9a-f]{32})-([0-9a-f]{16})-([0-9a-f]{2})")
_ZERO_TRACE: Final = "0" * 32
_ZERO_SPAN: Final = "0" * 16


# Ids need to be unique, not secret: the module's Mersenne Twister (seeded from the
# OS, and reseeded in forked children) spares a getrandom system call per id.
def _random_hex(bits: int) -> str:
    # Never all zeros. Through bytes: half the time of a formatted int (0.23 us, 0.54).
    return (random.getrandbits(bits) or 1).to_bytes(bits // 8, "big").hex()


def new_request_id() -> str:
    return _random_hex(128)


def new_ids() -> tuple[str, str, str]:
    """A request id, a trace id and a span id for a new trace, from one draw (80 hex
    digits cut in three): the hot path makes all three for most requests."""
    digits = _random_hex(320)
    return digits[:32], digits[32:64], digits[64:]


def accept_request_id(client_value: str | None, ours: str | None = None) -> str:
    """The client's id when it is safe to log and echo, else ours (or a fresh one)."""
    if client_value is not None and _SAFE_REQUEST_ID.fullmatch(client_value):
        return client_value
    return ours or new_request_id()


def accept_traceparent(
    client_value: str | None, fresh: tuple[str, str] | None = None
) -> tuple[str, str]:
    """Return ``(traceparent, trace_id)``: the client's header when valid, else a new
    one (from ``fresh``, a trace id and a span id, when given).

    The sidecar passes a valid context through unchanged (it records no span of its
    own). A new context is marked sampled so an instrumented model server keeps it.
    """
    if client_value is not None:
        match = _TRACEPARENT.fullmatch(client_value.strip())
        if (
            match is not None
            and match.group(1) != "ff"
            and match.group(2) != _ZERO_TRACE
            and match.group(3) != _ZERO_SPAN
        ):
            return match.group(0), match.group(2)
    trace_id, span_id = fresh if fresh is not None else (_random_hex(128), _random_hex(64))
    return f"00-{trace_id}-{span_id}-01", trace_id
