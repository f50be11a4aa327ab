"""Status lines as the server writes them, and the version of a parsed head."""

from __future__ import annotations

import contextlib
from typing import Any

import httptools
import pytest

from sidecar.http.messages import parsed_version, status_line


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
