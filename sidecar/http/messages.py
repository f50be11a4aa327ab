"""The sidecar's own HTTP messages: header fields, and the answers a handler gives.

Header fields are decoded once (latin-1, as they travel) and kept in the order
they came; names are looked up without regard to case. Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from http import HTTPStatus
from typing import Any, Final

_REASONS: Final = {status.value: status.phrase.encode() for status in HTTPStatus}
_PHRASES: Final = {status.value: status.phrase for status in HTTPStatus}
# The HTTP/1.1 status line of every registered status with its own phrase: nearly
# every answer's, made once rather than encoded and formatted per answer.
_STATUS_LINES: Final = {
    status.value: b"HTTP/1.1 %d %s\r\n" % (status.value, status.phrase.encode())
    for status in HTTPStatus
}

# One header field as it is kept and sent: (lower-case name, name, value), in bytes.
# Typed as a tuple of any length so mypyc keeps each field a tuple object: as
# tuple[bytes, bytes, bytes] it would unpack every field read from a list into a C
# struct and build a new tuple for every field put into one.
RawField = tuple[bytes, ...]


# RFC 9110 section 7.6.1, plus the proxy-only and legacy ones proxies drop too
# (lower-case). Never relayed: they concern one connection, not the message.
HOP_BY_HOP: Final = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"proxy-authenticate",
        b"proxy-authorization",
        b"proxy-connection",
        b"te",
        b"trailer",
        b"transfer-encoding",
        b"upgrade",
    }
)


def parsed_version(parser: Any, fields: list[RawField], keep_alive: bool) -> str:
    """The HTTP version of the message an httptools ``parser`` has just parsed the
    head of, given its header ``fields`` and the parser's ``should_keep_alive()``.

    "1.1" for nearly every message without asking the parser, whose
    ``get_http_version()`` formats a new string (a tenth of the HTTP layers' cost
    of a request, asked on both sides). llhttp accepts versions 0.9, 1.0, 1.1 and
    2.0, and keeps a message alive without a Connection (or Proxy-Connection)
    field only when its minor version is above zero: 1.1."""
    if keep_alive:
        for field in fields:
            key = field[0]
            if key == b"connection" or key == b"proxy-connection":
                return str(parser.get_http_version())
        return "1.1"
    return str(parser.get_http_version())


def reason_for(status: int) -> bytes:
    return _REASONS.get(status, b"Unknown")


def status_line(status: int, reason: str | None, http10: bool) -> bytes:
    """The status line, CRLF included: with ``reason`` when given, else the status's
    own phrase; ``HTTP/1.0`` for a 1.0 client."""
    if not http10 and (not reason or reason == _PHRASES.get(status)):
        line = _STATUS_LINES.get(status)
        if line is not None:
            return line
    phrase = reason.encode("latin-1", "replace") if reason else reason_for(status)
    return b"%s %d %s\r\n" % (b"HTTP/1.0" if http10 else b"HTTP/1.1", status, phrase)


def status_has_body(status: int) -> bool:
    """1xx, 204 and 304 answers never have a body (RFC 9112 section 6.3)."""
    return not (status < 200 or status == 204 or status == 304)


def field_key(name: str) -> bytes:
    """The lookup key of a header name: its bytes, lower-cased as a parsed name's are."""
    key = _KEYS.get(name)
    if key is None:
        key = name.encode("latin-1", "replace").lower()
        if len(_KEYS) < 1024:  # names come from code and config: a few dozen
            _KEYS[name] = key
    return key


_KEYS: Final[dict[str, bytes]] = {}


def lower_key(name: bytes) -> bytes:
    """The lookup key of a parsed header name (its lower-case bytes). Peers send the
    same few dozen names on every message: a cached key spares a method call and a
    new object per field, and, being the same object each time, its hash is kept
    and comparisons with it are by identity. Bounded in entries and in name size:
    names are the peer's to choose."""
    key = _LOWER_KEYS.get(name)
    if key is None:
        key = name.lower()
        if len(name) <= _LOWER_KEY_MAX_NAME and len(_LOWER_KEYS) < _LOWER_KEY_ENTRIES:
            _LOWER_KEYS[name] = key
    return key


_LOWER_KEYS: Final[dict[bytes, bytes]] = {}
_LOWER_KEY_ENTRIES: Final = 1024
_LOWER_KEY_MAX_NAME: Final = 64


