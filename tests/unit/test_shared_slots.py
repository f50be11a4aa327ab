"""sidecar.upstream.shared: the capped calls to Redis, and the turns of those waiting."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest

pytest.importorskip("redis")

from sidecar.config.schema import SharedStateSettings
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.shared import SharedState, _Slots


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


async def test_a_waiter_handed_a_slot_as_its_client_leaves_passes_it_on() -> None:
    """Handed the slot, then cancelled before it ran again: it must give the slot to
    the next in line, or the slot is lost for good."""
    slots = _Slots(1, max_waiting=5, wait=10.0)
    assert await slots.take() is None
    leaving = asyncio.ensure_future(slots.take())
    staying = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    slots.release()  # handed to ``leaving`` ...
    leaving.cancel()  # ... whose client goes before it resumes
    with pytest.raises(asyncio.CancelledError):
        await leaving
    assert await asyncio.wait_for(staying, 1) is None


async def test_a_slot_handed_over_as_the_wait_ends_is_kept_not_lost() -> None:
    """Handed the slot just before its wait ended, and run again only after (a busy
    loop): the slot is its own, not "busy" with the slot left handed to nobody."""
    slots = _Slots(1, max_waiting=5, wait=0.05)
    assert await slots.take() is None
    waiting = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)  # it waits, for 0.05 s from now
    asyncio.get_running_loop().call_later(0.01, slots.release)  # handed over first ...
    time.sleep(0.1)  # noqa: ASYNC251 - a busy loop: the wait ends before it runs again
    assert await waiting is None
    assert await slots.take() == "busy"  # one slot, held
    slots.release()
    assert await slots.take() is None


@contextlib.asynccontextmanager
async def silent_redis() -> AsyncIterator[tuple[str, list[asyncio.StreamWriter]]]:
    """A Redis gone silent: a server that takes connections, then reads nothing and
    answers nothing. Its URL and the connections it took, closed on the way out."""
    connections: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        connections.append(writer)

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"redis://127.0.0.1:{port}/0", connections
    finally:
        for writer in connections:
            writer.close()
        server.close()
        await server.wait_closed()


async def test_a_check_that_waited_its_turn_while_redis_was_lost_does_not_ask_it() -> None:
    """A reload's first check (PING) waited for the one connection, held by a call to
    a Redis that went silent. That call timed out and marked Redis lost; the check,
    given its turn, asked the lost Redis all the same (within ``retry_after``), and
    its own timeout held the reload back once more and pushed the retry further out."""
    async with silent_redis() as (redis_url, connections):
        settings = SharedStateSettings.model_validate(
            {
                "redis_url": redis_url,
                "timeout": "200ms",
                "retry_after": "60s",
                "max_connections": 1,
            }
        )
        shared = SharedState(settings, Metrics())
        try:
            holding = asyncio.ensure_future(shared.take_global(1.0, 1))
            await asyncio.sleep(0.05)  # its call holds the connection
            checked = asyncio.ensure_future(shared.check())
            assert await asyncio.wait_for(holding, 1) == "redis_down"
            await asyncio.wait_for(checked, 1)
            assert not shared.up
            assert len(connections) == 1, "the check asked a Redis known to be lost"
        finally:
            await shared.close()


async def test_a_stop_cut_short_leaves_the_calls_in_progress_to_end() -> None:
    """Closing waits for the calls in progress; a close that was itself cancelled (a
    stop cut short) cancelled them too, and a call cut short owes again the tokens it
    carried, which Redis may already have charged."""
    async with silent_redis() as (redis_url, _):
        settings = SharedStateSettings.model_validate(
            {"redis_url": redis_url, "timeout": "300ms", "max_connections": 1}
        )
        shared = SharedState(settings, Metrics())
        try:
            call = asyncio.ensure_future(shared.take_global(1.0, 1))
            await asyncio.sleep(0.05)  # its call is in progress
            closing = asyncio.ensure_future(shared.close())
            await asyncio.sleep(0.05)
            closing.cancel()
            # The call ends as it would have: Redis did not answer within its timeout.
            assert await asyncio.wait_for(call, 1) == "redis_down"
        finally:
            await shared.close()
