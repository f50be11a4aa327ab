"""The data plane's own CPU per request, without sockets: steadier than a load test.

Request bytes are fed to the sidecar's HttpConnection and a canned upstream answer to
its UpstreamConnection (through the event loop, as a socket would), so what is timed
is the Python of the HTTP layers and the pipeline, not the kernel or the load
generator: on a quiet host it moves by a few per cent run to run, where the socket
benchmarks (bench.py) move by ten (on a busy one both move by 15% or more: run the
versions to compare back to back, more than once). The raw floor (raw_proxy.py)
runs the same way for the ratio. Syscalls, the upstream and the access-log and
drift threads' CPU are not in these numbers (bench.py has them).

    python loadtests/plane.py                 # every contender, 50,000 requests each
    python loadtests/plane.py --contender passthrough --requests 20000
"""

from __future__ import annotations

import argparse
import asyncio
import atexit
import shutil
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import uvloop
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import bench
import raw_proxy

from sidecar.http.client import Pool, UpstreamConnection
from sidecar.http.messages import Response
from sidecar.http.server import HttpConnection, HttpServer, Request

ANSWER = bench.ANSWER_JSON.encode()
REQUEST = (
    b"POST /v2/models/iris/infer HTTP/1.1\r\nHost: 127.0.0.1:8080\r\nContent-Length: %d\r\n"
    b"Content-Type: application/json\r\nAuthorization: Bearer %s\r\n\r\n%s"
) % (len(bench.BODY), bench.BENCH_KEY.encode(), bench.BODY)
UPSTREAM_ANSWER = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sun, 06 Dec 2026 08:47:02 GMT\r\n"
    b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
) % (len(ANSWER), ANSWER)
CONTENDERS = ("raw-floor", "http-layers", "passthrough", "full")


class FakeTransport:
    """What the protocols use of a transport; writes go to ``on_write``."""

    def __init__(self, on_write: Callable[[bytes], None]) -> None:
        self.on_write = on_write
        self.closing = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return ("127.0.0.1", 40000) if name == "peername" else default

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0  # every write is taken whole

    def write(self, data: bytes) -> None:
        self.on_write(data)

    def writelines(self, parts: Any) -> None:
        self.on_write(b"".join(parts))

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def can_write_eof(self) -> bool:
        return True

    def write_eof(self) -> None:
        pass


def answering(protocol: Any, loop: asyncio.AbstractEventLoop) -> FakeTransport:
    """A transport whose peer answers every request with UPSTREAM_ANSWER, on the
    loop's next turn (as data from a socket arrives)."""
    return FakeTransport(lambda _: loop.call_soon(protocol.data_received, UPSTREAM_ANSWER))


def fake_upstream(pool: Pool, loop: asyncio.AbstractEventLoop) -> None:
    """Put one idle connection in ``pool`` whose peer answers UPSTREAM_ANSWER."""
    upstream = UpstreamConnection(pool)
    upstream.connection_made(answering(upstream, loop))  # type: ignore[arg-type]
    pool.open = 1
    upstream.idle_since = loop.time()
    pool._idle.append(upstream)


