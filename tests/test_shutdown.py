"""SIGTERM drains: a request in flight still gets its whole answer, then exit 0."""

from __future__ import annotations

import asyncio
import os
import signal
from pathlib import Path

import aiohttp
import orjson
import yaml
from aiohttp import web

from tests.conftest import LOOPBACK, FakeModel, base_config, start_sidecar_process


async def test_sigterm_lets_the_request_in_flight_finish(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        arrived.set()
        await release.wait()
        return web.json_response({"answer": "complete", "pad": "x" * 100_000})

    fake_model.on("/slow", slow)
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(base_config(fake_model.url, admin={"enabled": False})))
    process, port, _ = await start_sidecar_process(config_path)
    try:
        async with aiohttp.ClientSession() as session:
            pending = asyncio.create_task(session.get(f"http://{LOOPBACK}:{port}/slow"))
            await asyncio.wait_for(arrived.wait(), 30)
            process.send_signal(signal.SIGTERM)
            assert process.stdout is not None
            while True:
                record = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 30))
                if record["event"] == "sidecar_draining":
                    break
            release.set()
            response = await asyncio.wait_for(pending, 30)
            assert response.status == 200
            assert (await response.json())["answer"] == "complete"
            response.release()
        assert await asyncio.wait_for(process.wait(), 30) == 0
        assert process.stderr is not None
        assert b"Traceback" not in await process.stderr.read()
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_sigterm_with_nothing_in_flight_exits_0(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(base_config(fake_model.url)))
    process, _port, _ = await start_sidecar_process(config_path)
    try:
        os.kill(process.pid, signal.SIGTERM)
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
