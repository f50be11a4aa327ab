"""`sidecar run --workers 2`: both serve one port, both drain on SIGTERM, all reload."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import orjson
import yaml
from aiohttp import web

from tests.conftest import LOOPBACK, FakeModel, base_config, end_with_the_test


class Connection:
    """A raw keep-alive HTTP/1.1 connection: which worker holds it is fixed."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> Connection:
        return cls(*await asyncio.open_connection(LOOPBACK, port))

    async def send(self, method: str, path: str) -> None:
        self.writer.write(
            f"{method} {path} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n".encode()
        )
        await self.writer.drain()

    async def answer(self) -> tuple[int, bytes]:
        head = await asyncio.wait_for(self.reader.readuntil(b"\r\n\r\n"), 30)
        lines = head.decode().split("\r\n")
        length = next(
            int(line.split(":")[1]) for line in lines if line.lower().startswith("content-length:")
        )
        body = await asyncio.wait_for(self.reader.readexactly(length), 30)
        return int(lines[0].split()[1]), body

    async def health(self) -> dict[str, object]:
        await self.send("GET", "/health")
        return orjson.loads((await self.answer())[1])  # type: ignore[no-any-return]

    def close(self) -> None:
        self.writer.close()


async def start_workers(
    config_path: Path, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, int]:
    process, port, _admin = await start_workers_with_admin(config_path, env)
    return process, port


