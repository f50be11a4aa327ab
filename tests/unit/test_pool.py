"""The upstream pool's connections, driven without sockets: what a connection
handed back to the pool must be able to do next."""

from __future__ import annotations

import asyncio
from typing import Any

from sidecar.http.client import Pool, UpstreamConnection

READ_AHEAD_PLUS = 300_000  # body bytes: past the client's 256 KiB read-ahead


class PausableTransport:
    """What a connection uses of a transport; records writes and whether reading is
    paused (a paused transport delivers nothing)."""

    def __init__(self) -> None:
        self.paused = False
        self.closing = False
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)

    def writelines(self, parts: Any) -> None:
        self.write(b"".join(parts))

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    abort = close

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_a_connection_paused_by_a_large_answer_reads_again_when_reused() -> None:
    """An answer whose bytes past the read-ahead came before anyone read them paused
    its connection, and it ended in that same read: the pool kept the connection
    paused, and the next request on it waited for an answer it would never read."""
    loop = asyncio.get_running_loop()
    pool = Pool("127.0.0.1", 9, max_connections=1)
    conn = UpstreamConnection(pool)
    transport = PausableTransport()
    conn.connection_made(transport)  # type: ignore[arg-type]
    pool.open = 1
    conn.idle_since = loop.time()
    pool._idle.append(conn)

    first = asyncio.ensure_future(
        pool.request("GET", "/a", [], None, replayable=True, deadline=loop.time() + 5)
    )
    await asyncio.sleep(0)  # the request is written
    whole = answer(b"a" * READ_AHEAD_PLUS)
    conn.data_received(whole[:100_000])  # two reads before the caller runs
    conn.data_received(whole[100_000:])
    assert transport.paused  # read ahead past the limit, nobody reading yet
    response = await first
    assert await response.read() == b"a" * READ_AHEAD_PLUS
    response.release()
    assert pool.idle_count == 1
    assert not transport.paused  # kept, and reading: it sees EOF or stray bytes

    second = asyncio.ensure_future(
        pool.request("GET", "/b", [], None, replayable=True, deadline=loop.time() + 5)
    )
    await asyncio.sleep(0)
    assert len(transport.writes) == 2  # the same connection, reused
    conn.data_received(answer(b"second"))
    response = await asyncio.wait_for(second, 1)
    assert await response.read() == b"second"
    response.release()
