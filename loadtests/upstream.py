"""A fast stand-in model server for benchmarks: a fixed V2 JSON answer, optional latency.

    python loadtests/upstream.py --port 18081 [--latency-ms 20]

It prints `listening on PORT` once it serves (port 0 picks a free one).
"""

from __future__ import annotations

import argparse
import asyncio
import sys

import orjson
from aiohttp import web

ANSWER = orjson.dumps(
    {
        "model_name": "iris",
        "model_version": "1",
        "outputs": [
            {
                "name": "probabilities",
                "shape": [1, 3],
                "datatype": "FP32",
                "data": [0.97, 0.02, 0.01],
            },
            {"name": "label", "shape": [1], "datatype": "INT64", "data": [0]},
        ],
    }
)


def build_app(latency_ms: float) -> web.Application:
    delay = latency_ms / 1000.0

    async def answer(request: web.Request) -> web.Response:
        await request.read()
        if delay:
            await asyncio.sleep(delay)
        return web.Response(body=ANSWER, content_type="application/json")

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    return app


async def serve(port: int, latency_ms: float) -> None:
    runner = web.AppRunner(build_app(latency_ms), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port, backlog=4096)
    await site.start()
    bound = runner.addresses[0][1]
    print(f"listening on {bound}", flush=True)
    await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--latency-ms", type=float, default=0.0)
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        try:
            runner.run(serve(args.port, args.latency_ms))
        except KeyboardInterrupt:
            sys.exit(0)


if __name__ == "__main__":
    main()
