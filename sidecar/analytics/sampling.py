"""Sampling on the sidecar's own randomness.

A client chooses its request id, so a sample drawn from the id would let a client
decide whether its request is mirrored to a shadow model or written to the payload
log. The draw is the sidecar's own (the random module, reseeded in every worker).
"""

from __future__ import annotations

import random


def sampled(fraction: float) -> bool:
    """True for about ``fraction`` of calls."""
    if fraction <= 0.0:
        return False
    if fraction >= 1.0:
        return True
    return random.random() < fraction  # noqa: S311 - a sample, not a secret
