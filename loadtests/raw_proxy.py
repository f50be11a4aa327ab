"""The floor for a Python proxy on raw protocols: uvloop protocols and httptools
(llhttp) on both sides, pooled keep-alive upstream connections, a task per client
connection, bodies relayed whole, no features. What a sidecar's data plane is
measured against (loadtests/bench.py, contender raw-floor).

python loadtests/raw_proxy.py --port 0 --upstream http://127.0.0.1:8081
"""

from __future__ import annotations

import argparse
import asyncio
from collections import deque
from http import HTTPStatus
from urllib.parse import urlsplit

import httptools
import uvloop

HOP = {b"connection", b"keep-alive", b"transfer-encoding", b"content-length", b"host"}
REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}


class UpstreamConnection(asyncio.Protocol):
    """One keep-alive connection to the upstream; one request at a time."""

    def __init__(self) -> None:
        self.parser = httptools.HttpResponseParser(self)
        self.transport: asyncio.Transport | None = None
        self.answer: asyncio.Future[tuple[int, list[tuple[bytes, bytes]], bytes]] | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.answer is not None and not self.answer.done():
            self.answer.set_exception(exc or ConnectionError("upstream closed"))

    def data_received(self, data: bytes) -> None:
        if self.answer is None:  # bytes while idle: out of step, never reused
            self.closed = True
            assert self.transport is not None
            self.transport.close()
            return
        self.parser.feed_data(data)

    def on_message_begin(self) -> None:
        self.headers: list[tuple[bytes, bytes]] = []
        self.body: list[bytes] = []

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        answer, self.answer = self.answer, None
        if not self.parser.should_keep_alive():
            self.closed = True
        assert answer is not None
        answer.set_result((self.parser.get_status_code(), self.headers, b"".join(self.body)))


class Pool:
    def __init__(self, url: str, loop: asyncio.AbstractEventLoop) -> None:
        # The loop, kept: asyncio.get_running_loop() makes a getpid system call.
        self.loop = loop
        parts = urlsplit(url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        self.host_header = f"{self.host}:{self.port}".encode()
        self.idle: deque[UpstreamConnection] = deque()

    async def send(self, head: bytes, body: bytes) -> tuple[int, list[tuple[bytes, bytes]], bytes]:
        while self.idle and self.idle[-1].closed:
            self.idle.pop()
        if self.idle:
            connection = self.idle.pop()  # LIFO: the warmest connection
        else:
            create = self.loop.create_connection
            _, connection = await create(UpstreamConnection, self.host, self.port)
        connection.answer = self.loop.create_future()
        assert connection.transport is not None
        connection.transport.write(head + body)
        answer = await connection.answer
        if not connection.closed:
            self.idle.append(connection)
        return answer


class ClientConnection(asyncio.Protocol):
    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.parser = httptools.HttpRequestParser(self)
        # Parsed requests, and the serving task's wait for the next (an asyncio.Queue
        # looks the running loop up, a getpid system call, for each wait).
        self.queue: deque[tuple[bytes, bytes, list[tuple[bytes, bytes]], bytes]] = deque()
        self.waiter: asyncio.Future[None] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.Transport = transport  # type: ignore[assignment]
        self.task = self.pool.loop.create_task(self.serve())

    def connection_lost(self, exc: Exception | None) -> None:
        self.task.cancel()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            self.transport.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 0\r\n\r\n")
            self.transport.close()

    def on_message_begin(self) -> None:
        self.url, self.headers, self.body = b"", [], []  # type: ignore[var-annotated]

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers.append((name, value))

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        method = self.parser.get_method()
        self.queue.append((method, self.url, self.headers, b"".join(self.body)))
        if self.waiter is not None and not self.waiter.done():
            self.waiter.set_result(None)

    async def serve(self) -> None:  # pipelined requests answered in order
        while True:
            while not self.queue:
                self.waiter = self.pool.loop.create_future()
                await self.waiter
            method, url, headers, body = self.queue.popleft()
            lines = [method + b" " + url + b" HTTP/1.1", b"host: " + self.pool.host_header]
            lines += [n + b": " + v for n, v in headers if n.lower() not in HOP]
            lines.append(b"content-length: %d" % len(body))
            status, answer_headers, answer = await self.pool.send(
                b"\r\n".join(lines) + b"\r\n\r\n", body
            )
            out = [b"HTTP/1.1 %d %s" % (status, REASONS.get(status, b"Unknown"))]
            out += [n + b": " + v for n, v in answer_headers if n.lower() not in HOP]
            out.append(b"content-length: %d" % len(answer))
            self.transport.write(b"\r\n".join(out) + b"\r\n\r\n" + answer)


async def main(port: int, upstream: str) -> None:
    loop = asyncio.get_running_loop()
    pool = Pool(upstream, loop)
    server = await loop.create_server(
        lambda: ClientConnection(pool), "127.0.0.1", port, backlog=4096
    )
    print(f"listening on {server.sockets[0].getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--upstream", required=True)
    args = parser.parse_args()
    uvloop.run(main(args.port, args.upstream))
