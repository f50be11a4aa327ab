"""The upstream pool, driven without sockets: what a connection handed back to the
pool must be able to do next, and what a connect that fails is called."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import pytest

from sidecar.config.schema import Upstream
from sidecar.http.client import ConnectFailed, Pool, UpstreamConnection
from sidecar.upstream.upstreams import ConnectionPools
from tests.conftest import LOOPBACK
from tests.fake_transport import FakeTransport

READ_AHEAD_PLUS = 300_000  # body bytes: past the client's 256 KiB read-ahead


def answer(body: bytes) -> bytes:
    return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)


async def test_a_connection_paused_by_a_large_answer_reads_again_when_reused() -> None:
    """An answer whose bytes past the read-ahead came before anyone read them paused
    its connection, and it ended in that same read: the pool kept the connection
    paused, and the next request on it waited for an answer it would never read."""
    loop = asyncio.get_running_loop()
    pool = Pool("127.0.0.1", 9, max_connections=1)
    conn = UpstreamConnection(pool)
    transport = FakeTransport()
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


class ConnectsThatFail(asyncio.SelectorEventLoop):
    """A loop whose every connect fails with ``error`` (None: never answers)."""

    def __init__(self, error: OSError | None) -> None:
        super().__init__()
        self.error = error
        self.connects = 0

    async def create_connection(self, *args: Any, **kwargs: Any) -> Any:  # type: ignore[override]
        self.connects += 1
        if self.error is None:
            await asyncio.sleep(3600)
        raise self.error


def failed_connect(error: OSError | None, *, connect_timeout: float, within: float) -> Any:
    """What one request through a fresh pool raised, and the loop (for its counts)."""
    loop = ConnectsThatFail(error)
    pool = Pool("model.internal", 8000, connect_timeout=connect_timeout)

    async def attempt() -> BaseException:
        try:
            await pool.request("GET", "/", [], None, replayable=True, deadline=loop.time() + within)
        except (ConnectFailed, TimeoutError) as exc:
            assert pool.open == 0
            return exc
        raise AssertionError("the request got an answer")

    try:
        return loop.run_until_complete(attempt()), loop
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("error", "reason"),
    [
        (ConnectionRefusedError(errno.ECONNREFUSED, "Connect call failed"), "connection refused"),
        (TimeoutError(errno.ETIMEDOUT, "Connect call failed"), "connection timed out"),
        (
            socket.gaierror(socket.EAI_NONAME, "Name or service not known"),
            "its host name does not resolve",
        ),
        # Each address of a name failed its own way: asyncio joins them, with no errno.
        (OSError("Multiple exceptions: [Errno 111] ..., [Errno 99] ..."), "the connection failed"),
    ],
)
def test_a_failed_connect_says_why_in_words_and_is_no_timeout(error: OSError, reason: str) -> None:
    raised, _ = failed_connect(error, connect_timeout=5.0, within=10.0)
    assert isinstance(raised, ConnectFailed)
    assert raised.reason == reason


def test_a_connect_that_outlasts_its_timeout_is_a_failed_connect() -> None:
    raised, _ = failed_connect(None, connect_timeout=0.05, within=10.0)
    assert isinstance(raised, ConnectFailed)
    assert raised.reason == "no connection within 0.05s"


def test_a_connect_cut_short_by_the_attempts_deadline_is_its_timeout() -> None:
    raised, _ = failed_connect(None, connect_timeout=10.0, within=0.05)
    assert type(raised) is TimeoutError


def test_no_connect_is_started_once_the_deadline_has_passed() -> None:
    raised, loop = failed_connect(None, connect_timeout=10.0, within=-1.0)
    assert type(raised) is TimeoutError
    assert loop.connects == 0


async def test_a_pool_released_after_the_sidecar_closed_them_all_is_no_error() -> None:
    """SIGTERM while a reload waits for its probes: the sidecar closes every pool,
    then the reload stops the runtime it built, which releases its pools again."""
    pools = ConnectionPools()
    config = Upstream(url=f"http://{LOOPBACK}:1")
    pools.acquire("model", config)
    await pools.close()
    await pools.release("model", config)
    assert pools.acquire("model", config) is not None  # a pool again, counted anew
    await pools.release("model", config)
