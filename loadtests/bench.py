"""Side-by-side benchmarks on loopback, every number a ratio to a baseline of the same run.

    .venv/bin/python loadtests/bench.py --suite accesslog [--duration 5] [--rounds 3]

Suites:
    compare     direct, a 30-line aiohttp proxy, the sidecar pass-through and with
                everything on, NGINX and Envoy (when installed): RPS and p50/p99 at
                c=1/16/64, c=256 against a 20 ms model, open-loop p99 at fixed rates,
                CPU per request and peak RSS of the proxy, ratios to minimal and direct
    features    CPU per request: pass-through, each feature alone, everything
    connections peak RSS of the sidecar holding 1,000 open client connections
    soak        a steady rate for --soak-seconds (600): RSS at start and end
    accesslog   the sidecar with its access log on (to a file) versus off
    shadow      primary p99 at a fixed rate, every request mirrored versus none

Each contender runs as its own process; contenders alternate round by round so a
noisy neighbour hits them alike, and the median round counts. The load comes from
`wrk` when it is installed, else from a bounded aiohttp loop. Results are printed as
a table and written as JSON (--json). Every run is bounded in time.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import os
import queue
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import orjson
import yaml

ROOT = Path(__file__).resolve().parent.parent
BODY = orjson.dumps(
    {
        "inputs": [
            {"name": "input-0", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}
        ]
    }
)
LOOPBACK = "127.0.0.1"
BENCH_KEY = "bench-key-0123456789"
HEADERS = {"Content-Type": "application/json", "Authorization": f"Bearer {BENCH_KEY}"}
ANSWER_JSON = (
    '{"model_name":"iris","model_version":"1","outputs":[{"name":"probabilities",'
    '"shape":[1,3],"datatype":"FP32","data":[0.97,0.02,0.01]},{"name":"label",'
    '"shape":[1],"datatype":"INT64","data":[0]}]}'
)


@dataclass
class Running:
    name: str
    process: subprocess.Popen[bytes]
    port: int
    output: list[bytes] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{LOOPBACK}:{self.port}"

    def family(self) -> list[int]:
        """The process and its children (a sidecar with workers is several processes)."""
        pids = [self.process.pid]
        for children in Path(f"/proc/{self.process.pid}/task").glob("*/children"):
            pids += [int(pid) for pid in children.read_text().split()]
        return pids

    def cpu_seconds(self) -> float:
        ticks = os.sysconf("SC_CLK_TCK")
        total = 0
        for pid in self.family():
            with suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += int(fields[11]) + int(fields[12])  # utime + stime
        return total / ticks

    def peak_rss_mb(self) -> float:
        """Summed over the family: what the deployment holds at its peak (about)."""
        return self._memory_mb("VmHWM:")

    def rss_mb(self) -> float:
        return self._memory_mb("VmRSS:")

    def _memory_mb(self, field: str) -> float:
        total = 0
        for pid in self.family():
            with suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith(field):
                        total += int(line.split()[1])
        return total / 1024


def _spawn(
    name: str, argv: list[str], port_of: Callable[[bytes], int | None], cwd: Path = ROOT
) -> Running:
    """Start a server process; its port is read from its output (30 s at most)."""
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=cwd)
    assert process.stdout is not None
    lines: queue.Queue[bytes] = queue.Queue()
    output: list[bytes] = []

    def pump(stream: Any) -> None:  # keeps the pipe drained for the process's lifetime
        for line in iter(stream.readline, b""):
            lines.put(line)
            if len(output) < 200:
                output.append(line)
        lines.put(b"")

    threading.Thread(target=pump, args=(process.stdout,), daemon=True).start()
    deadline = time.monotonic() + 30
    while True:
        try:
            line = lines.get(timeout=max(0.1, deadline - time.monotonic()))
        except queue.Empty:
            process.kill()
            raise RuntimeError(f"{name} did not start within 30 s: {b''.join(output)!r}") from None
        if not line:
            raise RuntimeError(f"{name} exited before serving: {b''.join(output)!r}")
        port = port_of(line)
        if port is not None:
            return Running(name, process, port, output)


def start_upstream(latency_ms: float = 0.0) -> Running:
    def port_of(line: bytes) -> int | None:
        match = re.match(rb"listening on (\d+)", line)
        return int(match.group(1)) if match else None

    return _spawn(
        f"upstream({latency_ms:g}ms)",
        [
            sys.executable,
            str(ROOT / "loadtests" / "upstream.py"),
            "--port",
            "0",
            "--latency-ms",
            str(latency_ms),
        ],
        port_of,
    )


def start_sidecar(
    name: str, config: dict[str, Any], workdir: Path, *, workers: int = 0, source: Path = ROOT
) -> Running:
    """``source``: the checkout whose ``sidecar`` package runs (``-m`` imports from
    the working directory first), e.g. an older commit's worktree."""
    path = workdir / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))

    def port_of(line: bytes) -> int | None:
        if b"sidecar_started" not in line:
            return None
        started = orjson.loads(line)
        if not started.get("compiled"):
            # Figures of the interpreted request path are not the shipped wheel's.
            print(f"note: {name} runs interpreted (build_native.py --inplace compiles it)")
        return int(started["listen"].rsplit(":", 1)[1])

    argv = [sys.executable, "-m", "sidecar", "run", "--config", str(path)]
    if workers:
        argv += ["--workers", str(workers)]
    return _spawn(name, argv, port_of, cwd=source)


