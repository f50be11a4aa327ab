"""Hostile clients and upstreams against the sidecar's own HTTP/1.1 layer, on raw
sockets on 127.0.0.1: each test here failed before the fix named in its docstring."""

from __future__ import annotations

import asyncio
import contextlib

import orjson

from tests.conftest import LOOPBACK, FakeModel, StartSidecar, base_config
from tests.test_http_layer import status_and_body


async def _read_until_close(reader: asyncio.StreamReader, within: float) -> bytes:
    return await asyncio.wait_for(reader.read(), within)


async def test_a_partial_head_pipelined_behind_a_request_still_times_out(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    """A request followed at once by the first bytes of the next one, then silence:
    the partial head must be cut off after head_timeout (408), not held forever.
    (The idle deadline armed after the answer ignored a connection in a head.)"""
    config = base_config(fake_model.url)
    config["server"].update(head_timeout="300ms", keepalive_timeout="60s")
    sidecar = await start_sidecar(config)
    reader, writer = await asyncio.open_connection(LOOPBACK, sidecar.running.main_port)
    try:
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\nX-")
        await writer.drain()
        raw = await _read_until_close(reader, 5)
    finally:
        writer.close()
    assert raw.startswith(b"HTTP/1.1 200 ")
    assert b"HTTP/1.1 408 " in raw