async def sidecar_handler(contender: str) -> Callable[[Request], Awaitable[Any]]:
    """The handler the HttpServer calls: the bare layers, or a whole config's pipeline,
    its upstream pool holding one fake connection."""
    loop = asyncio.get_running_loop()
    if contender == "http-layers":
        pool = Pool("127.0.0.1", 9, max_connections=4)
        fake_upstream(pool, loop)

        async def forward(request: Request) -> Response:
            body = await request.read_body(1 << 20) if request.body_exists else b""
            response = await pool.request(
                request.method,
                request.target,
                [b"Content-Type: application/json\r\n"],
                body,
                replayable=False,
                deadline=loop.time() + 30,
            )
            answer = response.take_whole() if response.complete else await response.read()
            response.release()
            return Response(response.status, answer, [("Content-Type", "application/json")])

        return forward
    from sidecar.config.plan import load_plan
    from sidecar.control.live import LiveRuntime
    from sidecar.telemetry.logs import Logs
    from sidecar.telemetry.metrics import Metrics
    from sidecar.upstream.upstreams import ConnectionPools

    workdir = Path(tempfile.mkdtemp(prefix="sidecar-plane-"))
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)  # its config and logs
    url = "http://127.0.0.1:9"
    config = bench.full_config(url, workdir) if contender == "full" else bench.sidecar_config(url)
    config["upstreams"]["model"]["health"] = {"interval": "600s"}
    path = workdir / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    metrics = Metrics()
    plan = load_plan(path)
    logs = Logs(plan.loaded, metrics, None)
    pools = ConnectionPools(metrics)
    # The runtime is given this pool: the same name and settings share one.
    fake_upstream(pools.acquire("model", plan.config.upstreams["model"]), loop)
    live = LiveRuntime(plan, metrics=metrics, logs=logs, pools=pools)
    logs.start()
    await live.start()
    # Its first readiness probe takes the canned answer too, before the timing starts.
    await live.current.upstreams.first_pass_done.wait()
    return live.dispatch


async def time_sidecar(contender: str, requests: int) -> float:
    handler = await sidecar_handler(contender)
    server = HttpServer(handler, lambda *_: Response(500))
    client = HttpConnection(server)
    return await _time(client, requests)


async def time_floor(requests: int) -> float:
    loop = asyncio.get_running_loop()
    pool = raw_proxy.Pool("http://127.0.0.1:9", loop)
    upstream = raw_proxy.UpstreamConnection()
    upstream.connection_made(answering(upstream, loop))  # type: ignore[arg-type]
    pool.idle.append(upstream)
    return await _time(raw_proxy.ClientConnection(pool), requests)


async def _time(client: Any, requests: int) -> float:
    """Mean wall time per request of ``client`` (a server-side protocol), after a
    warm-up, the whole process on one core."""
    loop = asyncio.get_running_loop()
    waiting: list[asyncio.Future[bytes]] = []

    def on_answer(data: bytes) -> None:
        if waiting and not waiting[-1].done():
            waiting[-1].set_result(data)

    client.connection_made(FakeTransport(on_answer))

    async def one() -> None:
        future = loop.create_future()
        waiting.append(future)
        client.data_received(REQUEST)
        answer = await future
        waiting.clear()
        if not answer.startswith(b"HTTP/1.1 200"):
            raise SystemExit(f"unexpected answer: {answer[:200]!r}")
        await asyncio.sleep(0)  # the server's task ends its turn

    for _ in range(min(3000, requests)):
        await one()
    started = time.perf_counter()
    for _ in range(requests):
        await one()
    return (time.perf_counter() - started) / requests * 1e6


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--contender", choices=CONTENDERS, action="append")
    parser.add_argument("--requests", type=int, default=50_000)
    parser.add_argument("--quick", action="store_true", help="2,000 requests: a smoke test")
    args = parser.parse_args()
    if args.quick:
        args.requests = 2_000
    import os

    import sidecar

    stale = sidecar.stale_build()
    if stale:  # compiled modules of older sources would be timed
        raise SystemExit(f"{stale}: run `python build_native.py --inplace` (or --clean)")
    print(f"the request path runs {'compiled' if sidecar.compiled() else 'interpreted'}")
    from sidecar.control import interpreter

    # As `sidecar run` does before it builds a config (frozen start-up heap, fewer
    # young collections), once, so every contender runs with the same settings.
    interpreter.settle()
    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, {cpus[0]})  # one core: a thread's CPU counts in the time
    results: dict[str, float] = {}
    for contender in args.contender or CONTENDERS:
        if contender == "raw-floor":
            results[contender] = uvloop.run(time_floor(args.requests))
        else:
            results[contender] = uvloop.run(time_sidecar(contender, args.requests))
        print(f"{contender:12s} {results[contender]:7.2f} us/request", flush=True)
    floor = results.get("raw-floor")
    if floor:
        for name, value in results.items():
            if name != "raw-floor":
                print(f"{name} / raw-floor: {value / floor:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