def sidecar_config(upstream: str, *, access_log: dict[str, Any] | None = None) -> dict[str, Any]:
    """Pass-through: one route, no retries, no fallback, no access log unless given."""
    return {
        "listen": {"host": LOOPBACK, "port": 0},
        "admin": {"enabled": False},
        "upstreams": {
            "model": {"url": upstream, "max_connections": 512, "breaker": {"enabled": False}}
        },
        "routes": [{"name": "infer", "path_prefix": "/", "upstream": "model", "timeout": "30s"}],
        "logging": {"level": "info", "access_log": access_log or {"enabled": False}},
    }


@contextmanager
def running(*processes: Running) -> Iterator[None]:
    try:
        yield
    finally:
        for p in processes:
            p.process.terminate()
        for p in processes:
            try:
                p.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.process.kill()


# The A/B suites give the sidecars under test one core and everything else (load
# generator, upstream) the rest: on a shared 2-core machine, two processes of the same
# code otherwise differ by up to 20% for their whole lives, more than most features
# cost. The bench process moves itself to the other cores, so what it starts follows.
PROXY_CPUS: set[int] = set()


@contextmanager
def load_elsewhere(enabled: bool) -> Iterator[None]:
    """For one suite: this process (and what it starts) off the proxy core."""
    cpus = sorted(os.sched_getaffinity(0))
    if not enabled or len(cpus) < 2:
        yield
        return
    PROXY_CPUS.add(cpus[0])
    os.sched_setaffinity(0, set(cpus[1:]))
    try:
        yield
    finally:
        PROXY_CPUS.clear()
        os.sched_setaffinity(0, set(cpus))


def isolate(*targets: Running) -> None:
    """Move the sidecars under test (every thread) to the proxy core, when pinning."""
    if not PROXY_CPUS:
        return
    for target in targets:
        for pid in target.family():
            for task in Path(f"/proc/{pid}/task").iterdir():
                with suppress(OSError):
                    os.sched_setaffinity(int(task.name), PROXY_CPUS)


# -- load ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    errors: int
    rps: float
    p50_ms: float
    p99_ms: float


_WRK_SCRIPT = """
wrk.method = "POST"
wrk.body = '%s'
wrk.headers["Content-Type"] = "application/json"
wrk.headers["Authorization"] = "Bearer %s"
"""


def _wrk_latency(text: str, label: str) -> float:
    match = re.search(rf"^\s*{label}%\s+([\d.]+)(us|ms|s)\s*$", text, re.M)
    if match is None:
        return float("nan")
    scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[match.group(2)]
    return float(match.group(1)) * scale


def _p50_p99_ms(latencies: list[float]) -> tuple[float, float]:
    ordered = sorted(latencies) or [float("nan")]
    return tuple(ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 for q in (0.5, 0.99))  # type: ignore[return-value]


def _wrk_script(workdir: Path) -> Path:
    """The POST script, written once and whole: in a smoke run several wrk start at
    once, and one must not read the file while another truncates it."""
    script = workdir / "post.lua"
    if not script.exists():
        partial = workdir / f"post.lua.{threading.get_ident()}"
        partial.write_text(_WRK_SCRIPT % (BODY.decode(), BENCH_KEY))
        partial.replace(script)
    return script


def load_wrk(
    url: str, concurrency: int, duration: float, workdir: Path, *, quick: bool = False
) -> LoadResult:
    script = _wrk_script(workdir)
    threads = min(2, concurrency)
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{concurrency}",
        f"-d{max(1, round(duration))}s",
        "--latency",
        "-s",
        str(script),
        url + "/v2/models/iris/infer",
    ]
    if quick:
        cut = _parse_wrk(_wrk_cut_short(argv, duration))
        if cut.requests:
            return cut
        # A smoke run must see answers: a cut run that saw none (a cold proxy taking
        # its time over 256 new connections on a busy core) gets wrk's whole second.
    run = subprocess.run(argv, capture_output=True, text=True, timeout=duration + 60, check=True)
    return _parse_wrk(run.stdout)


def _parse_wrk(text: str) -> LoadResult:
    total = int(re.search(r"(\d+) requests in", text).group(1))  # type: ignore[union-attr]
    errors_match = re.search(r"Non-2xx or 3xx responses: (\d+)", text)
    socket_errors = re.search(
        r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", text
    )
    errors = int(errors_match.group(1)) if errors_match else 0
    if socket_errors:
        errors += sum(int(g) for g in socket_errors.groups())
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", text).group(1))  # type: ignore[union-attr]
    return LoadResult(total, errors, rps, _wrk_latency(text, "50"), _wrk_latency(text, "99"))


def _wrk_cut_short(argv: list[str], duration: float) -> str:
    """wrk's output for a run cut at ``duration`` (wrk runs a second at least): on
    SIGINT it stops and reports as usual, over the time it ran. It ignores a SIGINT
    that comes before its threads start, so such a run takes its whole second."""
    with subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as wrk:
        try:
            out, err = wrk.communicate(timeout=duration)
        except subprocess.TimeoutExpired:
            wrk.send_signal(signal.SIGINT)
            out, err = wrk.communicate(timeout=60)
    if wrk.returncode != 0:
        raise subprocess.CalledProcessError(wrk.returncode, argv, out, err)
    return out


