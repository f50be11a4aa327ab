"""The sidecar's own HTTP messages: header fields, and the answers a handler gives.

Header fields are decoded once (latin-1, as they travel) and kept in the order
they came; names are looked up without regard to case. Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, KeysView
from http import HTTPStatus

_REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_for(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def status_has_body(status: int) -> bool:
    """1xx, 204 and 304 answers never have a body (RFC 9112 section 6.3)."""
    return not (status < 200 or status == 204 or status == 304)


class Headers:
    """Header fields in arrival order with case-insensitive lookup.

    Each field's lower-case name is kept beside it (computed once, when the field
    arrives or is added), so filters and lookups never lower-case a name twice.
    """

    __slots__ = ("_fields", "_first", "_names")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = list(fields)
        self._names: list[str] = [name.lower() for name, _ in self._fields]
        self._first: dict[str, str] | None = None

    @classmethod
    def from_raw(cls, raw: list[tuple[bytes, bytes]]) -> Headers:
        """Fields as a parser gave them, decoded and indexed in one pass."""
        headers = cls.__new__(cls)
        fields = []
        names = []
        first: dict[str, str] = {}
        for raw_name, raw_value in raw:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            lower = name.lower()
            fields.append((name, value))
            names.append(lower)
            if lower not in first:
                first[lower] = value
        headers._fields = fields
        headers._names = names
        headers._first = first
        return headers

    def names(self) -> KeysView[str]:
        """The lower-case names present (a set-like view)."""
        return self._index().keys()

    def lowered(self) -> Iterator[tuple[str, tuple[str, str]]]:
        """``(lower-case name, (name, value))`` for each field, in order."""
        return zip(self._names, self._fields, strict=True)

    def without(
        self, names: frozenset[str], also: frozenset[str] = frozenset(), prefix: str = "\x00"
    ) -> Headers:
        """A copy without the fields named in ``names`` or ``also``, or whose name
        starts with ``prefix`` (all lower case)."""
        out = Headers.__new__(Headers)
        fields = []
        kept = []
        for lower, field in zip(self._names, self._fields, strict=True):
            if lower in names or lower in also or lower.startswith(prefix):
                continue
            fields.append(field)
            kept.append(lower)
        out._fields = fields
        out._names = kept
        out._first = None
        return out

    def _index(self) -> dict[str, str]:
        first = self._first
        if first is None:
            first = {}
            for lower, (_, value) in zip(self._names, self._fields, strict=True):
                if lower not in first:
                    first[lower] = value
            self._first = first
        return first

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field of this name."""
        return self._index().get(name.lower(), default)

    def getall(self, name: str) -> list[str]:
        lower = name.lower()
        return [
            value for key, (_, value) in zip(self._names, self._fields, strict=True) if key == lower
        ]

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and name.lower() in self._index()

    def __getitem__(self, name: str) -> str:
        value = self.get(name)
        if value is None:
            raise KeyError(name)
        return value

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(self._fields)

    def __len__(self) -> int:
        return len(self._fields)

    def items(self) -> list[tuple[str, str]]:
        return list(self._fields)

    def add(self, name: str, value: str) -> None:
        lower = name.lower()
        self._fields.append((name, value))
        self._names.append(lower)
        first = self._first
        if first is not None and lower not in first:
            first[lower] = value

    def __setitem__(self, name: str, value: str) -> None:
        """Replace every field of this name with one."""
        lower = name.lower()
        if lower in self._names:
            self._drop(lower)
        self._fields.append((name, value))
        self._names.append(lower)
        first = self._first
        if first is not None:
            first[lower] = value

    def _drop(self, lower: str) -> None:
        pairs = [pair for pair in zip(self._names, self._fields, strict=True) if pair[0] != lower]
        self._names = [pair[0] for pair in pairs]
        self._fields = [pair[1] for pair in pairs]
        self._first = None

    def update(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self[name] = value

    def copy(self) -> Headers:
        out = Headers.__new__(Headers)
        out._fields = list(self._fields)
        out._names = list(self._names)
        out._first = None if self._first is None else dict(self._first)
        return out

    def __repr__(self) -> str:
        return f"Headers({self._fields!r})"


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
    """The Date header value, formatted once a second."""

    def __init__(self) -> None:
        self._second = -1
        self._value = b""

    def now(self) -> bytes:
        second = int(time.time())
        if second != self._second:
            self._second = second
            self._value = time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(second)).encode()
        return self._value


http_date = _HttpDate()
