"""Chaos run: steady load on `sidecar demo` while the model goes ok -> fail -> hang -> slow -> ok.

    .venv/bin/python loadtests/chaos.py [--phase-seconds 5] [--concurrency 16]

Starts `sidecar demo` on free loopback ports, drives a closed-loop load of V2 iris
requests from this process, switches the demo model's chaos mode through
`POST /demo/chaos` at each phase, and prints one row per phase: requests, answers
from the model, fallback answers, each error, and p50/p99 latency. Every run is
bounded: phases are timed and every request has a client timeout.
"""

from __future__ import annotations

import argparse
import asyncio
import random
import re
import signal
import statistics
import sys
import time
from collections import Counter
from dataclasses import dataclass, field

import aiohttp
import orjson

PHASES = (
    ("ok", {"mode": "ok"}),
    ("fail", {"mode": "fail", "status": 503}),
    ("hang", {"mode": "hang"}),
    ("slow", {"mode": "slow", "latency_ms": 300}),
    ("ok again", {"mode": "ok"}),
)
CLIENT_TIMEOUT = 10.0
HEADERS = {"Content-Type": "application/json", "Authorization": "Bearer demo-key"}


@dataclass
class PhaseStats:
    name: str
    latencies: list[float] = field(default_factory=list)
    outcomes: Counter[str] = field(default_factory=Counter)

    def row(self) -> dict[str, object]:
        ordered = sorted(self.latencies)

        def pct(p: float) -> str:
            if not ordered:
                return "-"
            return f"{ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000:.0f}"

        total = sum(self.outcomes.values())
        fallback = self.outcomes.get("fallback", 0)
        return {
            "phase": self.name,
            "requests": total,
            "model": self.outcomes.get("model", 0),
            "fallback": fallback,
            "fallback%": f"{100 * fallback / total:.0f}" if total else "-",
            "errors": ", ".join(
                f"{k}={v}"
                for k, v in sorted(self.outcomes.items())
                if k not in ("model", "fallback")
            )
            or "0",
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
        error_type = orjson.loads(body)["error"]["type"]
    except (orjson.JSONDecodeError, KeyError, TypeError):
        error_type = "model_error"  # the model's own answer, passed through
    return f"{response.status}:{error_type}"


async def worker(
    session: aiohttp.ClientSession,
    url: str,
    stats_box: list[PhaseStats],
    stop: asyncio.Event,
    seed: int,
) -> None:
    rng = random.Random(seed)
    while not stop.is_set():
        stats = stats_box[0]
        started = time.perf_counter()
        try:
            async with session.post(
                url, data=iris_request(rng), headers={"Content-Type": "application/json"}
            ) as response:
                outcome = await classify(response)
        except TimeoutError:
            outcome = "no_answer"
        except aiohttp.ClientError as exc:
            outcome = f"client:{type(exc).__name__}"
        stats.latencies.append(time.perf_counter() - started)
        stats.outcomes[outcome] += 1


async def start_demo() -> tuple[asyncio.subprocess.Process, str, str]:
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
    # Keep draining its log so the pipe never fills and stalls it.
    asyncio.get_running_loop().create_task(_drain(process.stdout))
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


async def main(phase_seconds: float, concurrency: int) -> int:
    process, sidecar_url, model_url = await start_demo()
    all_stats: list[PhaseStats] = []
    try:
        timeout = aiohttp.ClientTimeout(total=CLIENT_TIMEOUT)
        connector = aiohttp.TCPConnector(limit=concurrency * 2)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            stop = asyncio.Event()
            box = [PhaseStats("warm-up")]
            workers = [
                asyncio.create_task(
                    worker(session, sidecar_url + "/v2/models/iris/infer", box, stop, seed)
                )
                for seed in range(concurrency)
            ]
            await asyncio.sleep(1.0)
            for name, chaos in PHASES:
                async with session.post(model_url + "/demo/chaos", json=chaos) as resp:
                    resp.raise_for_status()
                box[0] = PhaseStats(name)
                all_stats.append(box[0])
                await asyncio.sleep(phase_seconds)
            stop.set()
            await asyncio.wait_for(asyncio.gather(*workers), CLIENT_TIMEOUT + 5)
    finally:
        process.send_signal(signal.SIGINT)
        await asyncio.wait_for(process.wait(), 30)
    rows = [s.row() for s in all_stats]
    print_table(rows)
    made_500 = sum(s.outcomes.get("500:internal_error", 0) for s in all_stats)
    no_answer = sum(s.outcomes.get("no_answer", 0) for s in all_stats)
    print(f"\nsidecar-made 500s: {made_500}   requests without an answer: {no_answer}")
    latencies = [x for s in all_stats for x in s.latencies]
    median_ms = statistics.median(latencies) * 1000
    print(f"all phases: {len(latencies)} requests, median {median_ms:.1f} ms")
    return 1 if made_500 or no_answer else 0


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--phase-seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=16)
    args = parser.parse_args()
    try:
        import uvloop

        runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
    except ImportError:  # pragma: no cover
        runner = asyncio.Runner()
    with runner:
        sys.exit(runner.run(main(args.phase_seconds, args.concurrency)))
