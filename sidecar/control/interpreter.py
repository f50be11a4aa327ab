"""The interpreter, set for a proxy: a heap made at start-up, and latency that matters.

Garbage collector. Nearly everything a sidecar holds is made at start-up (modules,
compiled schemas) and lives as long as the process; what requests make lives for
milliseconds. CPython's collector scans all of it in every full collection: at 256
clients those ran about once a second and took ~45 ms each, a stall every client
saw. Frozen, the start-up heap is never scanned again (a full collection took 4-12
ms). Objects are still freed by reference counting as soon as they are unused.

Young objects are collected every 10,000 allocations, not CPython's 700: at 256
clients of a 20 ms model, a collection every 700 caught nearly every request's
objects in flight, scanned them and promoted them to be scanned again (1,547 young,
140 middle and 13 full collections in eight seconds, 650 ms of CPU: 8% of it); every
10,000, most have been freed before a collection comes (22, 1 and 1: 110 ms). The
count alone would leave cyclic garbage (an exception kept past its handler holds its
frames, and their request bodies) waiting for allocations that may not come at low
load, so ``collect_regularly`` collects the young and middle generations every
second and everything every ten, whatever the count. Garbage made of objects that
were young when it became garbage goes within a second; objects that had lived
through a collection (a kept-alive connection, the runtime a reload retired) reach
the old generation, whose automatic collections hardly ever come (CPython 3.11
waits until a quarter of the heap as it was at start-up, frozen part included, has
been promoted), and go within ten seconds. A full collection of a serving heap
takes a few milliseconds.

Thread switches. Log writes and schema-violation listings run in threads so that
they never block the event loop, but a thread holding the interpreter lock keeps
the loop waiting for up to the switch interval (5 ms by default) each time the loop
wants it back. At 0.5 ms the p99 of single requests with drift on (then parsed in a
thread) went from 2.2-3.0 ms to 1.4 ms (0.84 ms with no thread at work).
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import sys

SWITCH_INTERVAL = 0.0005  # seconds
# Young, middle, old: see gc.set_threshold.
THRESHOLDS = (10_000, 10, 10)
COLLECT_EVERY = 1.0  # seconds
FULL_EVERY = 10  # collections: one in ten takes every generation


def settle() -> None:
    """Collect what start-up left behind, freeze the rest, and set the collection
    thresholds and the switch interval. Called once the modules are loaded and
    before any config is built, so nothing a reload lets go of is frozen (frozen
    cycles are never collected)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
    sys.setswitchinterval(SWITCH_INTERVAL)


async def collect_regularly(every: float = COLLECT_EVERY) -> None:
    """Collect the young and middle generations every ``every`` seconds and all of
    them every ``FULL_EVERY`` times that, so cyclic garbage is freed in bounded time
    however few allocations come (runs until cancelled)."""
    for tick in itertools.count(1):
        await asyncio.sleep(every)
        gc.collect(2 if tick % FULL_EVERY == 0 else 1)
