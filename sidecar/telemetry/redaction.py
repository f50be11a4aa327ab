"""Redaction of configured JSON fields before anything is written to a log."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sidecar.config.rules import FieldPath, parse_field_path

REDACTED = "[REDACTED]"


class Redactor:
    def __init__(self, fields: Sequence[str]) -> None:
        self._paths: tuple[FieldPath, ...] = tuple(parse_field_path(f) for f in fields)

    def json(self, document: Any) -> Any:
        """The document with every configured field replaced (in place) by a marker."""
        for path in self._paths:
            _redact(document, path)
        return document


def _redact(node: Any, path: FieldPath) -> None:
    for part in path[:-1]:
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                return
        elif not isinstance(node, dict) or part not in node:
            return
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if isinstance(node, list) and last < len(node):
            node[last] = REDACTED
    elif isinstance(node, dict) and last in node:
        node[last] = REDACTED
