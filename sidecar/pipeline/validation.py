"""Request validation: content type, JSON (strict, depth-limited) and a JSON Schema.

A route's schema is compiled once at start-up (``config.schemas``). A valid request,
the common case, pays for one yes-or-no check; only an invalid one pays for listing
its failing paths, in a thread.
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Final

import orjson

from sidecar.config.jsontext import repeats_a_key
from sidecar.config.schema import ValidationSettings
from sidecar.config.schemas import CompiledSchema
from sidecar.config.tensors import json_head_length, read_v2
from sidecar.http import errors
from sidecar.telemetry.metrics import Metrics

# Keep only brackets, and make both kinds one kind (valid JSON pairs them properly).
_ONE_BRACKET_KIND: Final = bytes.maketrans(b"{}", b"[]")
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
MAX_LISTED_ERRORS: Final = 20
# Binary V2 bodies past this are checked against a schema in a thread (the loop gets
# the interpreter back every switch interval); smaller ones take well under 10 ms.
CHECK_INLINE_BYTES: Final = 16 * 1024


def nesting_exceeds(body: bytes, limit: int) -> bool:
    """True when valid JSON ``body`` nests deeper than ``limit``.

    Small bodies cannot: each level takes two bytes, and more than ``limit`` opening
    brackets. Otherwise strings are cut out, the rest reduced to brackets, and
    innermost pairs removed one level per pass. Every step is a bytes method running
    in C, so a large tensor or a huge string costs milliseconds, not a Python loop
    over its characters.
    """
    # Two counts, not a translate: one with 254 bytes to delete builds its table on
    # every call (half a microsecond for an iris body).
    if len(body) <= 2 * limit or body.count(b"[") + body.count(b"{") <= limit:
        return False
    # Escapes pair up left to right, so dropping escaped backslashes and then escaped
    # quotes leaves quotes that strictly open and close strings.
    unescaped = body.replace(b"\\\\", b"").replace(b'\\"', b"")
    outside_strings = b"".join(unescaped.split(b'"')[::2])
    brackets = outside_strings.translate(_ONE_BRACKET_KIND, _NOT_BRACKETS)
    for _ in range(limit):
        if not brackets:
            return False
        brackets = brackets.replace(b"[]", b"")
    return bool(brackets)


def _exact_path(path: Any) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "$"


def _not_finite_at(document: Any) -> str | None:
    """Where a binary tensor of ``document`` (read as lists) holds NaN or infinity,
    as ``inputs[0].data[2]``, or None. A JSON body cannot hold either (it is refused
    400), and the schema validators disagree on NaN: the fast one refuses it, the
    thorough one finds nothing to list, so the 422 named no place at all."""
    inputs = document.get("inputs") if isinstance(document, dict) else None
    for position, tensor in enumerate(inputs if isinstance(inputs, list) else ()):
        if not isinstance(tensor, dict):
            continue
        parameters = tensor.get("parameters")
        data = tensor.get("data")
        if (
            not isinstance(parameters, dict)
            or "binary_data_size" not in parameters
            or tensor.get("datatype") not in _FLOAT_DATATYPES
            or not isinstance(data, list)
            # NaN and infinity carry through a sum: a finite one clears the tensor in
            # one pass in C (one that overflowed is scanned, and passes).
            or math.isfinite(sum(data, 0.0))
        ):
            continue
        for index, value in enumerate(data):
            if not math.isfinite(value):
                return f"inputs[{position}].data[{index}]"
    return None


_FLOAT_DATATYPES: Final = frozenset({"FP16", "FP32", "FP64"})


class RequestValidator:
    """The checks of one route, compiled once."""

    def __init__(
        self,
        route: str,
        settings: ValidationSettings,
        schema: CompiledSchema | None,
        metrics: Metrics,
        binary_tensors: bool = False,
    ) -> None:
        """``binary_tensors``: a V2 route, whose requests may use the binary tensor
        extension (``Inference-Header-Content-Length``)."""
        self.route = route
        self.binary_tensors = binary_tensors
        self.content_types = frozenset(settings.content_types)
        self.needs_json = settings.require_json or schema is not None
        self.max_depth = settings.max_depth
        self.schema = schema
        # Binary tensors checked against a schema: work in proportion to the elements.
        self.binary_schema = binary_tensors and schema is not None
        self._violations = metrics.schema_violations

    def check_content_type(self, content_type: str, has_body: bool) -> None:
        if self.content_types and has_body and content_type.lower() not in self.content_types:
            allowed = ", ".join(sorted(self.content_types))
            raise errors.UnsupportedMediaType(
                f"content type {content_type or '(none)'!r} is not accepted here; use {allowed}"
            )

    def checks_in_a_thread(self, json_head: str | None, size: int) -> bool:
        """Whether ``check_body`` should run off the event loop: a binary V2 body on a
        route with a schema is checked as the lists its tensors make, Python work in
        proportion to its elements (a 4 MB BYTES tensor of empty strings: 1.4 s, where
        the same request as JSON is parsed in 50 ms)."""
        return self.binary_schema and json_head is not None and size > CHECK_INLINE_BYTES

    def check_body(self, body: bytes, json_head: str | None = None) -> Any:
        """The parsed JSON document (or None when the route does not ask for JSON).

        ``json_head``: the request's ``Inference-Header-Content-Length`` on a V2 route.
        tritonclient sends numpy arrays that way by default (a JSON head of that many
        bytes, then the tensors' raw bytes), and the whole body, checked as JSON, was
        refused 400: the head alone is the JSON, checked as strictly."""
        if not self.needs_json:
            return None
        whole = body
        length: int | None = None
        if json_head is not None and self.binary_tensors:
            length = json_head_length(json_head, len(body))
            if length is None:
                raise errors.InvalidJson(
                    "Inference-Header-Content-Length is not the length of a JSON head "
                    f"within the {len(body)}-byte body"
                )
            body = body[:length]
        try:
            document = orjson.loads(body)  # bounds its own recursion (1024 levels)
        except orjson.JSONDecodeError as exc:
            if "depth" in str(exc) or "recursion" in str(exc):  # orjson's nesting limit
                raise self._too_deep() from None
            raise errors.InvalidJson(
                "the body is not valid JSON (UTF-8, no NaN or Infinity)"
            ) from None
        if nesting_exceeds(body, self.max_depth):
            raise self._too_deep()
        if repeats_a_key(body, document):
            raise errors.InvalidJson(
                "the body repeats a key in one object: models may read either copy"
            )
        if self.schema is not None:
            if length is not None:
                # The schema is of the request the tensors make: their elements are
                # its data (an iris schema requires inputs[0].data, which the head
                # alone never has). As many numbers as the same request in JSON.
                try:
                    document = read_v2(whole, length, as_lists=True)
                except ValueError as exc:
                    raise errors.InvalidJson(
                        f"the binary tensors do not fit the body: {exc}"
                    ) from None
                where = _not_finite_at(document)
                if where is not None:
                    raise errors.InvalidJson(
                        f"binary tensor data {where} is NaN or infinity, which JSON cannot"
                        " hold: the route's schema cannot check it"
                    )
            if not self.schema.fast.is_valid(document):
                raise SchemaFailed(document)
        return document

    def _too_deep(self) -> errors.InvalidJson:
        return errors.InvalidJson(f"JSON nests deeper than {self.max_depth} levels")

    def violation(self, document: Any) -> errors.SchemaViolation:
        """The 422 for a document that failed the schema, listing its first
        ``MAX_LISTED_ERRORS`` failing paths. The listing stops there: a body with a
        million failing items costs what twenty do. Slow enough to run off the
        event loop (the caller's thread), never for a valid request."""
        assert self.schema is not None
        found = sorted(
            itertools.islice(self.schema.thorough.iter_errors(document), MAX_LISTED_ERRORS),
            key=lambda e: [str(part) for part in e.path],
        )
        details = [
            {"path": _exact_path(e.absolute_path), "message": e.message[:200]} for e in found
        ]
        # Labelled by where in the schema, never by a key the client chose: the series
        # stay as many as the schema has places.
        for field in sorted({schema_field(e.absolute_schema_path) for e in found}) or ["$"]:
            self._violations.labels(self.route, field).inc()
        paths = ", ".join(d["path"] for d in details) or "$"
        more = " (and more)" if len(found) == MAX_LISTED_ERRORS else ""
        return errors.SchemaViolation(
            f"the body does not match the route's schema at: {paths}{more}", details=details
        )


class SchemaFailed(Exception):
    """The fast validator refused the document; ``RequestValidator.violation`` says
    where, off the event loop."""

    def __init__(self, document: Any) -> None:
        super().__init__("schema violation")
        self.document = document


def schema_field(schema_path: Any) -> str:
    """A failing place named by the schema's own structure: ``inputs[*].data`` for
    properties and items, ``{*}`` for any key additionalProperties or
    patternProperties admit. Bounded by the schema, whatever the body holds."""
    out = ""
    parts = list(schema_path)[:-1]  # the last part is the keyword that failed
    index = 0
    while index < len(parts):
        part = parts[index]
        if part == "properties" and index + 1 < len(parts):
            name = str(parts[index + 1])
            out += f".{name}" if out else name
            index += 2
            continue
        if part in ("additionalProperties", "patternProperties"):
            out += ".{*}" if out else "{*}"
            index += 2 if part == "patternProperties" else 1
            continue
        if part in ("items", "additionalItems", "prefixItems"):
            out += "[*]"
        index += 1
    return out or "$"