async def _load_aiohttp(url: str, concurrency: int, duration: float) -> LoadResult:
    import aiohttp

    latencies: list[float] = []
    errors = 0
    stop_at = time.perf_counter() + duration
    connector = aiohttp.TCPConnector(limit=concurrency)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def worker() -> None:
            nonlocal errors
            while time.perf_counter() < stop_at:
                started = time.perf_counter()
                try:
                    async with session.post(
                        url + "/v2/models/iris/infer",
                        data=BODY,
                        headers=HEADERS,
                    ) as r:
                        await r.read()
                        if r.status != 200:
                            errors += 1
                except aiohttp.ClientError:
                    errors += 1
                latencies.append(time.perf_counter() - started)

        began = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.perf_counter() - began
    return LoadResult(len(latencies), errors, len(latencies) / elapsed, *_p50_p99_ms(latencies))


async def _open_loop(url: str, rate: float, duration: float, path: str) -> LoadResult:
    """Requests at a fixed rate whatever the answers do (no coordinated omission):
    each latency is counted from the moment its request was due, not when it went."""
    import aiohttp

    latencies: list[float] = []
    errors = 0
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one(due: float) -> None:
            nonlocal errors
            try:
                async with session.post(url + path, data=BODY, headers=HEADERS) as response:
                    await response.read()
                    if response.status != 200:
                        errors += 1
            except (aiohttp.ClientError, TimeoutError):
                errors += 1
            latencies.append(time.perf_counter() - due)

        start = time.perf_counter()
        total = int(rate * duration)
        tasks = []
        for index in range(total):
            due = start + index / rate
            delay = due - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            tasks.append(asyncio.create_task(one(due)))
        await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    return LoadResult(len(latencies), errors, len(latencies) / elapsed, *_p50_p99_ms(latencies))


def load_open_loop(url: str, rate: float, duration: float) -> LoadResult:
    return asyncio.run(_open_loop(url, rate, duration, "/v2/models/iris/infer"))


def load(
    url: str, concurrency: int, duration: float, workdir: Path, *, quick: bool = False
) -> LoadResult:
    if shutil.which("wrk"):
        return load_wrk(url, concurrency, duration, workdir, quick=quick)
    return asyncio.run(_load_aiohttp(url, concurrency, duration))


# -- suites -------------------------------------------------------------------------


@dataclass
class Row:
    contender: str
    concurrency: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int
    cpu_us_per_request: float
    peak_rss_mb: float

    @classmethod
    def of(
        cls,
        name: str,
        level: int,
        result: LoadResult,
        *,
        cpu_seconds: float | None = None,
        rss_mb: float = float("nan"),
    ) -> Row:
        """A row for one load run; CPU is given as seconds spent during it."""
        cpu = float("nan") if cpu_seconds is None else cpu_seconds / max(1, result.requests) * 1e6
        return cls(
            name, level, result.rps, result.p50_ms, result.p99_ms, result.errors, cpu, rss_mb
        )


def measure(
    target: Running, concurrency: int, duration: float, workdir: Path, *, quick: bool = False
) -> Row:
    cpu_before = target.cpu_seconds()
    result = load(target.url, concurrency, duration, workdir, quick=quick)
    cpu = target.cpu_seconds() - cpu_before
    return Row.of(target.name, concurrency, result, cpu_seconds=cpu, rss_mb=target.peak_rss_mb())


def each(contenders: list[Running], run: Callable[[Running], Row], *, at_once: bool) -> list[Row]:
    """``run`` for each contender in turn, or (a smoke run, whose numbers mean little)
    for all of them at once: the same loads, without their waits adding up."""
    if not at_once:
        return [run(contender) for contender in contenders]
    with ThreadPoolExecutor(max_workers=len(contenders)) as pool:
        return list(pool.map(run, contenders))


