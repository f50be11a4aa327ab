"""Ordered route table: the first route whose path prefix and methods match wins."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from sidecar.config.schema import HTTP_METHODS, Route


@dataclass(frozen=True, slots=True)
class _Entry:
    prefix: str
    prefix_dir: str  # the prefix with one trailing '/', for segment-boundary matching
    methods: frozenset[str]
    route: Route

    def takes(self, path: str) -> bool:
        return path == self.prefix or path.startswith(self.prefix_dir) or self.prefix == "/"


class RouteTable:
    def __init__(self, routes: Sequence[Route]) -> None:
        self._entries = tuple(
            _Entry(r.path_prefix, r.path_prefix.rstrip("/") + "/", frozenset(r.methods), r)
            for r in routes
        )
        # The error shape of a request no route took (a mistyped path, say): when
        # every route speaks one protocol, its clients are that protocol's (an openai
        # client reads its error's type and code), else the plain one.
        protocols = {r.protocol for r in routes}
        self.unrouted_protocol = protocols.pop() if len(protocols) == 1 else "plain"

    def match(self, path: str, method: str) -> tuple[Route | None, Route | None]:
        """Return ``(route, path_route)``: the route, and the first route whose path
        matched whatever the method.

        ``path_route`` tells a 405 (some route has this path, none this method) from
        a 404, and whose clients read the 405. ``/v1/models`` matches ``/v1/models``
        and ``/v1/models/x`` but not ``/v1/modelsX``.
        """
        path_route: Route | None = None
        for entry in self._entries:
            if entry.takes(path):
                if not entry.methods or method in entry.methods:
                    return entry.route, entry.route
                if path_route is None:
                    path_route = entry.route
        return None, path_route

    def allowed(self, path: str) -> str:
        """The methods the routes of this path take, for a 405's Allow field (RFC 9110
        section 15.5.6); empty when no route takes the path. A route that lists none
        takes any method: it adds every method a route may name (a refused TRACE or
        CONNECT is the one 405 such a route can give)."""
        methods: set[str] = set()
        for entry in self._entries:
            if entry.takes(path):
                methods |= entry.methods or HTTP_METHODS
        return ", ".join(sorted(methods))
