"""Refusing request targets and framings that try to trick a proxy.

The HTTP layer's strict parser (llhttp) already refuses Content-Length with
Transfer-Encoding, duplicate Content-Length and obsolete line folding. This adds what
a proxy must not forward: absolute-form targets naming another host, dot segments
(``..``, ``.``) in any encoding, encoded slashes and backslashes (``%2f``, ``%5c``),
double encoding, NUL, transfer codings other than plain ``chunked``, and the CONNECT
and TRACE methods.
"""

from __future__ import annotations

import re
from typing import Final
from urllib.parse import unquote

from sidecar.http import errors

# CONNECT opens tunnels and TRACE reflects requests (cross-site tracing): neither has
# any business reaching a model server.
REFUSED_METHODS: Final = frozenset({"CONNECT", "TRACE"})

_ENCODED_SEPARATOR: Final = re.compile(r"%(2f|5c)", re.IGNORECASE)
_PERCENT_ESCAPE: Final = re.compile(r"%[0-9a-fA-F]{2}")


def check_target(raw_target: str) -> None:
    """Raise BadRequest unless the target is a plain origin-form path (and query)."""
    if not raw_target.startswith("/") or raw_target.startswith("//"):
        raise errors.BadRequest("the request target must be a path (origin-form)")
    if "#" in raw_target:
        raise errors.BadRequest("a fragment ('#') is not part of a request target")
    path = raw_target.split("?", 1)[0]
    if "%" not in path and "\\" not in path and "\x00" not in path and "/." not in path:
        return  # the common case: nothing encoded, no dot segment possible
    if _ENCODED_SEPARATOR.search(path):
        raise errors.BadRequest("encoded '/' or backslash in the path is not accepted")
    try:
        decoded = unquote(path, errors="strict")
    except UnicodeDecodeError:
        raise errors.BadRequest("the path's percent-encoding is not valid UTF-8") from None
    if "\\" in decoded or "\x00" in decoded:
        raise errors.BadRequest("backslash or NUL in the path is not accepted")
    if _PERCENT_ESCAPE.search(decoded):
        raise errors.BadRequest("double-encoded characters in the path are not accepted")
    if any(segment in (".", "..") for segment in decoded.split("/")):
        raise errors.BadRequest("dot segments ('.' or '..') in the path are not accepted")


def check_host(host_fields: int, version: str) -> None:
    """RFC 9112 section 3.2: an HTTP/1.1 request without a Host field, or any request
    with more than one, is refused (400); with two, the upstream and the sidecar
    (X-Forwarded-Host) could each believe another."""
    if host_fields > 1:
        raise errors.BadRequest("more than one Host field")
    if not host_fields and version == "1.1":
        raise errors.BadRequest("an HTTP/1.1 request needs a Host field")


def check_framing(transfer_encoding: str | None) -> None:
    if transfer_encoding is not None and transfer_encoding.strip().lower() != "chunked":
        raise errors.BadRequest("only the 'chunked' transfer coding is accepted")
