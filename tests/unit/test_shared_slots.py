"""sidecar.upstream.shared: the capped calls to Redis, and the turns of those waiting."""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("redis")

from sidecar.upstream.shared import _Slots


async def test_a_freed_slot_goes_to_the_longest_waiting_never_to_a_newcomer() -> None:
    slots = _Slots(1, max_waiting=10, wait=10.0)
    assert await slots.take() is None
    served: list[int] = []

    async def waiter(number: int) -> None:
        assert await slots.take() is None
        served.append(number)

    waiters = [asyncio.ensure_future(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)  # all three wait, in this order
    slots.release()  # handed to waiter 0 ...
    newcomer = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    assert not newcomer.done()  # ... which a newcomer cannot take first: it queues
    for _ in range(3):
        await asyncio.sleep(0)
        slots.release()
    await asyncio.gather(*waiters)
    assert served == [0, 1, 2]
    assert await newcomer is None


async def test_waiting_is_bounded_in_number_and_in_time() -> None:
    slots = _Slots(1, max_waiting=1, wait=0.05)
    assert await slots.take() is None
    waiting = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    assert await slots.take() == "queue_full"  # one waits already: no second
    assert await waiting == "busy"  # none freed within the wait
    slots.release()
    assert await slots.take() is None  # the slot went back, not to the one gone


async def test_a_waiter_that_leaves_gives_up_its_place_and_no_slot_is_lost() -> None:
    slots = _Slots(1, max_waiting=5, wait=0.5)
    assert await slots.take() is None
    leaving = asyncio.ensure_future(slots.take())
    staying = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    leaving.cancel()  # its client went away
    await asyncio.sleep(0)
    slots.release()
    assert await asyncio.wait_for(staying, 1) is None
    slots.release()
    assert await slots.take() is None  # one slot, back
    assert await slots.take() == "busy", "a second slot appeared"
