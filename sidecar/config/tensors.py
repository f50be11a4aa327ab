"""KServe V2's binary tensor extension (Triton's, which tritonclient uses by default):
a body is a JSON head of ``Inference-Header-Content-Length`` bytes, then the bytes of
each binary tensor, in the order the head lists them, each as long as its
``parameters.binary_data_size``. Elements are little-endian, flat and row-major, as
a JSON tensor's ``data``; a BYTES element is a 4-byte length, then its bytes.

Here, beside the rules that read request fields, because every layer that reads a
V2 body needs it: the payload log, drift, the fallback's rules and cache, and the
validation of a V2 route.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator, Sequence
from typing import Any, Final, overload

import orjson

JSON_HEAD_LENGTH: Final = "Inference-Header-Content-Length"
JSON_HEAD_KEY: Final = b"inference-header-content-length"  # as the HTTP layer keys fields

# The elements of the numeric datatypes (little-endian).
_ELEMENTS: Final = {
    datatype: struct.Struct("<" + element)
    for datatype, element in (
        ("BOOL", "?"),
        ("UINT8", "B"),
        ("UINT16", "H"),
        ("UINT32", "I"),
        ("UINT64", "Q"),
        ("INT8", "b"),
        ("INT16", "h"),
        ("INT32", "i"),
        ("INT64", "q"),
        ("FP16", "e"),
        ("FP32", "f"),
        ("FP64", "d"),
    )
}
_BYTES_LENGTH: Final = struct.Struct("<I")


def json_head_length(value: str | None, size: int) -> int | None:
    """An ``Inference-Header-Content-Length``: the JSON head's length when it is
    one within a body of ``size`` bytes, else None."""
    # At most 18 digits: past 4,300 int() raises, on the request path.
    if value is None or len(value) > 18 or not value.isascii() or not value.isdigit():
        return None
    length = int(value)
    return length if length <= size else None


class Tensor(Sequence[Any]):
    """A binary tensor's elements, each decoded when it is read: a 16 MiB tensor is
    not turned into millions of Python numbers to read the three a rule names."""

    __slots__ = ("_data", "_element", "_length")

    def __init__(self, data: memoryview, element: struct.Struct) -> None:
        if len(data) % element.size:
            raise ValueError(f"{len(data)} bytes are not a whole number of elements")
        self._data = data
        self._element = element
        self._length = len(data) // element.size

    def __len__(self) -> int:
        return self._length

    @overload
    def __getitem__(self, index: int) -> Any: ...
    @overload
    def __getitem__(self, index: slice) -> list[Any]: ...
    def __getitem__(self, index: int | slice) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self._length))]
        if index < 0:
            index += self._length
        if not 0 <= index < self._length:
            raise IndexError("tensor index out of range")
        return self._element.unpack_from(self._data, index * self._element.size)[0]

    def __iter__(self) -> Iterator[Any]:
        for (value,) in self._element.iter_unpack(self._data):
            yield value

    def tolist(self) -> list[Any]:
        """Every element, in one call of C (a tenth of the time of iterating)."""
        element = self._element.format[1:]  # its format without the "<"
        return list(struct.unpack(f"<{self._length}{element}", self._data))


class BytesTensor(Sequence[str]):
    """A BYTES tensor's elements, as text (undecodable bytes replaced), found as they
    are read: each is a 4-byte length, then its bytes, so reading one walks the ones
    before it, and no further. A 16 MiB tensor of empty strings is four million of
    them: walked whole on the event loop, for a rule that reads the first, it would
    hold every other request up for a second.

    Bytes that cannot be an element end the tensor there (``broken`` says so)."""

    __slots__ = ("_data", "_ends", "broken")

    def __init__(self, data: memoryview) -> None:
        self._data = data
        self._ends = [0]  # where each element found so far ends (the first: 0)
        self.broken = False

    def _walk(self, count: int | None) -> None:
        """Find elements until ``count`` are known (None: all of them)."""
        data, ends = self._data, self._ends
        while count is None or len(ends) <= count:
            at = ends[-1]
            if at == len(data):
                return
            if at + 4 > len(data):
                self.broken = True
                return
            (length,) = _BYTES_LENGTH.unpack_from(data, at)
            if at + 4 + length > len(data):
                self.broken = True
                return
            ends.append(at + 4 + length)

    def __len__(self) -> int:
        self._walk(None)
        return len(self._ends) - 1

    @overload
    def __getitem__(self, index: int) -> str: ...
    @overload
    def __getitem__(self, index: slice) -> list[str]: ...
    def __getitem__(self, index: int | slice) -> str | list[str]:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        self._walk(index + 1)
        if not 0 <= index < len(self._ends) - 1:
            raise IndexError("tensor index out of range")
        start, end = self._ends[index] + 4, self._ends[index + 1]
        return bytes(self._data[start:end]).decode("utf-8", "replace")

    def __iter__(self) -> Iterator[str]:
        index = 0
        while True:
            self._walk(index + 1)
            if index >= len(self._ends) - 1:
                return
            yield self[index]
            index += 1


def _binary_size(tensor: dict[str, Any]) -> int | None:
    parameters = tensor.get("parameters")
    if not isinstance(parameters, dict) or "binary_data_size" not in parameters:
        return None
    size = parameters["binary_data_size"]
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise ValueError(f"binary_data_size {size!r} is not a byte count")
    return size


def read_v2(body: bytes, json_head: int | None, *, as_lists: bool = False) -> Any:
    """A V2 body as the JSON document it stands for: with binary tensors (``json_head``,
    the head's length), its JSON head with each binary tensor's elements as that
    tensor's ``data``: a ``Tensor`` or ``BytesTensor``, each element read when asked
    for; or, ``as_lists``, lists, to write out or compare whole. A tensor of a
    datatype V2 does not name is left without data.

    Raises ``ValueError`` (orjson's decode error is one) when the body is not JSON
    or its tensors do not fit it (with ``as_lists``, also a broken BYTES element)."""
    if json_head is None:
        return orjson.loads(body)
    document = orjson.loads(memoryview(body)[:json_head])
    if not isinstance(document, dict):
        return document
    view = memoryview(body)
    at = json_head
    for section in ("inputs", "outputs"):
        tensors = document.get(section)
        if not isinstance(tensors, list):
            continue
        for tensor in tensors:
            if not isinstance(tensor, dict):
                continue
            size = _binary_size(tensor)
            if size is None:
                continue
            if at + size > len(body):
                raise ValueError(f"binary tensor {tensor.get('name')!r} runs past the body")
            data = view[at : at + size]
            at += size
            datatype = tensor.get("datatype")
            elements: Tensor | BytesTensor
            if datatype == "BYTES":
                elements = BytesTensor(data)
            elif isinstance(datatype, str) and datatype in _ELEMENTS:
                elements = Tensor(data, _ELEMENTS[datatype])
            else:
                continue
            if as_lists:
                tensor["data"] = (
                    elements.tolist() if isinstance(elements, Tensor) else list(elements)
                )
                if isinstance(elements, BytesTensor) and elements.broken:
                    raise ValueError(f"BYTES tensor {tensor.get('name')!r} has a broken element")
            else:
                tensor["data"] = elements
    return document
