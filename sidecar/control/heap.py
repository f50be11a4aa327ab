"""The garbage collector, set for a proxy's heap.

Nearly everything a sidecar holds is made at start-up (modules, the config, compiled
schemas) and lives as long as the process; what requests make lives for
milliseconds. CPython's collector scans all of it in every full collection: at 256
clients those ran about once a second and took ~45 ms each, a stall every client
saw. Frozen, the start-up heap is never scanned again (a full collection took ~4 ms);
young objects are collected every 7,000 allocations rather than 700, so fewer
requests in flight are promoted to older generations only to be scanned there.
Objects are still freed by reference counting as soon as they are unused.
"""

from __future__ import annotations

import gc

# Young, middle, old: see gc.set_threshold.
THRESHOLDS = (7000, 20, 10)


def settle() -> None:
    """Collect what start-up left behind, freeze the rest, and set the thresholds.
    Called once the modules are loaded and before any config is built, so nothing a
    reload lets go of is frozen (frozen cycles are never collected)."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*THRESHOLDS)
