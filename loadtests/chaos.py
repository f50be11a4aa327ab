"""Chaos run: steady load on `sidecar demo` while the model goes ok -> fail -> hang -> slow -> ok.

    .venv/bin/python loadtests/chaos.py [--phase-seconds 5] [--concurrency 16] [--rate 400]
        [--key demo-key]

Starts `sidecar demo` on free loopback ports, drives a closed-loop load of V2 iris
requests from this process, switches the demo model's chaos mode through
`POST /demo/chaos` at each phase, and prints one row per phase: requests, answers
from the model, fallback answers, each error, and p50/p99 latency.

Each phase says what it must show, and the run exits 1 when one contradicts it:

    ok, ok again   some answers come from the model
    fail, hang     none come from the model, and every one is a fallback
    every phase    nothing but 200 (a 401, a 5xx or a request left unanswered fails)

Phases do not overlap: between two phases new requests wait until those in flight
have been answered, so every request starts and ends under one chaos mode. Every run
is bounded: phases are timed and every request has a client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

CLIENT_TIMEOUT = 10.0
DEMO_KEY = "demo-key"


def _ok(stats: PhaseStats) -> list[str]:
    return [] if stats.model else ["no answer came from the model"]


def _all_fallbacks(stats: PhaseStats) -> list[str]:
    problems = []
    if stats.model:
        problems.append(f"{stats.model} answer(s) came from the failing model")
    missing = stats.total - stats.fallback - stats.model
    if missing:
        problems.append(f"{missing} answer(s) were neither the model's nor a fallback")
    return problems


# (name, chaos settings, what the phase must show besides "only 200s")
PHASES: tuple[tuple[str, dict[str, object], Callable[[PhaseStats], list[str]]], ...] = (
    ("ok", {"mode": "ok"}, _ok),
    ("fail", {"mode": "fail", "status": 503}, _all_fallbacks),
    ("hang", {"mode": "hang"}, _all_fallbacks),
    ("slow", {"mode": "slow", "latency_ms": 300}, lambda stats: []),
    ("ok again", {"mode": "ok"}, _ok),
)


@dataclass
class PhaseStats:
    name: str
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    @property
    def total(self) -> int:
        return sum(self.outcomes.values())

    @property
    def model(self) -> int:
        return self.outcomes.get("model", 0)

    @property
    def fallback(self) -> int:
        return self.outcomes.get("fallback", 0)

    def unexpected(self) -> dict[str, int]:
        return {k: v for k, v in self.outcomes.items() if k not in ("model", "fallback")}

    def row(self) -> dict[str, object]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> str:
            if not ordered:
                return "-"
            return f"{ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000:.0f}"

        total = self.total
        return {
            "phase": self.name,
            "requests": total,
            "model": self.model,
            "fallback": self.fallback,
            "fallback%": f"{100 * self.fallback / total:.0f}" if total else "-",
            "errors": ", ".join(f"{k}={v}" for k, v in sorted(self.unexpected().items())) or "0",
            "p50 ms": pct(0.50),
            "p99 ms": pct(0.99),
        }


def iris_request(rng: random.Random) -> bytes:
    row = [
        round(rng.uniform(4.3, 7.9), 1),
        round(rng.uniform(2.0, 4.4), 1),
        round(rng.uniform(1.0, 6.9), 1),
        round(rng.uniform(0.1, 2.5), 1),
    ]
    return orjson.dumps(
        {"inputs": [{"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": row}]}
    )


async def classify(response: aiohttp.ClientResponse) -> str:
    body = await response.read()
    if response.status == 200:
        return "fallback" if "X-Sidecar-Fallback" in response.headers else "model"
    try:
        payload = orjson.loads(body)
        error = payload["error"]
        # V2 routes give the error as a string with the type beside it.
        error_type = error["type"] if isinstance(error, dict) else payload["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        error_type = "model_error"  # the model's own answer, passed through
    return f"{response.status}:{error_type}"


class Load:
    """Workers that send at a steady rate (``rate`` requests a second together, never
    more than one request each at a time: a slow answer lowers the rate) and stop
    starting requests while a phase changes."""

    def __init__(
        self, session: aiohttp.ClientSession, url: str, key: str, rate: float, workers: int
    ) -> None:
        self.session = session
        # Paced under the demo's rate limit (2,000/s per key): fallbacks answer fast,
        # and an unpaced loop measured the limit instead of the model's phases.
        self.interval = workers / rate
        self.url = url
        self.headers = {"Content-Type": "application/json", "Authorization": f"Bearer {key}"}
        self.stats = PhaseStats("warm-up")
        self.open = asyncio.Event()
        self.open.set()
        self.stopped = False
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.idle.set()

    async def worker(self, seed: int) -> None:
        rng = random.Random(seed)
        due = time.perf_counter()
        while True:
            await self.open.wait()
            if self.stopped:
                return
            wait = due - time.perf_counter()
            if wait > 0:
                await asyncio.sleep(wait)
            due = max(due, time.perf_counter() - self.interval) + self.interval
            stats = self.stats
            self.in_flight += 1
            self.idle.clear()
            started = time.perf_counter()
            try:
                async with self.session.post(
                    self.url, data=iris_request(rng), headers=self.headers
                ) as response:
                    outcome = await classify(response)
            except TimeoutError:
                outcome = "no_answer"
            except aiohttp.ClientError as exc:
                outcome = f"client:{type(exc).__name__}"
            finally:
                self.in_flight -= 1
                if self.in_flight == 0:
                    self.idle.set()
            stats.latencies.append(time.perf_counter() - started)
            stats.outcomes[outcome] += 1

    async def between_phases(self) -> None:
        """Hold new requests back until every one in flight has its answer."""
        self.open.clear()
        await asyncio.wait_for(self.idle.wait(), CLIENT_TIMEOUT + 5)


async def start_demo(log_dir: str) -> tuple[asyncio.subprocess.Process, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "demo",
        "--port",
        "0",
        "--model-port",
        "0",
        "--shadow-port",
        "0",
        "--admin-port",
        "0",
        "--log-dir",
        log_dir,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    assert process.stdout is not None
    banner = ""
    while "Ctrl-C" not in banner:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        if not line:
            raise RuntimeError("sidecar demo exited early")
        banner += line.decode()
    sidecar = re.search(r"sidecar\s+(http://\S+)", banner)
    model = re.search(r"model\s+(http://\S+)", banner)
    if sidecar is None or model is None:
        raise RuntimeError(f"unexpected banner: {banner}")
    return process, sidecar.group(1), model.group(1)


async def _drain(stream: asyncio.StreamReader) -> None:
    while await stream.readline():
        pass


def print_table(rows: list[dict[str, object]]) -> None:
    columns = list(rows[0])
    widths = {c: max(len(c), *(len(str(r[c])) for r in rows)) for c in columns}
    print("  ".join(c.ljust(widths[c]) for c in columns))
    for r in rows:
        print("  ".join(str(r[c]).ljust(widths[c]) for c in columns))


def verdicts(all_stats: list[PhaseStats]) -> list[str]:
    """What each phase shows that it should not."""
    checks = {name: check for name, _, check in PHASES}
    problems = []
    for stats in all_stats:
        found = checks[stats.name](stats)
        if not stats.total:
            found.append("no request was answered")
        found += [f"{count} answer(s) {outcome}" for outcome, count in stats.unexpected().items()]
        problems += [f"phase {stats.name}: {problem}" for problem in found]
    return problems


async def main(
    phase_seconds: float, concurrency: int, rate: float, key: str, json_out: Path | None
) -> int:
    with tempfile.TemporaryDirectory(prefix="sidecar-chaos-") as log_dir:
        return await _run(phase_seconds, concurrency, rate, key, json_out, log_dir)


async def _run(
    phase_seconds: float,
    concurrency: int,
    rate: float,
    key: str,
    json_out: Path | None,
    log_dir: str,
) -> int:
    process, sidecar_url, model_url = await start_demo(log_dir)
    assert process.stdout is not None
    drain = asyncio.create_task(_drain(process.stdout))  # a full pipe would stall the demo
    all_stats: list[PhaseStats] = []
    try:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=concurrency * 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            load = Load(session, sidecar_url + "/v2/models/iris/infer", key, rate, concurrency)
            workers = [asyncio.create_task(load.worker(seed)) for seed in range(concurrency)]
            await asyncio.sleep(1.0)
            for name, chaos, _ in PHASES:
                await load.between_phases()
                async with session.post(model_url + "/demo/chaos", json=chaos) as resp:
                    resp.raise_for_status()
                load.stats = PhaseStats(name)
                all_stats.append(load.stats)
                load.open.set()
                await asyncio.sleep(phase_seconds)
            await load.between_phases()
            load.stopped = True
            load.open.set()
            await asyncio.wait_for(asyncio.gather(*workers), CLIENT_TIMEOUT + 5)
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 30)
        drain.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await drain
    rows = [s.row() for s in all_stats]
    print_table(rows)
    problems = verdicts(all_stats)
    latencies = sorted(x for s in all_stats for x in s.latencies)
    median_ms = latencies[len(latencies) // 2] * 1000 if latencies else 0.0
    print(f"\nall phases: {len(latencies)} requests, median {median_ms:.1f} ms")
    for problem in problems:
        print(f"FAIL {problem}")
    print("chaos run: " + ("failed" if problems else "every phase showed what it should"))
    if json_out is not None:
        phases = [{**s.row(), "outcomes": dict(s.outcomes)} for s in all_stats]
        await asyncio.to_thread(
            json_out.write_bytes, orjson.dumps({"phases": phases, "problems": problems})
        )
    return 1 if problems else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument(
        "--rate", type=float, default=400.0, help="requests a second, all workers together"
    )
    parser.add_argument("--key", default=DEMO_KEY, help="the API key to send (demo-key)")
    parser.add_argument("--json", type=Path, help="also write the phases and verdicts here")
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        sys.exit(
            runner.run(main(args.phase_seconds, args.concurrency, args.rate, args.key, args.json))
        )
