"""Log writing off the hot path: a bounded queue and a background writer.

A request only calls ``submit()``: an append to a bounded deque, never I/O and never
an await. When the queue is full the record is dropped and counted
(``sidecar_log_dropped_total{log,reason="queue_full"}``); the request is not delayed.
The writer task wakes, lingers ``linger`` seconds so records gather (one thread hand-off per batch,
not per request), renders them to JSON lines (orjson) and writes each batch from a
worker thread, so even a stalled disk or a blocked stdout pipe cannot stall the
event loop. ``stop()`` flushes what was accepted.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import math
import os
import select
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, MutableMapping
from pathlib import Path
from queue import SimpleQueue
from typing import Any, BinaryIO, Final, Protocol

import orjson
from mypy_extensions import mypyc_attr

from sidecar.background import BackgroundTasks
from sidecar.telemetry.metrics import Metrics

# Records are dicts rendered here, in the writer, or bytes a caller already rendered.
Record = MutableMapping[str, Any] | bytes

# RFC 3339 UTC timestamps ("...Z") and the newline come from orjson itself; anything
# it cannot encode is written as its repr rather than failing the batch.
_RENDER_OPTIONS: Final = orjson.OPT_APPEND_NEWLINE | orjson.OPT_UTC_Z


def render(record: Record) -> bytes:
    if isinstance(record, bytes):
        return record if record.endswith(b"\n") else record + b"\n"
    # A variable typed dict: the lookups below compile to dict calls, not generic ones.
    fields: dict[str, Any] = record if isinstance(record, dict) else dict(record)
    # Taken as a float on the hot path; written out here, off it. One that is no time
    # of years 1 to 9999 (NaN, say) stays a number: a bad record is not a lost batch.
    timestamp = fields.get("timestamp")
    if isinstance(timestamp, float) and _YEAR_1 <= timestamp < _YEAR_10000:
        fields["timestamp"] = _UTC_TIMESTAMPS.format(timestamp)
    return _dumps(fields, default=repr, option=_RENDER_OPTIONS)


_dumps: Final = orjson.dumps


_YEAR_1: Final = -62_135_596_800.0  # 0001-01-01T00:00:00Z
_YEAR_10000: Final = 253_402_300_799.0  # 9999-12-31T23:59:59Z: its fraction may round up


class _Rfc3339:
    """A POSIX timestamp as orjson writes a UTC datetime (``2026-12-06T18:33:00Z``,
    ``...:00.123457Z``), its date and time of day formatted once a second: a
    datetime made for each record was two thirds of rendering one."""

    def __init__(self) -> None:
        self._second = _NO_SECOND
        self._prefix = ""

    def format(self, timestamp: float) -> str:
        # Rounded as datetime.fromtimestamp rounds: to the microsecond, half to even.
        second = int(timestamp)
        micros = _round_half_even((timestamp - second) * 1_000_000.0)
        if micros >= 1_000_000:
            second, micros = second + 1, micros - 1_000_000
        elif micros < 0:  # before 1970: int() took the second towards zero
            second, micros = second - 1, micros + 1_000_000
        if second != self._second:
            self._second = second
            t = time.gmtime(second)  # strftime's %Y has no leading zeros before 1000
            self._prefix = (
                f"{t.tm_year:04d}-{t.tm_mon:02d}-{t.tm_mday:02d}"
                f"T{t.tm_hour:02d}:{t.tm_min:02d}:{t.tm_sec:02d}"
            )
        if not micros:
            return self._prefix + "Z"
        # One f-string, one new string (a chain of + made one per step).
        return f"{self._prefix}.{_DIGITS3[micros // 1000]}{_DIGITS3[micros % 1000]}Z"


_NO_SECOND: Final = -(1 << 62)  # no timestamp's second: the first one formats


def _round_half_even(value: float) -> int:
    """``round(value)`` for a float: compiled, round() is a builtin looked up and
    called per record."""
    floor = math.floor(value)
    rest = value - floor
    if rest > 0.5 or (rest == 0.5 and floor % 2 == 1):
        return floor + 1
    return floor


_UTC_TIMESTAMPS: Final = _Rfc3339()
# "000" to "999": six digits of microseconds are two of these (an int's formatting
# is a generic call in compiled code, a concatenation is not).
_DIGITS3: Final = [f"{n:03d}" for n in range(1000)]


class Sink(Protocol):
    def write(self, data: bytes) -> None: ...

    def close(self) -> None: ...


class StreamSink:
    """A stream such as stdout; it is flushed, never closed."""

    def __init__(self, stream: BinaryIO | None = None) -> None:
        self._stream = stream if stream is not None else sys.stdout.buffer

    def write(self, data: bytes) -> None:
        self._stream.write(data)
        self._stream.flush()

    def close(self) -> None:
        self._stream.flush()


class FileSink:
    """An append-only file, rotated to ``path.1`` .. ``path.N`` past ``max_bytes``.
    Opened again when ``path`` no longer names the open file (deleted, or moved away
    by an outside logrotate): writes to a file nobody can see would be lost."""

    def __init__(self, path: Path, *, max_bytes: int = 0, backups: int = 3) -> None:
        self.path = path
        self._max_bytes = max_bytes
        self._backups = backups
        path.parent.mkdir(parents=True, exist_ok=True)
        self._file: BinaryIO = path.open("ab")
        self._size = self._file.tell()

    def write(self, data: bytes) -> None:
        if not self._still_there():
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file.close()
            self._file = self.path.open("ab")
            self._size = self._file.tell()
        if self._max_bytes and self._size and self._size + len(data) > self._max_bytes:
            self._rotate()
        self._file.write(data)
        self._file.flush()
        self._size += len(data)

    def _still_there(self) -> bool:
        """Whether ``path`` is the open file (two stats a batch, not a record)."""
        try:
            named = os.stat(self.path)
        except FileNotFoundError:
            return False
        opened = os.fstat(self._file.fileno())
        return (named.st_dev, named.st_ino) == (opened.st_dev, opened.st_ino)

    def _rotate(self) -> None:
        self._file.close()
        for index in range(self._backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{index}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{index + 1}"))
        if self._backups and self.path.exists():  # it may have been deleted meanwhile
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))
        # Its folder too, perhaps: made again, as at start. Until this works, every
        # write comes back here (the size is still over the limit) and tries again.
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = self.path.open("wb")
        self._size = 0

    def close(self) -> None:
        self._file.close()


class _SinkThread:
    """One daemon thread per log that does its writes. A sink blocked for good (a pipe
    nobody reads) then blocks only this thread, and cannot keep the process from
    exiting: the default executor's threads are joined at exit, and would."""

    def __init__(self, name: str) -> None:
        self._jobs: SimpleQueue[
            tuple[Callable[[], None], asyncio.AbstractEventLoop, asyncio.Future[None]] | None
        ] = SimpleQueue()
        self._worker = threading.Thread(target=self._work, name=f"log-{name}", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        while (job := self._jobs.get()) is not None:
            call, loop, done = job
            error: BaseException | None = None
            try:
                call()
            except BaseException as exc:  # noqa: BLE001 - handed to the waiting task
                error = exc
            with contextlib.suppress(RuntimeError):  # the loop may be gone at exit
                loop.call_soon_threadsafe(_settle, done, error)

    def submit(self, call: Callable[[], None]) -> asyncio.Future[None]:
        """Hand ``call`` to the thread; the future settles when it has run (jobs run
        in the order they were handed over)."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future[None] = loop.create_future()
        self._jobs.put((call, loop, done))
        return done

    async def run(self, call: Callable[[], None]) -> None:
        await self.submit(call)

    def close(self) -> None:
        self._jobs.put(None)


def _settle(done: asyncio.Future[None], error: BaseException | None) -> None:
    if done.done():
        return
    if error is None:
        done.set_result(None)
    else:
        done.set_exception(error)


# Seconds a stopping writer waits for its sink to close, after the flush.
CLOSE_WITHIN: Final = 1.0

# A sink that fails is retried after these many seconds (then the batch is dropped,
# and counted): a full disk or a closed stdout costs records, never the writer.
RETRY_DELAYS = (0.1, 0.5, 2.0)


# Seconds of rendering between two passes of the event loop.
RENDER_SLICE: Final = 0.0001
# The clock is read after this many bytes of records (by the size they were submitted
# with): every eighth access record, after every large payload record.
CLOCK_EVERY_BYTES: Final = 4096


class LogWriter:
    def __init__(
        self,
        name: str,
        sink: Sink,
        metrics: Metrics,
        *,
        queue_size: int = 10_000,
        queue_bytes: int = 64 * 1024 * 1024,
        batch_size: int = 2048,
        linger: float = 0.1,
        renderer: Callable[[Record], bytes] = render,
        retry_delays: tuple[float, ...] = RETRY_DELAYS,
    ) -> None:
        self.name = name
        self._sink = sink
        self._queue: deque[tuple[Record, int]] = deque()
        self._queue_size = queue_size
        self._queue_bytes = queue_bytes
        self._bytes = 0
        self._batch_size = batch_size
        self._linger = linger
        self._render = renderer
        self._retry_delays = retry_delays
        self._wakeup = asyncio.Event()
        # Whether _wakeup is set, read per record without Event.is_set's interpreted call.
        self._woken = False
        self._full_batch = asyncio.Event()
        self._tasks = BackgroundTasks()
        self._task: asyncio.Task[None] | None = None
        self._worker: _SinkThread | None = None
        self._stopping = False
        self._closed = False
        self._writing = 0  # records of the batch being written now
        self._write_job: asyncio.Future[None] | None = None  # its latest hand-off
        self._render_failed = False  # a record failed to render (said once)
        self.failing = False  # the last write failed
        self.last_error: str | None = None
        # Why a record was lost: refused at submit (the queue full, or the writer
        # stopped), failed to render, or its batch never reached the sink.
        self._dropped = metrics.log_dropped.labels(name, "queue_full")
        self._dropped_stopped = metrics.log_dropped.labels(name, "stopped")
        self._unrenderable = metrics.log_dropped.labels(name, "unrenderable")
        self._unwritten = metrics.log_dropped.labels(name, "unwritten")
        self._written = metrics.log_written.labels(name)
        self._depth = metrics.log_queue_depth.labels(name)

    # -- the hot path -------------------------------------------------------------

    def submit(self, record: Record, size: int = 512) -> bool:
        """Queue a record of about ``size`` bytes held; False (and counted) when the
        queue is full, in records or in bytes. Never blocks."""
        if len(self._queue) >= self._queue_size or self._bytes + size > self._queue_bytes:
            self._dropped.inc()
            return False
        if self._closed:
            self._dropped_stopped.inc()
            return False
        self._queue.append((record, size))
        self._bytes += size
        if not self._woken:
            self._woken = True
            self._wakeup.set()
        elif len(self._queue) >= self._batch_size and not self._full_batch.is_set():
            self._full_batch.set()  # no need to linger any longer
        return True

    # -- the writer ---------------------------------------------------------------

    @property
    def depth(self) -> int:
        return len(self._queue)

    @property
    def capacity(self) -> int:
        return self._queue_size

    @property
    def fill(self) -> float:
        """How full the queue is, by records or by bytes, whichever is fuller."""
        return max(len(self._queue) / self._queue_size, self._bytes / self._queue_bytes)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    def start(self) -> None:
        self._worker = _SinkThread(self.name)
        self._task = self._tasks.spawn(self._run(), name=f"log-writer-{self.name}")

    async def _run(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._stopping and len(self._queue) < self._batch_size:
                # Let records gather (one thread hand-off per batch, not per request),
                # until the linger ends or a full batch is waiting.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self._linger):
                        await self._full_batch.wait()
            self._wakeup.clear()
            self._woken = False
            self._full_batch.clear()
            await self._write_all()
            if self._stopping and not self._queue:
                # No await between this check and here: nothing accepted is left behind.
                self._closed = True
                return

    async def _write_all(self) -> None:
        # Only what is queued now: records arriving meanwhile wait for the next linger,
        # so a busy sidecar hands the thread one batch per linger, not one per write
        # (back-to-back hand-offs cost the request path about 8% in throughput).
        pending = len(self._queue)
        while pending > 0 and self._queue:
            self._depth.set(len(self._queue))
            size = min(self._batch_size, pending, len(self._queue))
            pending -= size
            batch = [self._queue.popleft() for _ in range(size)]
            self._bytes -= sum(held for _, held in batch)
            # Records not yet counted, settled by stop() if the writer is stopped now.
            self._writing = len(batch)
            self._write_job = None
            data = await self._rendered(batch)
            if await self._write(data):
                self._written.inc(self._writing)
            else:
                self._unwritten.inc(self._writing)
            self._writing = 0
        self._depth.set(0)

    async def _rendered(self, batch: list[tuple[Record, int]]) -> bytes:
        """The batch as lines, rendered with a pass of the event loop whenever
        ``RENDER_SLICE`` seconds of rendering have gone by: a whole batch at once held
        every request up for milliseconds (the access log's p99 was 15 ms where
        requests took 2; with 0.5 ms slices it was still 0.90 ms against 0.41 at
        c=1, 0.53 with 0.1 ms), and payload records with large bodies cost half a
        millisecond each, so the slices are timed, not counted (the clock is read every
        ``CLOCK_EVERY_BYTES`` of records: an access record takes microseconds)."""
        render = self._render
        clock = time.perf_counter
        # Appended to one buffer and let go at once: a few thousand rendered lines
        # kept alive until a join cost 6-7 us each, not 1, in page faults (orjson
        # allocates each output large, then shrinks it).
        lines = bytearray()
        until = clock() + RENDER_SLICE
        unclocked = 0  # bytes of records rendered since the clock was read
        for record, size in batch:
            try:
                lines += render(record)
            except Exception as exc:  # noqa: BLE001 - one record lost, not the batch
                self._unrenderable.inc()
                self._writing -= 1
                if not self._render_failed:
                    self._render_failed = True
                    print(
                        f"sidecar: log {self.name}: a record failed to render: {exc!r}"[:300],
                        file=sys.stderr,
                    )
            unclocked += size
            if unclocked >= CLOCK_EVERY_BYTES:
                unclocked = 0
                if clock() >= until:
                    await asyncio.sleep(0)
                    until = clock() + RENDER_SLICE
        return bytes(lines)

    async def _write(self, data: bytes) -> bool:
        """Write one batch, retrying a failing sink with backoff; False when it
        could not be written."""
        assert self._worker is not None
        for delay in (*self._retry_delays, None):
            try:
                # Shielded: a writer stopped meanwhile leaves the write to finish in the
                # thread, and stop() learns from the job whether it did.
                self._write_job = self._worker.submit(functools.partial(self._sink.write, data))
                await asyncio.shield(self._write_job)
            except (OSError, ValueError) as exc:  # a full disk, a closed stream
                if not self.failing:
                    print(f"sidecar: log {self.name}: cannot write: {exc}", file=sys.stderr)
                self.failing = True
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                if delay is None or self._stopping:
                    return False
                pause = delay
            else:
                self.failing = False
                return True
            # Outside the except clause: compiled code closed while suspended in one
            # leaves its error as the thread's (tests/unit/test_native_exceptions.py).
            await asyncio.sleep(pause)
        return False

    async def stop(self, flush_within: float = 10.0) -> None:
        """Write everything accepted so far (for up to ``flush_within`` s), then close
        (for up to ``CLOSE_WITHIN`` more): a stuck sink must not hold a pod's shutdown
        past its grace period. Whatever cannot be written is counted as dropped."""
        self._stopping = True
        self._woken = True
        self._wakeup.set()
        if self._task is not None and not self._task.done():
            stuck = False
            try:
                async with asyncio.timeout(flush_within):
                    await asyncio.shield(self._task)
            except TimeoutError:
                stuck = True
            if stuck:  # awaited outside the except clause, as in _write
                await self._tasks.stop()
        self._closed = True
        self._unwritten.inc(len(self._queue))
        self._queue.clear()
        self._bytes = 0
        in_flight, self._writing = self._writing, 0
        thread = self._worker
        if thread is not None:
            # The close has a moment of its own: a write still in the thread when the
            # flush gave up may finish, and its batch then counts as written.
            with contextlib.suppress(TimeoutError, OSError, ValueError):
                async with asyncio.timeout(min(CLOSE_WITHIN, flush_within)):
                    await thread.run(self._sink.close)
            thread.close()
        if in_flight:
            # A batch the stopped writer had handed to the thread: written if its job
            # has finished without error (the close ran after it), else lost.
            job = self._write_job
            if job is not None and job.done() and not job.cancelled() and job.exception() is None:
                self._written.inc(in_flight)
            else:
                self._unwritten.inc(in_flight)


# How long a line logged after the event writer stopped may wait for stdout.
_LAST_LINES_WAIT: Final = 1.0


def write_unless_stuck(fd: int, data: bytes, wait: float) -> bool:
    """Write ``data`` to ``fd`` in pieces that never block once ``fd`` polls writable
    (at most PIPE_BUF bytes: a pipe with room takes them whole), waiting at most
    ``wait`` seconds in all for room; False when the rest had to be let go."""
    deadline = time.monotonic() + wait
    view = memoryview(data)
    try:
        while view:
            left = deadline - time.monotonic()
            if left < 0 or not select.select([], [fd], [], left)[1]:
                return False
            written = os.write(fd, view[: select.PIPE_BUF])
            view = view[written:]
    except (OSError, ValueError):
        return False
    return True


@mypyc_attr(native_class=False)  # structlog keeps a weak reference to its file
class QueueFile:
    """A write-only binary 'file' for structlog's BytesLogger that feeds a LogWriter.

    Event log lines (warnings, state changes) take the same off-the-loop route as
    access records. Before a writer is attached (start-up, CLI errors) they go
    straight to stdout.
    """

    def __init__(self) -> None:
        self.writer: LogWriter | None = None
        self.served = False  # a writer was attached once: the sidecar has served

    def attach(self, writer: LogWriter | None) -> None:
        self.writer = writer
        if writer is not None:
            self.served = True

    def write(self, data: bytes) -> int:
        writer = self.writer
        if writer is not None and writer.alive:
            writer.submit(bytes(data))
        elif self.served:
            # Once the writer has stopped (the last lines of a shutdown), a stdout
            # nobody reads must not keep the process from exiting: wait a little for
            # room in it, then let the line go.
            write_unless_stuck(sys.stdout.fileno(), bytes(data), _LAST_LINES_WAIT)
        else:
            sys.stdout.buffer.write(data)
            sys.stdout.buffer.flush()
        return len(data)

    def flush(self) -> None:
        pass
