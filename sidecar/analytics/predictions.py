"""Reading predictions out of model responses, by protocol.

    v2         Open Inference Protocol: outputs[].data (one named output, or all)
    v1         TF-Serving / KServe V1: predictions (numbers, lists, or objects of numbers)
    openai     data[].embedding -> each vector's L2 norm; choices[] -> text length
               (embeddings as lists of floats, or base64 as the openai client asks)
    json_path  any field, written like inputs[0].data[2], flattened to numbers

Drift monitoring, shadow comparison and the ground-truth join all read through this.
"""

from __future__ import annotations

import array
import base64
import binascii
import math
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from itertools import islice
from typing import Any, Literal

import orjson

from sidecar.config.rules import MISSING, FieldPath, lookup, parse_field_path
from sidecar.config.tensors import Tensor

PredictionProtocol = Literal["v2", "v1", "openai", "json_path"]


def _numbers(node: Any) -> Iterator[float]:
    """Every number in a nested structure, in document order (booleans excluded).

    A stack, not recursion: an answer may nest as deep as the JSON parser allows
    (1,024 levels), past the interpreter's recursion limit."""
    stack: list[Iterator[Any]] = [iter((node,))]
    while stack:
        for item in stack[-1]:
            if isinstance(item, bool):
                continue
            if isinstance(item, float) or isinstance(item, int):  # noqa: SIM101 - compiled: two type checks
                yield float(item)
            elif isinstance(item, list) or isinstance(item, Tensor):  # noqa: SIM101
                stack.append(iter(item))
                break
            elif isinstance(item, dict):
                stack.append(iter(item.values()))
                break
        else:
            stack.pop()


@dataclass(frozen=True, slots=True)
class PredictionReader:
    protocol: PredictionProtocol = "v2"
    output: str | None = None  # V2: the output tensor's name
    path: FieldPath | None = None  # json_path
    raw_embeddings: bool = False  # OpenAI embeddings: every number, not each vector's norm

    @classmethod
    def build(
        cls,
        protocol: PredictionProtocol,
        output: str | None = None,
        json_path: str | None = None,
        *,
        raw_embeddings: bool = False,
    ) -> PredictionReader:
        if protocol == "json_path":
            if not json_path:
                raise ValueError("protocol json_path needs json_path")
            return cls(protocol, None, parse_field_path(json_path), raw_embeddings)
        return cls(protocol, output, None, raw_embeddings)

    def values(self, document: Any, limit: int | None = None) -> list[float]:
        """The prediction numbers of one response (empty when there are none); only
        the first ``limit`` when given, the rest not even read (an answer may hold
        hundreds of thousands, read one by one)."""
        if not isinstance(document, dict):
            return []
        if self.protocol == "v2":
            outputs = document.get("outputs")
            if not isinstance(outputs, list):
                return []
            found = (
                value
                for tensor in outputs
                if isinstance(tensor, dict)
                and (self.output is None or tensor.get("name") == self.output)
                for value in _numbers(tensor.get("data"))
            )
            return list(islice(found, limit))
        if self.protocol == "v1":
            return list(islice(_numbers(document.get("predictions")), limit))
        if self.protocol == "openai":
            data = document.get("data")
            if isinstance(data, list) and self.raw_embeddings:
                # A vector holding inf or NaN (base64 can) would poison the windows.
                finite = (
                    vector for vector in embeddings(document) if all(map(math.isfinite, vector))
                )
                return list(islice((v for vector in finite for v in vector), limit))
            if isinstance(data, list):
                # hypot scales as it goes: a vector of values near 1e200 has a finite
                # norm (a sum of squares overflows); one holding inf or NaN has none.
                norms = (math.hypot(*vector) for vector in embeddings(document))
                return list(islice((norm for norm in norms if math.isfinite(norm)), limit))
            choices = document.get("choices")
            if isinstance(choices, list):
                return [float(len(_choice_text(choice))) for choice in choices[:limit]]
            return []
        assert self.path is not None
        found = lookup(document, self.path)
        return [] if found is MISSING else list(islice(_numbers(found), limit))

    def label(self, document: Any) -> float | None:
        """One prediction per response: the value itself, or the argmax of several."""
        values = self.values(document)
        if not values:
            return None
        if len(values) == 1:
            return values[0]
        return float(max(range(len(values)), key=values.__getitem__))


def embeddings(document: Any) -> list[list[float]]:
    """Each vector of an OpenAI-style embeddings answer, whether it came as a list of
    floats or as base64 (little-endian float32: the openai client's default)."""
    data = document.get("data") if isinstance(document, dict) else None
    if not isinstance(data, list):
        return []
    vectors = []
    for item in data:
        if not isinstance(item, dict) or "embedding" not in item:
            continue
        embedding = item["embedding"]
        if isinstance(embedding, str):
            try:
                raw = base64.b64decode(embedding, validate=True)
            except (binascii.Error, ValueError):
                continue
            if len(raw) % 4:
                continue
            floats = array.array("f", raw)
            if sys.byteorder == "big":
                floats.byteswap()
            vectors.append(list(floats))
        else:
            vectors.append(list(_numbers(embedding)))
    return vectors


def _choice_text(choice: Any) -> str:
    if not isinstance(choice, dict):
        return ""
    message = choice.get("message")
    if isinstance(message, dict) and isinstance(message.get("content"), str):
        return str(message["content"])
    text = choice.get("text")
    return text if isinstance(text, str) else ""


def json_object(line: bytes, number: int, source: str = "") -> dict[str, Any]:
    """One JSON-lines record, or ValueError naming its line (and file)."""
    where = f"{source} line {number}" if source else f"line {number}"
    try:
        record = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"{where}: not JSON ({exc})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: not a JSON object")
    return record
