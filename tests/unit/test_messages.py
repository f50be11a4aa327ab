"""Status lines as the server writes them."""

from __future__ import annotations

from sidecar.http.messages import status_line


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