def alternate(
    contenders: list[Running], concurrency: int, args: argparse.Namespace, workdir: Path
) -> dict[str, Row]:
    """Median row per contender over ``args.rounds`` in which they take turns."""
    per: dict[str, list[Row]] = {c.name: [] for c in contenders}
    if not args.quick:  # whose numbers mean little
        for contender in contenders:  # warm the pools and the caches
            load(contender.url, concurrency, 1.0, workdir)
    # Not 256 connections to each at once: cold on a small machine, they starve each
    # other of answers for longer than a quick run lasts.
    at_once = args.quick and concurrency <= 64
    for _ in range(args.rounds):
        for row in each(
            contenders,
            lambda c: measure(c, concurrency, args.duration, workdir, quick=args.quick),
            at_once=at_once,
        ):
            per[row.contender].append(row)
    medians = {}
    for name, rows in per.items():
        rows.sort(key=lambda r: r.rps)
        medians[name] = rows[len(rows) // 2]
    return medians


def suite_accesslog(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Access log on versus off. Two processes of each: one process of the same code
    can run 10% faster than another here for its whole life (where it lands beside
    wrk and the upstream), which a single pair would read as the log's cost."""
    upstream = start_upstream()
    targets = []
    for replica in (1,) if args.quick else (1, 2):  # a smoke run needs one of each
        targets.append(start_sidecar(f"log-off-{replica}", sidecar_config(upstream.url), workdir))
        log = {"enabled": True, "path": str(workdir / f"access-{replica}.jsonl")}
        targets.append(
            start_sidecar(
                f"log-on-{replica}", sidecar_config(upstream.url, access_log=log), workdir
            )
        )
    isolate(*targets)
    with running(upstream, *targets):
        rows = alternate(targets, args.concurrency, args, workdir)

    def mean_rps(prefix: str) -> float:
        return statistics.fmean(r.rps for name, r in rows.items() if name.startswith(prefix))

    lines = sum(sum(1 for _ in path.open("rb")) for path in workdir.glob("access-*.jsonl"))
    return {
        "rows": [asdict(r) for r in rows.values()],
        "ratios": {
            "access log on / off throughput": round(mean_rps("log-on") / mean_rps("log-off"), 3)
        },
        "notes": [f"access log lines written: {lines}", "ratio of the two processes' means"],
    }


def suite_shadow(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Primary p99 with every request mirrored versus none, against 20 ms models."""
    primary = start_upstream(20.0)
    candidate = start_upstream(20.0)
    plain = start_sidecar("shadow-off", sidecar_config(primary.url), workdir)
    shadowed_config = sidecar_config(primary.url)
    shadowed_config["upstreams"]["candidate"] = {"url": candidate.url, "max_connections": 512}
    shadowed_config["routes"][0]["shadow"] = {
        "upstream": "candidate",
        "fraction": 1.0,
        "max_in_flight": 512,
        "timeout": "5s",
        "compare": {"protocol": "v2", "output": "probabilities", "kind": "label", "classes": 3},
        "governor": {"enabled": False},
    }
    shadowed = start_sidecar("shadow-100%", shadowed_config, workdir)
    rows: dict[str, list[Row]] = {"shadow-off": [], "shadow-100%": []}
    with running(primary, candidate, plain, shadowed):
        if not args.quick:
            for target in (plain, shadowed):  # warm-up
                load_open_loop(target.url, args.rate, 1.0)
        for _ in range(args.rounds):
            for target in (plain, shadowed):
                cpu_before = target.cpu_seconds()
                result = load_open_loop(target.url, args.rate, args.duration)
                cpu = target.cpu_seconds() - cpu_before
                rows[target.name].append(
                    Row.of(target.name, 0, result, cpu_seconds=cpu, rss_mb=target.peak_rss_mb())
                )
    medians = {}
    for name, measured in rows.items():
        measured.sort(key=lambda r: r.p99_ms)
        medians[name] = measured[len(measured) // 2]
    ratio = medians["shadow-100%"].p99_ms / medians["shadow-off"].p99_ms
    return {
        "rows": [asdict(r) for r in medians.values()],
        "ratios": {f"primary p99, 100% shadow / none, at {args.rate:g} req/s": round(ratio, 3)},
        "notes": ["open-loop load at a fixed rate; both models answer in 20 ms"],
    }


# -- the side-by-side suite ------------------------------------------------------------

NGINX_UPSTREAM = """
load_module {echo_module};
worker_processes 1;
error_log {dir}/nginx-upstream-error.log warn;
pid {dir}/nginx-upstream.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/body;
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            default_type application/json;
            {sleep}
            echo '{body}';
        }}
    }}
}}
"""

NGINX_PROXY = """
worker_processes 1;
error_log {dir}/nginx-proxy-error.log warn;
pid {dir}/nginx-proxy.pid;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {dir}/proxy-body;
    upstream model {{ server 127.0.0.1:{upstream}; keepalive 512; }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        location / {{
            proxy_pass http://model;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
        }}
    }}
}}
"""

ENVOY = """
static_resources:
  listeners:
    - address: {{socket_address: {{address: 127.0.0.1, port_value: {port}}}}}
      filter_chains:
        - filters:
            - name: envoy.filters.network.http_connection_manager
              typed_config:
                "@type": type.googleapis.com/envoy.extensions.filters.network.http_connection_manager.v3.HttpConnectionManager
                stat_prefix: bench
                route_config:
                  virtual_hosts:
                    - name: all
                      domains: ["*"]
                      routes: [{{match: {{prefix: "/"}}, route: {{cluster: model, timeout: 30s}}}}]
                http_filters:
                  - name: envoy.filters.http.router
                    typed_config:
                      "@type": type.googleapis.com/envoy.extensions.filters.http.router.v3.Router
  clusters:
    - name: model
      type: STATIC
      circuit_breakers: {{thresholds: [{{max_connections: 100000, max_pending_requests: 100000, max_requests: 100000}}]}}
      load_assignment:
        cluster_name: model
        endpoints: [{{lb_endpoints: [{{endpoint: {{address: {{socket_address: {{address: 127.0.0.1, port_value: {upstream}}}}}}}}}]}}]
