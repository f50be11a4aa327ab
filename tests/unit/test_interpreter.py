"""The interpreter settings a serving process takes (in a child process: freezing the
test runner's own heap would change every later test)."""

from __future__ import annotations

import asyncio
import gc
import subprocess
import sys
import weakref

from sidecar.control import interpreter

CHILD = """
import gc, sys
from sidecar.control import interpreter
before = gc.get_freeze_count()
interpreter.settle()
print(
    before,
    gc.get_freeze_count() > 1000,
    gc.get_threshold() == interpreter.THRESHOLDS,
    sys.getswitchinterval() == interpreter.SWITCH_INTERVAL,
)
"""


def test_settle_freezes_the_start_up_heap_sets_thresholds_and_shortens_thread_switches() -> None:
    out = subprocess.run(
        [sys.executable, "-c", CHILD], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == ["0", "True", "True", "True"]


class Node:
    def __init__(self) -> None:
        self.other: Node | None = None


def cycle() -> weakref.ref[Node]:
    """A reference to one of two nodes that point at each other, kept by nothing else."""
    first, second = Node(), Node()
    first.other, second.other = second, first
    return weakref.ref(first)


async def freed_by_regular_collections(gone: weakref.ref[Node]) -> bool:
    """Whether ``collect_regularly`` frees what ``gone`` refers to within 2 s."""
    collector = asyncio.create_task(interpreter.collect_regularly(every=0.01))
    try:
        for _ in range(200):  # up to 2 s
            if gone() is None:
                return True
            await asyncio.sleep(0.01)
        return False
    finally:
        collector.cancel()


async def test_cyclic_garbage_is_freed_on_the_clock_without_allocations() -> None:
    # With the automatic collector off, nothing but the regular collection can free a
    # cycle: it must go within a few periods.
    gc.disable()
    try:
        assert await freed_by_regular_collections(cycle())
    finally:
        gc.enable()


async def test_cyclic_garbage_that_reached_the_old_generation_is_freed_too() -> None:
    # A cycle that lived through collections (a kept-alive connection, a retired
    # runtime) is in the oldest generation when it becomes garbage: only a full
    # collection frees it, every FULL_EVERY ticks.
    gc.disable()
    try:
        first, second = Node(), Node()
        first.other, second.other = second, first
        gone = weakref.ref(first)
        gc.collect(1)
        gc.collect(1)  # survivors of a middle collection move to the oldest generation
        del first, second
        gc.collect(1)
        assert gone() is not None  # young and middle collections cannot free it
        assert await freed_by_regular_collections(gone)
    finally:
        gc.enable()
