"""Request deadlines share one timer per 10 ms: each fires on time, never early, and
nothing is kept once its request is answered."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import weakref

import pytest

from sidecar.http.client import Deadlines


async def test_a_deadline_fails_its_waiter_at_the_end_of_its_slot_never_early() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    waiter: asyncio.Future[None] = loop.create_future()
    due = loop.time() + 0.05
    slot = deadlines.add(due, waiter)
    # Its timer is set for the end of the 10 ms slot the deadline falls in.
    assert 0 <= slot * Deadlines.RESOLUTION - due < Deadlines.RESOLUTION
    with pytest.raises(TimeoutError):
        await waiter
    assert loop.time() >= due  # never early
    assert deadlines._slots == {}


async def test_an_answered_waiter_is_let_go_and_its_neighbours_still_expire() -> None:
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    answered: asyncio.Future[str] = loop.create_future()
    late: asyncio.Future[str] = loop.create_future()
    due = loop.time() + 0.02
    slot = deadlines.add(due, answered)
    assert deadlines.add(due, late) == slot  # one slot, one timer
    answered.set_result("answer")
    deadlines.discard(slot, answered)
    assert deadlines._slots[slot] == {late}
    with pytest.raises(TimeoutError):
        await late
    assert answered.result() == "answer"
    assert deadlines._slots == {}


class _Held:
    """Stands for what a request's log binding holds (its body, its parsed JSON)."""


_REQUEST: contextvars.ContextVar[_Held | None] = contextvars.ContextVar("request", default=None)


async def test_a_deadline_keeps_nothing_of_the_request_that_set_it() -> None:
    # The slot's timer was made in the context of the request that opened the slot,
    # and kept it (the request and its body) until it fired, a route's whole timeout
    # after the answer: 40 answered requests of 8 MiB held 385 MB for 30 s.
    loop = asyncio.get_running_loop()
    deadlines = Deadlines(loop)
    waiter: asyncio.Future[None] = loop.create_future()

    def request() -> tuple[int, weakref.ref[_Held]]:
        held = _Held()
        _REQUEST.set(held)
        return deadlines.add(loop.time() + 60, waiter), weakref.ref(held)

    slot, held = contextvars.copy_context().run(request)
    waiter.set_result(None)
    deadlines.discard(slot, waiter)
    gc.collect()
    assert held() is None