"""


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind((LOOPBACK, 0))
        port: int = sock.getsockname()[1]
    return port


def _wait_port(port: int) -> None:
    import socket

    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((LOOPBACK, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.02)
    raise RuntimeError(f"nothing listens on {port}")


def _echo_module() -> str | None:
    for candidate in (
        "/usr/lib/nginx/modules/ngx_http_echo_module.so",
        "/usr/lib64/nginx/modules/ngx_http_echo_module.so",
    ):
        if Path(candidate).exists():
            return candidate
    return None


def start_nginx(name: str, config: str, port: int, workdir: Path) -> Running:
    path = workdir / f"{name}.conf"
    path.write_text(config)
    process = subprocess.Popen(
        ["nginx", "-c", str(path), "-p", str(workdir), "-g", "daemon off;"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
    )
    _wait_port(port)
    return Running(name, process, port)


def fast_upstream(latency_ms: float, workdir: Path) -> Running:
    """NGINX answering a fixed JSON body (with the echo module, also after a delay);
    else the aiohttp stand-in."""
    module = _echo_module()
    if shutil.which("nginx") and module:
        port = _free_port()
        sleep = f"echo_sleep {latency_ms / 1000:.3f};" if latency_ms else ""
        config = NGINX_UPSTREAM.format(
            echo_module=module, dir=workdir, port=port, sleep=sleep, body=ANSWER_JSON
        )
        return start_nginx(f"nginx-upstream-{latency_ms:g}ms", config, port, workdir)
    return start_upstream(latency_ms)


def full_config(upstream: str, workdir: Path) -> dict[str, Any]:
    """Everything a production deployment turns on (the rate limit never limits)."""
    from sidecar.config.schema import bundled_config_dir
    from sidecar.pipeline.auth import hash_key

    config = sidecar_config(
        upstream, access_log={"enabled": True, "path": str(workdir / "full-access.jsonl")}
    )
    config["upstreams"]["model"]["breaker"] = {"enabled": True, "failures": 1000}
    config["routes"][0].update(
        retryable=True,
        validate={
            "content_types": ["application/json"],
            "json": True,
            "schema": str(bundled_config_dir() / "schemas" / "iris-v2-request.json"),
        },
        drift={
            "protocol": "v2",
            "output": "label",
            "baseline": str(bundled_config_dir() / "baselines" / "iris-infer.json"),
            "features": [{"name": "petal_length", "field": "inputs[0].data[2]"}],
        },
    )
    config["auth"] = {
        "enabled": True,
        "api_keys": [{"name": "bench", "digest": hash_key(BENCH_KEY)}],
    }
    config["rate_limit"] = {
        "enabled": True,
        "per_principal": {"rate": "1000000/s", "burst": 1000000},
        "global": {"rate": "1000000/s", "burst": 1000000},
    }
    return config


def _python_proxy(name: str, script: str, upstream: Running) -> Running:
    """One of the Python floors in loadtests/, which print "listening on PORT"."""
    return _spawn(
        name,
        [
            sys.executable,
            str(ROOT / "loadtests" / script),
            "--port",
            "0",
            "--upstream",
            upstream.url,
        ],
        lambda line: int(m.group(1)) if (m := re.match(rb"listening on (\d+)", line)) else None,
    )


def contenders(upstream: Running, workdir: Path, include: set[str]) -> list[Running]:
    out = []
    if "direct" in include:
        out.append(Running("direct", upstream.process, upstream.port))
    if "minimal" in include:
        out.append(_python_proxy("minimal-proxy", "minimal_proxy.py", upstream))
    if "raw" in include:
        out.append(_python_proxy("raw-floor", "raw_proxy.py", upstream))
    if "passthrough" in include:
        out.append(start_sidecar("sidecar-passthrough", sidecar_config(upstream.url), workdir))
    if "full" in include:
        out.append(start_sidecar("sidecar-full", full_config(upstream.url, workdir), workdir))
    if "full-workers" in include:
        out.append(
            start_sidecar(
                "sidecar-full-workers",
                full_config(upstream.url, workdir),
                workdir,
                workers=os.cpu_count() or 1,
            )
        )
    if "nginx" in include and shutil.which("nginx"):
        port = _free_port()
        out.append(
            start_nginx(
                "nginx-proxy",
                NGINX_PROXY.format(dir=workdir, port=port, upstream=upstream.port),
                port,
                workdir,
            )
        )
    envoy = shutil.which("envoy") or shutil.which("envoy", path=str(Path(sys.executable).parent))
    if "envoy" in include and envoy:
        port = _free_port()
        path = workdir / "envoy.yaml"
        path.write_text(ENVOY.format(port=port, upstream=upstream.port))
        process = subprocess.Popen(
            [
                envoy,
                "-c",
                str(path),
                "--concurrency",
                "1",
                "--log-level",
                "error",
                "--base-id",
                str(os.getpid() % 1000),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
        )
        _wait_port(port)
        out.append(Running("envoy", process, port))
    return out


def _pin_single_process(targets: list[Running]) -> None:
    """Each one-process proxy on the proxy core, wrk and the upstream on the others;
    the workers contender keeps every core (one worker per core is its point)."""
    isolate(*[t for t in targets if t.name not in ("direct", "sidecar-full-workers")])


def suite_compare(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    include = set(args.contenders.split(","))
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    fast = fast_upstream(0.0, workdir)
    with running(fast):
        targets = contenders(fast, workdir, include)
        _pin_single_process(targets)
        with running(*[t for t in targets if t.name != "direct"]):
            for concurrency in (1, 16, 64):
                medians = alternate(targets, concurrency, args, workdir)
                rows += medians.values()
                _ratios(ratios, medians, f"c={concurrency}")
    slow = fast_upstream(20.0, workdir)
    with running(slow):
        targets = contenders(slow, workdir, include)
        _pin_single_process(targets)
        with running(*[t for t in targets if t.name != "direct"]):
            medians = alternate(targets, 256, args, workdir)
            for row in medians.values():
                row.contender += " (20ms model)"
            rows += medians.values()
            _ratios(ratios, medians, "c=256 20ms")
            for rate in (200.0, 1000.0):
                for target in targets:
                    result = load_open_loop(target.url, rate, args.duration)
                    rss = target.peak_rss_mb() if target.name != "direct" else float("nan")
                    rows.append(
                        Row.of(
                            f"{target.name} (20ms model, open loop)", int(rate), result, rss_mb=rss
                        )
                    )
    return {
        "rows": [asdict(r) for r in rows],
        "ratios": ratios,
        "notes": [
            "concurrency column = requests/s for open-loop rows",
            "cpu_us_per_request is the proxy's CPU (for direct: the upstream's)",
        ],
    }


def _ratios(out: dict[str, float], medians: dict[str, Row], label: str) -> None:
    direct = medians.get("direct")
    minimal = medians.get("minimal-proxy")
    raw = medians.get("raw-floor")
    for name, row in medians.items():
        if raw is not None and name.startswith("sidecar") and raw.cpu_us_per_request > 0:
            out[f"{label} {name} / raw-floor CPU per request"] = round(
                row.cpu_us_per_request / raw.cpu_us_per_request, 2
            )
    for name, row in medians.items():
        if direct is not None and name != "direct":
            out[f"{label} {name} / direct rps"] = round(row.rps / direct.rps, 3)
        if minimal is not None and name not in ("minimal-proxy", "direct"):
            out[f"{label} {name} / minimal rps"] = round(row.rps / minimal.rps, 3)
            out[f"{label} {name} - minimal p50 ms"] = round(row.p50_ms - minimal.p50_ms, 3)


async def _hold_idle(port: int, count: int) -> list[asyncio.StreamWriter]:
    """``count`` keep-alive client connections, each after one answered request."""
    writers = []
    request = b"GET /v2/health/ready HTTP/1.1\r\nHost: x\r\n\r\n"
    for start in range(0, count, 500):
        pairs = await asyncio.gather(
            *(asyncio.open_connection(LOOPBACK, port) for _ in range(min(500, count - start)))
        )
        for _, writer in pairs:
            writer.write(request)
        for reader, writer in pairs:
            await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
            writers.append(writer)
    return writers


def idle_connections_rss(sidecar: Running, count: int, settle: float = 1.0) -> float:
    """The sidecar's RSS while ``count`` kept-alive client connections sit idle
    (read ``settle`` seconds after the last one was answered)."""

    async def measure() -> float:
        writers = await _hold_idle(sidecar.port, count)
        await asyncio.sleep(settle)
        rss = sidecar.rss_mb()
        for writer in writers:
            writer.close()
        return rss

    return asyncio.run(measure())


def suite_connections(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Peak RSS of the sidecar (everything on) under 1,000 busy client connections,
    and its RSS holding 10,000 idle kept-alive ones."""
    import resource

    idle = 500 if args.quick else 10_000
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, min(hard, 2 * idle + 1024)), hard))
    upstream = fast_upstream(0.0, workdir)
    sidecar = start_sidecar("sidecar-full", full_config(upstream.url, workdir), workdir)
    with running(upstream, sidecar):
        before = sidecar.rss_mb()
        idle_rss = idle_connections_rss(sidecar, idle, settle=0.1 if args.quick else 1.0)
        result = load(sidecar.url, 1000, args.duration, workdir, quick=args.quick)
        row = Row.of("sidecar-full, 1000 connections", 1000, result, rss_mb=sidecar.peak_rss_mb())
    return {
        "rows": [asdict(row)],
        "ratios": {
            "peak RSS MB, 1000 connections": row.peak_rss_mb,
            f"RSS MB, {idle} idle connections": round(idle_rss, 1),
        },
        "notes": [f"RSS before any connection: {before:.1f} MB"],
    }


