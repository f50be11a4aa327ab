"""The requests a runtime has in flight, and waiting for none to be left."""

from __future__ import annotations

import asyncio

import pytest

from sidecar.pipeline.stages import InFlight


async def test_none_left_returns_at_once_without_requests() -> None:
    await asyncio.wait_for(InFlight().none_left(), 1)


async def test_every_waiter_wakes_when_the_last_request_leaves() -> None:
    requests = InFlight()
    requests.count = 2
    first = asyncio.create_task(requests.none_left())
    second = asyncio.create_task(requests.none_left())
    with pytest.raises(TimeoutError):  # one that gives up takes no one else with it
        await asyncio.wait_for(requests.none_left(), 0.01)
    requests.leave()
    await asyncio.sleep(0)
    assert not first.done()
    assert not second.done()
    requests.leave()
    await asyncio.wait_for(asyncio.gather(first, second), 1)
    assert requests.count == 0
