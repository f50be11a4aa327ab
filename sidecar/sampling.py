"""Deterministic sampling: the same request id is always in or always out."""

from __future__ import annotations

import zlib


def sampled(request_id: str, fraction: float, salt: str = "") -> bool:
    """True for about ``fraction`` of request ids, always the same ones (reruns repeat).

    A different ``salt`` per purpose keeps, say, the payload-log sample and the
    shadow sample independent of each other.
    """
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return zlib.crc32((salt + request_id).encode()) < fraction * 0x1_0000_0000