def suite_soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """A steady open-loop rate for --soak-seconds; RSS at start and end (growth = leak)."""
    upstream = fast_upstream(0.0, workdir)
    sidecar = start_sidecar("sidecar-full", full_config(upstream.url, workdir), workdir)
    rows = []
    with running(upstream, sidecar):
        if not args.quick:
            load_open_loop(sidecar.url, args.rate, min(5.0, args.soak_seconds))  # warm up
        start_rss = sidecar.rss_mb()
        # Minute-long runs (fewer for a short soak), each a row: RSS is read after each.
        runs = max(1, round(args.soak_seconds / 60.0))
        for _ in range(runs):
            result = load_open_loop(sidecar.url, args.rate, args.soak_seconds / runs)
            rows.append(
                Row.of("sidecar-full soak minute", int(args.rate), result, rss_mb=sidecar.rss_mb())
            )
        end_rss = sidecar.rss_mb()
    return {
        "rows": [asdict(r) for r in rows],
        "ratios": {"RSS MB at start": round(start_rss, 1), "RSS MB at end": round(end_rss, 1)},
        "notes": [f"{args.soak_seconds:g} s at {args.rate:g} req/s"],
    }


def suite_features(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """What each feature costs: pass-through, then one feature at a time, then all."""
    import copy

    upstream = fast_upstream(0.0, workdir)
    base = sidecar_config(upstream.url)
    full = full_config(upstream.url, workdir)

    def variant(mutate: Any) -> dict[str, Any]:
        config = copy.deepcopy(base)
        mutate(config)
        return config

    route = full["routes"][0]
    variants = {
        "pass-through": base,
        "+access-log": variant(
            lambda c: c["logging"].update(access_log=full["logging"]["access_log"])
        ),
        "+auth": variant(lambda c: c.update(auth=full["auth"])),
        "+rate-limit": variant(lambda c: c.update(rate_limit=full["rate_limit"])),
        "+validate": variant(lambda c: c["routes"][0].update(validate=route["validate"])),
        "+breaker": variant(
            lambda c: c["upstreams"]["model"].update(breaker=full["upstreams"]["model"]["breaker"])
        ),
        "+drift": variant(lambda c: c["routes"][0].update(drift=route["drift"])),
        "+retries": variant(lambda c: c["routes"][0].update(retryable=True)),
        "everything": full,
    }
    targets = [start_sidecar(name, config, workdir) for name, config in variants.items()]
    isolate(*targets)
    with running(upstream, *targets):
        medians = alternate(targets, args.concurrency, args, workdir)
    base_cpu = medians["pass-through"].cpu_us_per_request
    return {
        "rows": [asdict(r) for r in medians.values()],
        "ratios": {
            f"{name} extra CPU us/request": round(r.cpu_us_per_request - base_cpu, 1)
            for name, r in medians.items()
            if name != "pass-through"
        },
        "notes": ["each sidecar is its own process; per-process noise is about +-20%"],
    }


def suite_lograte(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """The access-log writer alone, default settings, fed access records at fixed rates.

    The sidecar cannot serve 5,000 req/s on a small machine, so the log target is
    measured on the writer itself: does anything get dropped, how full does the
    queue get. Runs in this process, on uvloop, writing to a file.
    """
    import uvloop
    from prometheus_client import CollectorRegistry

    from sidecar.config.schema import LoggingSettings
    from sidecar.telemetry.logwriter import FileSink, LogWriter
    from sidecar.telemetry.metrics import Metrics

    queue_size = LoggingSettings().queue_size

    async def feed(rate: float) -> tuple[Row, float, int]:
        registry = CollectorRegistry()
        writer = LogWriter(
            "access",
            FileSink(workdir / f"lograte-{rate:g}.jsonl"),
            Metrics(registry),
            queue_size=queue_size,
        )
        writer.start()
        loop = asyncio.get_running_loop()
        cpu_before, started = time.process_time(), loop.time()
        sent, peak = 0, 0
        while (elapsed := loop.time() - started) < args.duration:
            while sent < int(elapsed * rate):
                writer.submit(_access_record(sent))
                sent += 1
            peak = max(peak, writer.depth)
            await asyncio.sleep(0.001)
        await writer.stop()
        cpu = time.process_time() - cpu_before
        dropped = sum(
            registry.get_sample_value(
                "sidecar_log_dropped_total", {"log": "access", "reason": reason}
            )
            or 0
            for reason in ("queue_full", "stopped", "unrenderable", "unwritten")
        )
        written = registry.get_sample_value("sidecar_log_written_total", {"log": "access"}) or 0
        row = Row(
            f"log writer @ {rate:g}/s",
            int(rate),
            written / args.duration,
            float("nan"),
            float("nan"),
            int(dropped),
            cpu / max(1, sent) * 1e6,
            float("nan"),
        )
        return row, peak / queue_size, sent

    rows, ratios = [], {}
    for rate in (5000.0, 20000.0, 50000.0):
        row, fill, fed = uvloop.run(feed(rate))
        rows.append(row)
        ratios[f"{rate:g}/s dropped records"] = row.errors
        ratios[f"{rate:g}/s fed records"] = fed
        ratios[f"{rate:g}/s peak queue fill"] = round(fill, 3)
    return {
        "rows": [asdict(r) for r in rows],
        "ratios": ratios,
        "notes": [
            "errors = records dropped; cpu_us_per_request = CPU per record (feeder included)"
        ],
    }


def _access_record(n: int) -> dict[str, Any]:
    """Shaped like the sidecar's access-log record."""
    return {
        "event": "request",
        "timestamp": time.time(),
        "request_id": f"{n:032x}",
        "trace_id": f"{n:032x}",
        "route": "infer",
        "method": "POST",
        "path": "/v2/models/iris/infer",
        "status": 200,
        "outcome": "ok",
        "duration_ms": 1.234,
        "upstream_ms": 1.0,
        "attempts": 1,
        "breaker": "closed",
        "fallback": None,
        "principal": "bench",
        "bytes_in": 88,
        "bytes_out": 213,
    }


def _build_baseline(path: Path) -> None:
    """Compile the checkout at ``path``. This tree's current build is handed over first
    and kept when the checkout's sources are the same (``--ensure`` compares digests):
    against HEAD in a clean tree, the same modules are not compiled twice."""
    spec = importlib.util.spec_from_file_location("build_native", ROOT / "build_native.py")
    assert spec is not None
    assert spec.loader is not None
    build_native = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(build_native)
    built = build_native.built_in_place()
    if built and build_native.stale() is None:
        for file in [*built, build_native.STAMP]:
            copy = path / file.relative_to(ROOT)
            copy.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(file, copy)
    ensured = subprocess.run([sys.executable, "build_native.py", "--ensure"], cwd=path, check=False)
    if ensured.returncode == 2:  # a commit from before --ensure: it builds in place
        subprocess.run([sys.executable, "build_native.py", "--inplace"], cwd=path, check=True)
    elif ensured.returncode != 0:
        raise SystemExit(f"build_native.py failed in the checkout of {path.name}")


@contextmanager
def worktree(ref: str, workdir: Path) -> Iterator[Path]:
    """A detached checkout of ``ref`` (a commit, tag or branch) for the length of a run."""
    path = workdir / "baseline-tree"
    subprocess.run(
        ["git", "worktree", "add", "--detach", "--quiet", str(path), ref], cwd=ROOT, check=True
    )
    if (path / "build_native.py").exists():  # a commit that ships compiled runs compiled
        _build_baseline(path)
    try:
        yield path
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(path)], cwd=ROOT, check=False)


