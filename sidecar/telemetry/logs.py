"""The sidecar's logs: structured event lines and the access log, both off the hot path.

    events   structlog lines (start, state changes, warnings) -> stdout
    access   one JSON line per request                      -> stdout or a file
    payload  sampled request and response bodies (optional) -> a file

Each is a ``LogWriter``: bounded queue, batched writes from a thread, drops counted.
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Mapping, MutableMapping
from contextvars import ContextVar
from typing import Any, Final, Protocol

import orjson
import structlog

from sidecar.config.schema import ConfigError, ConfigIssue, LoadedConfig, PayloadLogSettings
from sidecar.config.tensors import read_v2
from sidecar.telemetry.logwriter import (
    FileSink,
    LogWriter,
    QueueFile,
    Record,
    Sink,
    StreamSink,
    render,
)
from sidecar.telemetry.metrics import Metrics
from sidecar.telemetry.redaction import Redactor


class RequestFields(Protocol):
    """What log lines carry of the request in hand (``pipeline.context.RequestContext``)."""

    request_id: str
    sidecar_id: str
    trace_id: str
    principal: str | None


# The request being handled by the current task (and the tasks it spawned).
CURRENT_REQUEST: Final[ContextVar[RequestFields | None]] = ContextVar(
    "sidecar_request", default=None
)


def add_request_fields(
    logger: Any, method: str, event: MutableMapping[str, Any]
) -> MutableMapping[str, Any]:
    """structlog processor: the current request's ids (and principal) on every line.

    Read from the context when a line is logged, so a request pays one ContextVar
    set instead of binding each field, and nothing carries over to the next
    request on a kept-alive connection.
    """
    ctx = CURRENT_REQUEST.get()
    if ctx is not None:
        event.setdefault("request_id", ctx.request_id)
        event.setdefault("sidecar_id", ctx.sidecar_id)
        event.setdefault("trace_id", ctx.trace_id)
        if ctx.principal is not None:
            event.setdefault("principal", ctx.principal)
    return event


_LEVELS: Final = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

# structlog writes into this; a running sidecar attaches its event writer to it.
EVENT_STREAM: Final = QueueFile()


def configure_logging(level: str = "info") -> None:
    structlog.configure(
        processors=[
            add_request_fields,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            structlog.processors.JSONRenderer(serializer=orjson.dumps),
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.BytesLoggerFactory(EVENT_STREAM),  # type: ignore[arg-type]
        cache_logger_on_first_use=True,
    )
    # Other libraries' loggers (asyncio's, for one) go to stderr as plain text.
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)


def _sink(loaded: LoadedConfig, key: str, path: str, max_bytes: int | None, backups: int) -> Sink:
    if path == "-":
        return StreamSink()
    file = loaded.resolve(path)
    try:
        return FileSink(file, max_bytes=max_bytes or 0, backups=backups)
    except OSError as exc:
        issue = ConfigIssue(key, f"cannot open {file}: {exc.strerror}")
        raise ConfigError(str(loaded.path), [issue]) from None


def payload_renderer(settings: PayloadLogSettings, redactor: Redactor) -> Any:
    """Bodies are kept as bytes on the hot path; decoding and redaction happen here."""
    limit = settings.max_body_size

    def decode(body: bytes, json_head: int | None) -> Any:
        if len(body) > limit:
            return {"truncated": True, "size": len(body)}
        try:
            # A binary V2 body is written as the JSON it stands for (config.tensors).
            return redactor.json(read_v2(body, json_head, as_lists=True))
        except ValueError:
            return {"non_json": True, "size": len(body)}

    def render_payload(record: Record) -> bytes:
        if not isinstance(record, dict):
            return render(record)
        sizes = {side: len(record[side]) for side in _SIDES}
        heads = record.pop(JSON_HEADS, None) or (None, None)
        for side, json_head in zip(_SIDES, heads, strict=True):
            record[side] = decode(record[side], json_head)
        try:
            return render(record)
        except orjson.JSONEncodeError:
            # orjson reads 1024 levels but writes 254: a body nested deeper than that
            # cost the whole record, and with it the request's join to its label. Such
            # a body is written as its (redacted) JSON text instead.
            for side in _SIDES:
                try:
                    orjson.dumps(record[side])
                except orjson.JSONEncodeError:
                    record[side] = {
                        "too_deep": True,
                        "size": sizes[side],
                        "json": deep_json_text(record[side]),
                    }
            return render(record)

    return render_payload


_SIDES: Final = ("request", "response")
# A payload record's key (not written) for its bodies' JSON head lengths, when either
# carries binary V2 tensors: (request's, response's).
JSON_HEADS: Final = "json_heads"


def deep_json_text(document: Any) -> str:
    """JSON text of a decoded document however deep, without recursion (its leaves
    are what ``orjson.loads`` gives: strings, numbers, booleans and null)."""
    out: list[str] = []
    # Containers still to write, and (tuples) text to write as it is.
    stack: list[Any] = [document]
    while stack:
        item = stack.pop()
        if isinstance(item, tuple):
            out.append(item[0])
        elif isinstance(item, dict):
            parts: list[Any] = [("{",)]
            for index, (key, value) in enumerate(item.items()):
                parts.append((("," if index else "") + orjson.dumps(key).decode() + ":",))
                parts.append(value)
            parts.append(("}",))
            stack.extend(reversed(parts))
        elif isinstance(item, list):
            parts = [("[",)]
            for index, value in enumerate(item):
                if index:
                    parts.append((",",))
                parts.append(value)
            parts.append(("]",))
            stack.extend(reversed(parts))
        else:
            out.append(orjson.dumps(item, default=repr).decode())
    return "".join(out)


class Logs:
    """The log writers of one sidecar. ``sinks`` replaces a log's sink by name (tests)."""

    def __init__(
        self, loaded: LoadedConfig, metrics: Metrics, sinks: Mapping[str, Sink] | None = None
    ) -> None:
        settings = loaded.config.logging
        size = settings.queue_size
        budget = settings.queue_bytes
        self.flush_timeout = settings.flush_timeout
        given = dict(sinks or {})
        self.events = LogWriter(
            "events",
            given.get("events") or StreamSink(),
            metrics,
            queue_size=size,
            queue_bytes=budget,
        )
        access = settings.access_log
        self.access: LogWriter | None = None
        if access.enabled:
            sink = given.get("access") or _sink(
                loaded, "logging.access_log.path", access.path, access.max_bytes, access.backups
            )
            self.access = LogWriter("access", sink, metrics, queue_size=size, queue_bytes=budget)
        self.payload: LogWriter | None = None
        if settings.payload_log is not None:
            payload = settings.payload_log
            self.payload = LogWriter(
                "payload",
                given.get("payload")
                or _sink(
                    loaded,
                    "logging.payload_log.path",
                    payload.path,
                    payload.max_bytes,
                    payload.backups,
                ),
                metrics,
                queue_size=size,
                queue_bytes=budget,
                renderer=payload_renderer(payload, Redactor(settings.redact_fields)),
            )

        self.shadow: LogWriter | None = None
        if settings.shadow_log is not None:
            shadow = settings.shadow_log
            self.shadow = LogWriter(
                "shadow",
                given.get("shadow")
                or _sink(
                    loaded, "logging.shadow_log.path", shadow.path, shadow.max_bytes, shadow.backups
                ),
                metrics,
                queue_size=size,
                queue_bytes=budget,
            )

    @property
    def writers(self) -> list[LogWriter]:
        candidates = (self.access, self.payload, self.shadow, self.events)
        return [w for w in candidates if w is not None]

    def start(self, *, capture_events: bool = True) -> None:
        for writer in self.writers:
            writer.start()
        if capture_events:
            EVENT_STREAM.attach(self.events)

    async def stop(self, flush_within: float | None = None) -> None:
        """Flush and close every log within about ``flush_within`` s in all
        (``logging.flush_timeout`` unless given): the others together, then the event
        log with what time is left, a second at least (it takes what they logged while
        stopping). Stuck sinks cost their records, never the exit (one after another,
        four stuck logs took 80 s)."""
        if flush_within is None:
            flush_within = self.flush_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + flush_within
        await asyncio.gather(
            *(writer.stop(flush_within) for writer in self.writers if writer is not self.events)
        )
        if EVENT_STREAM.writer is self.events:
            EVENT_STREAM.attach(None)
        await self.events.stop(max(1.0, deadline - loop.time()))
