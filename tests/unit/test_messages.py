"""Status lines as the server writes them, the version of a parsed head, and the
lookup keys of parsed header names."""

from __future__ import annotations

import contextlib
from typing import Any

import httptools
import pytest

from sidecar.http import messages
from sidecar.http.messages import Headers, lower_key, parsed_version, status_line


def test_a_registered_status_with_its_own_phrase() -> None:
    assert status_line(200, None, False) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(200, "OK", False) == b"HTTP/1.1 200 OK\r\n"
    assert status_line(404, "", False) == b"HTTP/1.1 404 Not Found\r\n"


def test_a_phrase_of_its_own_is_kept() -> None:
    assert status_line(200, "Fine", False) == b"HTTP/1.1 200 Fine\r\n"
    assert status_line(503, "Busy \xe9", False) == b"HTTP/1.1 503 Busy \xe9\r\n"


def test_an_http_1_0_client_gets_a_1_0_status_line() -> None:
    assert status_line(200, None, True) == b"HTTP/1.0 200 OK\r\n"
    assert status_line(200, "OK", True) == b"HTTP/1.0 200 OK\r\n"
    assert status_line(418, "Tea", True) == b"HTTP/1.0 418 Tea\r\n"


def test_an_unregistered_status() -> None:
    assert status_line(299, None, False) == b"HTTP/1.1 299 Unknown\r\n"
    assert status_line(299, "Odd", False) == b"HTTP/1.1 299 Odd\r\n"


class _Head:
    """Parser callbacks that keep the header fields and, at the end of the head, both
    versions: the parser's own and ``parsed_version``'s."""

    def __init__(self) -> None:
        self.fields: list[tuple[bytes, ...]] = []
        self.parser: Any = None
        self.versions: tuple[str, str] | None = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), name, value))

    def on_headers_complete(self) -> None:
        keep_alive = self.parser.should_keep_alive()
        self.versions = (
            self.parser.get_http_version(),
            parsed_version(self.parser, self.fields, keep_alive),
        )


CONNECTION_FIELDS = [
    b"",
    b"Connection: close\r\n",
    b"Connection: keep-alive\r\n",
    b"Connection: Keep-Alive, Upgrade\r\n",
    b"Proxy-Connection: keep-alive\r\n",
    b"Connection: upgrade\r\nUpgrade: h2c\r\n",
]
FRAMING = [b"Content-Length: 0\r\n", b"Transfer-Encoding: chunked\r\n", b""]


@pytest.mark.parametrize("version", [b"0.9", b"1.0", b"1.1", b"2.0"])
@pytest.mark.parametrize("connection", CONNECTION_FIELDS)
@pytest.mark.parametrize("framing", FRAMING)
def test_the_version_is_the_parsers_whatever_the_head(
    version: bytes, connection: bytes, framing: bytes
) -> None:
    for make, first_line in (
        (httptools.HttpRequestParser, b"POST / HTTP/%s\r\nHost: x\r\n" % version),
        (httptools.HttpResponseParser, b"HTTP/%s 200 OK\r\n" % version),
    ):
        head = _Head()
        head.parser = make(head)
        with contextlib.suppress(httptools.HttpParserUpgrade):
            head.parser.feed_data(first_line + connection + framing + b"\r\n")
        assert head.versions is not None
        assert head.versions[1] == head.versions[0] == version.decode()


def test_a_parsed_names_key_is_its_lower_case_made_once() -> None:
    tail = b"Type"
    first = lower_key(b"Content-" + tail)  # new objects, as a parser gives
    again = lower_key(b"Content-" + tail)
    assert first == b"content-type"
    assert again is first  # the same key object: its hash kept, compared by identity
    assert lower_key(b"X-\xc9T\xc9") == b"x-\xc9t\xc9"  # obs-text bytes are not letters


def test_the_name_cache_is_bounded_in_entries_and_in_name_size() -> None:
    # The module's own dict (compiled code holds the same object): emptied for the
    # test, then given back what it held.
    cache = messages._LOWER_KEYS
    saved = dict(cache)
    cache.clear()
    try:
        long_name = b"X-" + b"A" * 100
        assert lower_key(long_name) == long_name.lower()
        assert long_name not in cache  # a client's long names are not kept
        for n in range(1100):
            assert lower_key(b"X-Name-%d" % n) == b"x-name-%d" % n
        assert len(cache) == 1024  # a client's many names are not kept either
    finally:
        cache.clear()
        cache.update(saved)


def test_fields_named_with_the_prefix_are_dropped_and_only_those() -> None:
    headers = Headers(
        [("X-Sidecar-Shadow", "1"), ("X-Other", "2"), ("x-sidecar", "3"), ("Accept", "4")]
    )
    kept = headers.without(frozenset({b"accept"}), prefix=b"x-sidecar-")
    assert kept.items() == [("X-Other", "2"), ("x-sidecar", "3")]
