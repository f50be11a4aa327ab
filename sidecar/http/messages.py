"""The sidecar's own HTTP messages: header fields, and the answers a handler gives.

Header fields are decoded once (latin-1, as they travel) and kept in the order
they came; names are looked up without regard to case. Nothing here does I/O.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator
from http import HTTPStatus

_REASONS = {status.value: status.phrase for status in HTTPStatus}


def reason_for(status: int) -> str:
    return _REASONS.get(status, "Unknown")


def status_has_body(status: int) -> bool:
    """1xx, 204 and 304 answers never have a body (RFC 9112 section 6.3)."""
    return not (status < 200 or status == 204 or status == 304)


class Headers:
    """Header fields in arrival order with case-insensitive lookup."""

    __slots__ = ("_fields", "_first")

    def __init__(self, fields: Iterable[tuple[str, str]] = ()) -> None:
        self._fields: list[tuple[str, str]] = list(fields)
        self._first: dict[str, str] | None = None

    @classmethod
    def from_raw(cls, raw: list[tuple[bytes, bytes]]) -> Headers:
        return cls([(name.decode("latin-1"), value.decode("latin-1")) for name, value in raw])

    def _index(self) -> dict[str, str]:
        first = self._first
        if first is None:
            first = {}
            for name, value in self._fields:
                first.setdefault(name.lower(), value)
            self._first = first
        return first

    def get(self, name: str, default: str | None = None) -> str | None:
        """The first field of this name."""
        return self._index().get(name.lower(), default)

    def getall(self, name: str) -> list[str]:
        lower = name.lower()
        return [value for key, value in self._fields if key.lower() == lower]

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
        self._fields.append((name, value))
        if self._first is not None:
            self._first.setdefault(name.lower(), value)

    def __setitem__(self, name: str, value: str) -> None:
        """Replace every field of this name with one."""
        lower = name.lower()
        if lower in self._index():
            self._fields = [field for field in self._fields if field[0].lower() != lower]
        self._fields.append((name, value))
        self._first = None

    def update(self, values: dict[str, str]) -> None:
        for name, value in values.items():
            self[name] = value

    def remove(self, name: str) -> None:
        lower = name.lower()
        self._fields = [field for field in self._fields if field[0].lower() != lower]
        self._first = None

    def copy(self) -> Headers:
        return Headers(self._fields)

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
