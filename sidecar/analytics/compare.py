"""Comparing a candidate model's answer with production's, within tolerances.

    status       the two HTTP statuses must be equal
    numeric      every prediction number equal within abs_tol + rel_tol * |production|
    label        labels equal: the values themselves, or the argmax of each row of
                 ``classes`` numbers (probabilities)
    embedding    cosine similarity at least ``min_cosine``, per vector (OpenAI-style
                 answers: each item of data[], lists or base64 alike)
    stream       event streams: the same bytes, but for each JSON event's id, time
                 and system fingerprint (an LLM server gives each answer its own)

A comparison says match or mismatch (or error when an answer cannot be read) and
keeps the first differing fields with both values, for the comparison log.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import orjson

from sidecar.analytics.predictions import PredictionReader, embeddings
from sidecar.config.schema import ShadowCompare
from sidecar.config.tensors import json_head_length, read_v2

MAX_DIFFERENCES = 5


@dataclass(slots=True)
class Comparison:
    result: str  # match, mismatch, error
    reason: str | None = None
    differences: list[dict[str, Any]] = field(default_factory=list)
    max_abs_diff: float | None = None
    cosine: float | None = None
    label_agreement: float | None = None  # share of rows whose labels agree

    @property
    def agreement(self) -> bool | None:
        return None if self.result == "error" else self.result == "match"


def _argmax_rows(values: list[float], width: int) -> list[int]:
    rows = (values[start : start + width] for start in range(0, len(values) - width + 1, width))
    return [max(range(width), key=row.__getitem__) for row in rows]


class Comparer:
    def __init__(self, settings: ShadowCompare) -> None:
        self.settings = settings
        self.reader = PredictionReader.build(
            settings.protocol, settings.output, settings.json_path, raw_embeddings=True
        )

    def compare(
        self,
        primary_status: int,
        primary_body: bytes,
        shadow_status: int,
        shadow_body: bytes,
        *,
        streamed: bool = False,
        primary_head: str | None = None,
        shadow_head: str | None = None,
    ) -> Comparison:
        """``primary_head``, ``shadow_head``: each answer's Inference-Header-Content-Length,
        when it has one (binary V2 tensors follow a JSON head of that many bytes)."""
        if primary_status != shadow_status:
            return Comparison(
                "mismatch",
                "status",
                [{"field": "status", "primary": primary_status, "shadow": shadow_status}],
            )
        if streamed:
            if primary_body == shadow_body:
                return Comparison("match")
            primary_body, shadow_body = _stable_events(primary_body), _stable_events(shadow_body)
            if primary_body == shadow_body:
                return Comparison("match")
            at = next(
                (
                    i
                    for i, (a, b) in enumerate(zip(primary_body, shadow_body, strict=False))
                    if a != b
                ),
                min(len(primary_body), len(shadow_body)),
            )
            return Comparison(
                "mismatch",
                "stream",
                [
                    {
                        "field": f"stream[{at}]",
                        "primary": primary_body[at : at + 40].decode("utf-8", "replace"),
                        "shadow": shadow_body[at : at + 40].decode("utf-8", "replace"),
                    }
                ],
            )
        try:
            # Lists, not lazy tensors: whole documents may be compared for equality.
            primary_doc = read_v2(
                primary_body, json_head_length(primary_head, len(primary_body)), as_lists=True
            )
            shadow_doc = read_v2(
                shadow_body, json_head_length(shadow_head, len(shadow_body)), as_lists=True
            )
        except ValueError:
            if primary_body == shadow_body:
                return Comparison("match")
            return Comparison("error", "an answer is not JSON")
        try:
            return self._documents(primary_doc, shadow_doc)
        except RecursionError:
            # orjson reads nesting up to 1024 levels; reading predictions out of (or
            # comparing) something that deep runs out of Python's stack.
            return Comparison("error", "an answer nests too deeply to read")

    def _documents(self, primary_doc: Any, shadow_doc: Any) -> Comparison:
        kind = self.settings.kind
        if kind == "embedding" and self.settings.protocol == "openai":
            return self._vectors(embeddings(primary_doc), embeddings(shadow_doc))
        primary = self.reader.values(primary_doc)
        shadow = self.reader.values(shadow_doc)
        if not primary and not shadow:
            same = _without_volatile(primary_doc) == _without_volatile(shadow_doc)
            return Comparison("match" if same else "mismatch", "document")
        if len(primary) != len(shadow):
            return Comparison(
                "mismatch",
                "shape",
                [{"field": "predictions.length", "primary": len(primary), "shadow": len(shadow)}],
            )
        if kind == "embedding":
            return self._embedding(primary, shadow)
        if not all(map(math.isfinite, (*primary, *shadow))):
            # A binary tensor may hold NaN or infinity (JSON cannot): no label to round
            # (round() raised, out of the shadow's task), nor a difference to measure
            # (NaN is close to nothing, itself included).
            return Comparison("error", "a prediction is not a finite number")
        if kind == "label":
            return self._labels(primary, shadow)
        return self._numeric(primary, shadow)

    def _numeric(self, primary: list[float], shadow: list[float]) -> Comparison:
        s = self.settings
        differences = []
        worst = 0.0
        for index, (a, b) in enumerate(zip(primary, shadow, strict=True)):
            worst = max(worst, abs(a - b))
            if not math.isclose(b, a, rel_tol=s.rel_tol, abs_tol=s.abs_tol):
                differences.append({"field": f"predictions[{index}]", "primary": a, "shadow": b})
        comparison = Comparison(
            "mismatch" if differences else "match",
            "numeric" if differences else None,
            differences[:MAX_DIFFERENCES],
            max_abs_diff=worst,
        )
        if s.classes:
            comparison.label_agreement = self._label_share(primary, shadow)
        return comparison

    def _label_share(self, primary: list[float], shadow: list[float]) -> float:
        width = self.settings.classes or 1
        a, b = _argmax_rows(primary, width), _argmax_rows(shadow, width)
        return sum(x == y for x, y in zip(a, b, strict=True)) / max(1, len(a))

    def _labels(self, primary: list[float], shadow: list[float]) -> Comparison:
        width = self.settings.classes
        a = _argmax_rows(primary, width) if width else [round(v) for v in primary]
        b = _argmax_rows(shadow, width) if width else [round(v) for v in shadow]
        differences = [
            {"field": f"label[{i}]", "primary": x, "shadow": y}
            for i, (x, y) in enumerate(zip(a, b, strict=True))
            if x != y
        ]
        share = 1.0 - len(differences) / max(1, len(a))
        return Comparison(
            "mismatch" if differences else "match",
            "label" if differences else None,
            differences[:MAX_DIFFERENCES],
            label_agreement=share,
        )

    def _vectors(self, primary: list[list[float]], shadow: list[list[float]]) -> Comparison:
        """One cosine per vector: the same model's answer agrees vector by vector."""
        if len(primary) != len(shadow) or not primary:
            return Comparison(
                "mismatch",
                "shape",
                [{"field": "data.length", "primary": len(primary), "shadow": len(shadow)}],
            )
        cosines = [_cosine(a, b) for a, b in zip(primary, shadow, strict=True)]
        if any(math.isnan(c) for c in cosines):
            return _not_finite()
        differences = [
            {"field": f"data[{i}].embedding.cosine", "primary": 1.0, "shadow": round(c, 6)}
            for i, c in enumerate(cosines)
            if c < self.settings.min_cosine
        ]
        return Comparison(
            "mismatch" if differences else "match",
            "cosine" if differences else None,
            differences[:MAX_DIFFERENCES],
            cosine=min(cosines),
        )

    def _embedding(self, primary: list[float], shadow: list[float]) -> Comparison:
        cosine = _cosine(primary, shadow)
        if math.isnan(cosine):
            return _not_finite()
        ok = cosine >= self.settings.min_cosine
        return Comparison(
            "match" if ok else "mismatch",
            None if ok else "cosine",
            []
            if ok
            else [{"field": "embedding.cosine", "primary": 1.0, "shadow": round(cosine, 6)}],
            cosine=cosine,
        )