async def start_workers_with_admin(
    config_path: Path, env: dict[str, str] | None = None
) -> tuple[asyncio.subprocess.Process, int, int]:
    """Two workers; the supervisor, the main port and the admin port (0: none)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "sidecar",
        "run",
        "--config",
        str(config_path),
        "--workers",
        "2",
        stdout=asyncio.subprocess.PIPE,
        env=env,
    )
    assert process.stdout is not None
    started = 0
    port = admin = 0
    while started < 2:
        record = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 30))
        if record["event"] == "sidecar_started":
            started += 1
            port = int(record["listen"].rsplit(":", 1)[1])
            admin = int(record["admin"].rsplit(":", 1)[1]) if record["admin"] else 0
    return process, port, admin


async def one_connection_per_worker(port: int) -> dict[int, Connection]:
    by_pid: dict[int, Connection] = {}
    for _ in range(200):  # the kernel spreads connections; 200 tries cannot all miss one
        connection = await Connection.open(port)
        pid = int((await connection.health())["pid"])  # type: ignore[call-overload]
        if pid in by_pid:
            connection.close()
        else:
            by_pid[pid] = connection
        if len(by_pid) == 2:
            return by_pid
    raise AssertionError("only one worker answered")


async def test_two_workers_serve_drain_and_reload_together(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    arrived = asyncio.Event()
    release = asyncio.Event()
    slow_hits = []

    async def slow(request: web.Request) -> web.Response:
        slow_hits.append(1)
        if len(slow_hits) == 2:
            arrived.set()
        await release.wait()
        return web.json_response({"done": True})

    fake_model.on("/slow", slow)
    config = base_config(fake_model.url, admin={"enabled": False})
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process, port = await start_workers(config_path)
    connections: dict[int, Connection] = {}
    try:
        connections = await one_connection_per_worker(port)
        before = {pid: (await c.health())["config_sha256"] for pid, c in connections.items()}

        # Every worker reloads on SIGHUP to the supervisor.
        config["routes"][0]["timeout"] = "7s"
        config_path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGHUP)
        for pid, connection in connections.items():
            for _ in range(100):  # bounded: until this worker has swapped
                if (await connection.health())["config_sha256"] != before[pid]:
                    break
                await asyncio.sleep(0.05)
            else:
                raise AssertionError(f"worker {pid} did not reload")
        # The scrape (summed over workers) names the config in service, not the old one.
        after = {str((await c.health())["config_sha256"]) for c in connections.values()}
        for connection in connections.values():
            await connection.send("GET", "/metrics")
            text = (await connection.answer())[1].decode()
            assert [
                line.split('sha256="')[1].split('"')[0]
                for line in text.splitlines()
                if line.startswith("sidecar_config_info{")
            ] == sorted(after)

        # A slow request in flight on each worker, then SIGTERM: both finish.
        for connection in connections.values():
            await connection.send("POST", "/slow")
        await asyncio.wait_for(arrived.wait(), 30)
        process.send_signal(signal.SIGTERM)
        assert process.stdout is not None
        draining = 0
        while draining < 2:  # both workers are draining while their requests are held
            record = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 30))
            draining += record["event"] == "sidecar_draining"
        release.set()
        for connection in connections.values():
            status, body = await connection.answer()
            assert status == 200
            assert orjson.loads(body) == {"done": True}
        assert await asyncio.wait_for(process.wait(), 30) == 0
    finally:
        for connection in connections.values():
            connection.close()
        await end_with_the_test(process)


async def test_workers_stop_when_their_supervisor_is_killed_and_the_next_removes_its_folder(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(base_config(fake_model.url, admin={"enabled": False})))
    temp = tmp_path / "tmp"
    temp.mkdir()
    env = {**os.environ, "TMPDIR": str(temp)}
    process, port = await start_workers(config_path, env)
    connections = await one_connection_per_worker(port)
    workers = list(connections)
    for connection in connections.values():
        connection.close()
    process.kill()  # SIGKILL: the supervisor cannot pass anything on
    await asyncio.wait_for(process.wait(), 30)
    for pid in workers:
        for _ in range(300):  # bounded: until the orphan has drained and exited
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            await asyncio.sleep(0.05)
        else:
            os.kill(pid, signal.SIGKILL)
            raise AssertionError(f"worker {pid} kept running without its supervisor")

    # Its folder (the workers' metric files) outlived it; the next supervisor
    # removes it, and leaves alone one whose process lives (this test's).
    left = [path.name for path in temp.iterdir()]
    assert [name.split("-")[2] for name in left] == [str(process.pid)]
    alive = temp / f"sidecar-metrics-{os.getpid()}-other"
    alive.mkdir()
    process, _ = await start_workers(config_path, env)
    try:
        names = sorted(path.name for path in temp.iterdir())
        assert left[0] not in names
        assert alive.name in names
        assert [name.split("-")[2] for name in names if name != alive.name] == [str(process.pid)]
    finally:
        process.terminate()
        await asyncio.wait_for(process.wait(), 30)
    assert [path.name for path in temp.iterdir()] == [alive.name]


def children(pid: int) -> set[int]:
    """The processes whose parent is ``pid`` (from /proc)."""
    found = set()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        if int(fields[1]) == pid:
            found.add(int(stat.parent.name))
    return found


async def test_a_reload_while_a_worker_restarts_does_not_kill_it(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    """SIGHUP is passed on to every worker, also one still starting (restarted after
    a crash): it used to die of it (SIGHUP's default action, its handler not yet
    installed), spending a restart; a few reloads then stopped every worker."""
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(base_config(fake_model.url, admin={"enabled": False})))
    process, _port = await start_workers(config_path)
    assert process.stdout is not None
    try:
        first = children(process.pid)
        os.kill(min(first), signal.SIGKILL)
        for _ in range(100):  # bounded: until the supervisor has started a new worker
            restarted = children(process.pid) - first
            if restarted:
                break
            await asyncio.sleep(0.05)
        else:
            raise AssertionError("the killed worker was not restarted")
        (worker,) = restarted
        process.send_signal(signal.SIGHUP)  # while that worker is starting
        # Bounded by the timeout: until the restarted worker serves and both workers
        # have reloaded (the restarted one once it could: the SIGHUP waited for it).
        served, reloads = False, 0
        while not served or reloads < 2:
            record = orjson.loads(await asyncio.wait_for(process.stdout.readline(), 30))
            served = served or (record["event"] == "sidecar_started" and record["pid"] == worker)
            reloads += record["event"] == "config_reloaded"
        os.kill(worker, 0)  # alive
        assert children(process.pid) == (first - {min(first)}) | {worker}
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
    finally:
        await end_with_the_test(process)


async def next_event(process: asyncio.subprocess.Process, event: str) -> dict[str, object]:
    """The next log line of ``event`` the workers write (bounded by the timeout)."""
    assert process.stdout is not None
    while True:
        line = await asyncio.wait_for(process.stdout.readline(), 30)
        assert line, f"the sidecar exited before it logged {event}"
        record = orjson.loads(line)
        if record["event"] == event:
            return record  # type: ignore[no-any-return]


async def test_a_reload_over_http_with_workers_is_logged_counted_and_refused_while_draining(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    """With workers, POST /-/reload is checked by the worker that gets it before the
    supervisor tells all to reload. That check used to return an invalid config's
    errors without logging or counting them (sidecar_config_reloads_total had no
    invalid sample), and to answer 200 "ok" while the sidecar drained (every worker
    then ignored the reload): README says 503."""
    config = base_config(fake_model.url, server={"drain_timeout": "5s", "drain_delay": "30s"})
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process, _port, admin = await start_workers_with_admin(config_path)
    connection = await Connection.open(admin)
    try:
        config_path.write_text(yaml.safe_dump({**config, "bogus": 1}))
        await connection.send("POST", "/-/reload")
        status, body = await connection.answer()
        assert (status, orjson.loads(body)["result"]) == (400, "invalid")
        await connection.send("GET", "/metrics")
        text = (await connection.answer())[1].decode()
        assert 'sidecar_config_reloads_total{result="invalid"} 1.0' in text.splitlines()
        error = await next_event(process, "config_reload_error")
        assert error["path"] == "bogus"

        config_path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGTERM)  # the admin listener serves on while draining
        for _ in range(2):
            await next_event(process, "sidecar_draining")
        await connection.send("POST", "/-/reload")
        status, body = await connection.answer()
        assert (status, orjson.loads(body)["result"]) == (503, "ignored")
        process.send_signal(signal.SIGTERM)  # a second one cuts the drain delay short
        await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
    finally:
        connection.close()
        await end_with_the_test(process)


async def health_of(port: int, pid: int) -> dict[str, object]:
    """/health as answered by the worker ``pid`` (the kernel picks a worker per
    connection: 200 tries cannot all miss one of two)."""
    for _ in range(200):
        connection = await Connection.open(port)
        try:
            health = await connection.health()
        finally:
            connection.close()
        if health["pid"] == pid:
            return health
    raise AssertionError(f"worker {pid} never answered")


async def test_a_restarted_worker_serves_the_config_in_service_not_the_file(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    """A worker that dies is replaced with the config the others serve. The
    replacement used to read the file as it was then: one edited but not reloaded
    put two configs in service side by side, and one a reload had refused (every
    worker kept the old) could not start at all, so after five tries the supervisor
    stopped every worker: a broken file on disk and one crash took the port down."""
    config = base_config(fake_model.url, admin={"enabled": False})
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))
    process, port = await start_workers(config_path)
    try:
        workers = sorted(children(process.pid))
        config["routes"][0]["timeout"] = "7s"
        config_path.write_text(yaml.safe_dump(config))
        process.send_signal(signal.SIGHUP)
        for _ in range(2):
            reloaded = await next_event(process, "config_reloaded")
        in_service = reloaded["sha256"]

        # Edited, not reloaded: the replacement serves what the other worker serves.
        config["routes"][0]["timeout"] = "9s"
        config_path.write_text(yaml.safe_dump(config))
        os.kill(workers[0], signal.SIGKILL)
        started = await next_event(process, "sidecar_started")
        assert started["config_sha256"] == in_service
        assert (await health_of(port, int(started["pid"])))["config_sha256"] == in_service  # type: ignore[call-overload]

        # A broken file a reload refused: the next replacement starts all the same.
        config_path.write_text(yaml.safe_dump({**config, "bogus": 1}))
        process.send_signal(signal.SIGHUP)
        for _ in range(2):
            await next_event(process, "config_reload_error")
        os.kill(workers[1], signal.SIGKILL)
        started = await next_event(process, "sidecar_started")
        assert started["config_sha256"] == in_service
        assert (await health_of(port, int(started["pid"])))["config_sha256"] == in_service  # type: ignore[call-overload]
        assert process.returncode is None
        process.send_signal(signal.SIGTERM)
        await asyncio.wait_for(process.communicate(), 30)
        assert process.returncode == 0
    finally:
        await end_with_the_test(process)