def suite_versus(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """This checkout against an earlier commit (``--against``), same run, same upstream:
    pass-through and everything-on, at c=1 and c=16 and against a 20 ms model at c=256."""
    rows: list[Row] = []
    ratios: dict[str, float] = {}
    with worktree(args.against, workdir) as baseline:
        for latency, levels in ((0.0, (1, 16)), (20.0, (256,))):
            upstream = fast_upstream(latency, workdir)
            with running(upstream):
                targets = []
                for label, source in (("baseline", baseline), ("current", ROOT)):
                    targets.append(
                        start_sidecar(
                            f"{label}-passthrough",
                            sidecar_config(upstream.url),
                            workdir,
                            source=source,
                        )
                    )
                    targets.append(
                        start_sidecar(
                            f"{label}-full",
                            full_config(upstream.url, workdir),
                            workdir,
                            source=source,
                        )
                    )
                isolate(*targets)
                with running(*targets):
                    for concurrency in levels:
                        medians = alternate(targets, concurrency, args, workdir)
                        label = f"c={concurrency}" + (f" {latency:g}ms" if latency else "")
                        for row in medians.values():
                            row.contender += f" ({label})"
                        rows += medians.values()
                        for kind in ("passthrough", "full"):
                            old, new = medians[f"baseline-{kind}"], medians[f"current-{kind}"]
                            ratios[f"{label} {kind} rps current/baseline"] = round(
                                new.rps / old.rps, 3
                            )
                            ratios[f"{label} {kind} CPU us/req current-baseline"] = round(
                                new.cpu_us_per_request - old.cpu_us_per_request, 1
                            )
    return {
        "rows": [asdict(r) for r in rows],
        "ratios": ratios,
        "notes": [f"baseline = {args.against}; current = the working tree"],
    }


PINNED_SUITES = {"accesslog", "compare", "features", "versus"}
SUITES = {
    "features": suite_features,
    "accesslog": suite_accesslog,
    "shadow": suite_shadow,
    "compare": suite_compare,
    "connections": suite_connections,
    "soak": suite_soak,
    "lograte": suite_lograte,
    "versus": suite_versus,
}


def print_report(name: str, report: dict[str, Any]) -> None:
    print(f"\n== {name}")
    columns = [
        "contender",
        "concurrency",
        "rps",
        "p50_ms",
        "p99_ms",
        "errors",
        "cpu_us_per_request",
        "peak_rss_mb",
    ]
    print("  ".join(f"{c:>18}" for c in columns))
    for row in report["rows"]:
        print(
            "  ".join(
                f"{row[c]:>18.2f}" if isinstance(row[c], float) else f"{row[c]!s:>18}"
                for c in columns
            )
        )
    for label, value in report["ratios"].items():
        print(f"{label}: {value}")
    for note in report.get("notes", []):
        print(note)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--suite", choices=sorted(SUITES), action="append")
    parser.add_argument("--duration", type=float, default=5.0, help="seconds per measurement")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0, help="req/s for open-loop suites")
    parser.add_argument("--soak-seconds", type=float, default=600.0)
    parser.add_argument(
        "--contenders",
        default="direct,minimal,raw,passthrough,full,full-workers,nginx,envoy",
        help="for the compare suite",
    )
    parser.add_argument(
        "--against", default="HEAD", help="for the versus suite: the commit to compare with"
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not give the A/B suites' sidecars a core of their own",
    )
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run of the same suites (one round of 0.25 s measurements, wrk's "
        "cut short, no warm-up, a 1 s soak, contenders loaded at once; see README): "
        "checks that every contender starts and answers; its numbers mean little",
    )
    args = parser.parse_args()
    import sidecar

    stale = sidecar.stale_build()
    if stale:  # the sidecar would run compiled modules of older sources
        raise SystemExit(f"{stale}: run `python build_native.py --inplace` (or --clean)")
    if args.quick:
        args.duration = min(args.duration, 0.25)
        args.rounds = 1
        args.soak_seconds = min(args.soak_seconds, 1.0)
    results = {}
    with tempfile.TemporaryDirectory(prefix="sidecar-bench-") as tmp:
        for name in args.suite or ["compare", "accesslog", "shadow"]:
            with load_elsewhere(name in PINNED_SUITES and not args.no_pin):
                results[name] = SUITES[name](args, Path(tmp))
            print_report(name, results[name])
    results["_meta"] = {
        "load": "wrk" if shutil.which("wrk") else "aiohttp",
        "duration_s": args.duration,
        "rounds": args.rounds,
        "cores": os.cpu_count(),
        "statistic": "median of rounds",
    }
    if args.json:
        args.json.write_bytes(orjson.dumps(results, option=orjson.OPT_INDENT_2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