def _not_finite() -> Comparison:
    # Neither a match nor a mismatch: no angle can be measured to a vector holding NaN
    # or infinity, so the comparison is an error (agreement unknown).
    return Comparison("error", "an embedding holds a number that is not finite")


def _cosine(a: list[float], b: list[float]) -> float:
    """The cosine of the angle between two vectors, or NaN when either holds a number
    that is not finite (a base64 embedding may hold NaN or infinity).

    Each vector is first divided by its largest magnitude: the products of numbers near
    1e200 overflow to infinity (and a sum of +inf and -inf is NaN, which compares false
    with everything, so a threshold check took it for a match), and those of numbers
    near 1e-200 underflow to zero. Scaled, every product lies in [-1, 1]."""
    if len(a) != len(b):
        return 0.0
    if not (all(map(math.isfinite, a)) and all(map(math.isfinite, b))):
        return math.nan
    scale_a = max(map(abs, a), default=0.0)
    scale_b = max(map(abs, b), default=0.0)
    if not scale_a or not scale_b:
        return 1.0 if scale_a == scale_b else 0.0  # zero vectors agree only with each other
    a = [x / scale_a for x in a]
    b = [y / scale_b for y in b]
    dot = sum(x * y for x, y in zip(a, b, strict=True))
    norms = math.sqrt(sum(x * x for x in a)) * math.sqrt(sum(y * y for y in b))
    return max(-1.0, min(1.0, dot / norms))  # rounding may land just outside


# Fields two answers of the same model never share: a completion's id and its time.
_VOLATILE = ("id", "created", "system_fingerprint")


def _without_volatile(document: Any) -> Any:
    if isinstance(document, dict):
        return {k: v for k, v in document.items() if k not in _VOLATILE}
    return document


def _stable_events(body: bytes) -> bytes:
    """An event stream with the volatile fields left out of each event whose data is
    a JSON object (an OpenAI-style chunk repeats its answer's id and time); every
    other line as it is."""
    lines = body.split(b"\n")
    for index, line in enumerate(lines):
        if not line.startswith(b"data:"):
            continue
        data = line[5:].strip()
        if not data.startswith(b"{"):
            continue
        try:
            event = orjson.loads(data)
        except orjson.JSONDecodeError:
            continue
        if isinstance(event, dict) and any(key in event for key in _VOLATILE):
            lines[index] = b"data: " + orjson.dumps(_without_volatile(event))
    return b"\n".join(lines)