class Headers:
    """Header fields in arrival order with case-insensitive lookup.

    Fields are kept as the bytes they travel as, each beside its lower-case name,
    so a head parsed from one peer is filtered and written to another without
    decoding, re-encoding or lower-casing a name twice. Lookups take and give
    ``str`` (latin-1), decoding only the value asked for. A lookup scans the fields:
    a head has a handful, and building an index for each head cost more than the
    few lookups a request makes.
    """

    __slots__ = ("_fields",)

    def __init__(
        self, fields: Iterable[tuple[str, str]] = (), *, raw: list[RawField] | None = None
    ) -> None:
        """Headers of (name, value) pairs, or taking over ``raw``: fields (lower-case
        name, name, value) as a parser's callbacks collected them."""
        if raw is not None:
            self._fields = raw
        else:
            self._fields = [_encoded(name, value) for name, value in fields]

    def has(self, key: bytes) -> bool:
        """Whether a field of this lower-case name (bytes) is present."""
        return self.get_raw(key) is not None

    def without(
        self, keys: frozenset[bytes], also: frozenset[bytes] = frozenset(), prefix: bytes = b"\x00"
    ) -> Headers:
        """A copy without the fields named in ``keys`` or ``also``, or whose name
        starts with ``prefix`` (all lower-case bytes; the prefix is not empty)."""
        kept: list[RawField] = []
        first = prefix[0]
        for field in self._fields:
            key = field[0]
            if key in keys or (also and key in also):
                continue
            # Indexing compiles to C; startswith is a method call, made only for
            # names that begin like the prefix.
            if key and key[0] == first and key.startswith(prefix):
                continue
            kept.append(field)
        return Headers(raw=kept)

    def render(self, skip: frozenset[bytes] = frozenset()) -> bytes:
        """The fields as they go on the wire (``Name: value\\r\\n`` each), without
        those named in ``skip``."""
        parts: list[bytes] = []
        self.render_into(parts, skip)
        return b"".join(parts)

    def render_into(self, parts: list[bytes], skip: frozenset[bytes] = frozenset()) -> None:
        """``render``'s pieces appended to ``parts``, for a caller that joins a whole
        message once (each join is a copy, with a pass over its pieces)."""
        for key, name, value in self._fields:
            if not skip or key not in skip:
                parts.append(name)
                parts.append(b": ")
                parts.append(value)
                parts.append(b"\r\n")

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field of this name."""
        value = self.text(field_key(name))
        return default if value is None else value

    def text(self, key: bytes) -> str | None:
        """The first field named ``key`` (lower-case bytes), decoded: the lookup of
        ``get`` without mapping a ``str`` name to its key."""
        value = self.get_raw(key)
        return None if value is None else value.decode("latin-1")

    def get_raw(self, key: bytes) -> bytes | None:
        """The first field named ``key`` (lower-case), as bytes."""
        for field in self._fields:
            if field[0] == key:
                return field[2]
        return None

    def getall(self, name: str) -> list[str]:
        key = field_key(name)
        return [value.decode("latin-1") for lower, _, value in self._fields if lower == key]

    def count(self, key: bytes) -> int:
        """How many fields have this lower-case name (bytes)."""
        found = 0
        for field in self._fields:
            if field[0] == key:
                found += 1
        return found

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and self.has(field_key(name))

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self.items())

    def __len__(self) -> int:
        return len(self._fields)

    def items(self) -> list[tuple[str, str]]:
        return [
            (name.decode("latin-1"), value.decode("latin-1")) for _, name, value in self._fields
        ]

    def add(self, name: str, value: str) -> None:
        self.add_raw(*_encoded(name, value))

    def __setitem__(self, name: str, value: str) -> None:
        """Replace every field of this name with one."""
        self.put_raw(*_encoded(name, value))

    def put_raw(self, key: bytes, name: bytes, value: bytes) -> None:
        """Replace every field named ``key`` (lower-case) with one, given as bytes."""
        if self.has(key):
            self._fields = [field for field in self._fields if field[0] != key]
        self._fields.append((key, name, value))

    def add_raw(self, key: bytes, name: bytes, value: bytes) -> None:
        """Add a field given as bytes (``key`` is its lower-case name)."""
        self._fields.append((key, name, value))

    def update(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self.put_raw(*_encoded(name, value))

    def copy(self) -> Headers:
        return Headers(raw=list(self._fields))

    def __repr__(self) -> str:
        return f"Headers({self.items()!r})"


def _encoded(name: str, value: str) -> RawField:
    return (field_key(name), name.encode("latin-1", "replace"), value.encode("latin-1", "replace"))


class Response:
    """An answer held whole: status, header fields and body bytes."""

    __slots__ = ("body", "close", "headers", "reason", "status")

    def __init__(
        self,
        status: int = 200,
        body: bytes = b"",
        headers: Headers | Iterable[tuple[str, str]] | dict[str, str] | None = None,
        *,
        reason: str | None = None,
        content_type: str | None = None,
        close: bool = False,
    ) -> None:
        self.status = status
        self.body = body
        if isinstance(headers, Headers):
            self.headers = headers
        elif isinstance(headers, dict):
            self.headers = Headers(headers.items())
        else:
            self.headers = Headers(headers or ())
        if content_type is not None:
            self.headers["Content-Type"] = content_type
        self.reason = reason
        self.close = close  # the connection closes after this answer

    @property
    def content_type(self) -> str:
        return media_type(self.headers.get("Content-Type"))


class StreamedAnswer:
    """An answer whose head and body were written by the handler as they came."""

    __slots__ = ("content_type", "headers", "status")

    def __init__(self, status: int, headers: Headers) -> None:
        self.status = status
        self.headers = headers
        self.content_type = media_type(headers.get("Content-Type"))


Answer = Response | StreamedAnswer


def media_type(content_type: str | None) -> str:
    """``application/json`` of ``Application/JSON; charset=utf-8``."""
    if not content_type:
        return ""
    return content_type.split(";", 1)[0].strip().lower()


class _HttpDate:
    """The Date header field, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = time.strftime(
                "Date: %a, %d %b %Y %H:%M:%S GMT\r\n", time.gmtime(second)
            ).encode()
        return self._value


http_date: Final = _HttpDate()
