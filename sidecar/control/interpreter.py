"""The interpreter, set for a proxy: a heap made at start-up, and latency that matters.

Garbage collector. Nearly everything a sidecar holds is made at start-up (modules,
compiled schemas) and lives as long as the process; what requests make lives for
milliseconds. CPython's collector scans all of it in every full collection: at 256
clients those ran about once a second and took ~45 ms each, a stall every client
saw. Frozen, the start-up heap is never scanned again (a full collection took 4-12
ms). Objects are still freed by reference counting as soon as they are unused. The
collection thresholds stay CPython's: collecting young objects less often saved a
few per cent of CPU, but cyclic garbage (an exception kept past its handler holds its
frames, and their request bodies) would then wait ten times longer to be freed.

Thread switches. Drift parsing, log writing and schema-violation listings run in
threads so that they never block the event loop, but a thread holding the
interpreter lock keeps the loop waiting for up to the switch interval (5 ms by
default) each time the loop wants it back. At 0.5 ms the p99 of single requests
with drift on went from 2.2-3.0 ms to 1.4 ms (0.84 ms with no thread at work).
"""

from __future__ import annotations

import gc
import sys

SWITCH_INTERVAL = 0.0005  # seconds


def settle() -> None:
    """Collect what start-up left behind, freeze the rest, and set the switch
    interval. Called once the modules are loaded and before any config is
    built, so nothing a reload lets go of is frozen (frozen cycles are never
    collected)."""
    gc.collect()
    gc.freeze()
    sys.setswitchinterval(SWITCH_INTERVAL)
