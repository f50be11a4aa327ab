"""An upstream that answers with what it received, for the differential test.

    python tests/echo_server.py        prints "listening on PORT"

The answer's body is JSON: the method, the raw target, every header field as sent
(order and case kept) and the body (base64). The request may choose the answer's
status (``x-echo-status``) and one header to send back (``x-echo-reply``).
"""

from __future__ import annotations

import asyncio
import base64

import orjson
import uvloop
from aiohttp import web


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    status = int(request.headers.get("x-echo-status", "200"))
    payload = {
        "method": request.method,
        "target": request.raw_path,
        "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
        "body": base64.b64encode(body).decode(),
    }
    headers = {"Content-Type": "application/json"}
    if "x-echo-reply" in request.headers:
        headers["X-Echo-Reply"] = request.headers["x-echo-reply"]
    answer = b"" if request.method == "HEAD" or status in (204, 304) else orjson.dumps(payload)
    return web.Response(status=status, body=answer, headers=headers)


async def main() -> None:
    app = web.Application(client_max_size=1024 * 1024)
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    print(f"listening on {runner.addresses[0][1]}", flush=True)
    await asyncio.Event().wait()


if __name__ == "__main__":
    uvloop.run(main())
