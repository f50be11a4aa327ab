"""KServe V2's binary tensor extension: a JSON head, then each binary tensor's bytes."""

from __future__ import annotations

import struct
from typing import Any

import orjson
import pytest

from sidecar.config.rules import MISSING, compile_condition, lookup, parse_field_path
from sidecar.config.tensors import BytesTensor, Tensor, json_head_length, read_v2


def binary_body(*tensors: tuple[str, str, bytes], section: str = "inputs") -> tuple[bytes, int]:
    """A body of (name, datatype, raw bytes) tensors, as tritonclient sends one, and
    its JSON head length."""
    head = orjson.dumps(
        {
            section: [
                {
                    "name": name,
                    "datatype": datatype,
                    "shape": [1, 1],
                    "parameters": {"binary_data_size": len(raw)},
                }
                for name, datatype, raw in tensors
            ]
        }
    )
    return head + b"".join(raw for _, _, raw in tensors), len(head)


def test_a_head_length_is_a_plain_count_of_bytes_within_the_body() -> None:
    values = (None, "", "4", "10", "11", "-1", "\u0664", "0" * 4999 + "4", " 4", "4.0")
    got = [json_head_length(v, 10) for v in values]
    assert got == [None, None, 4, 10, None, None, None, None, None, None]
    # Eighteen digits are a length (past 4,300, int() raises): nineteen are not.
    assert json_head_length("1" * 18, 10**19) == int("1" * 18)
    assert json_head_length("1" * 19, 10**19) is None


@pytest.mark.parametrize(
    ("datatype", "element", "values"),
    [
        ("BOOL", "?", [True, False, True]),
        ("UINT8", "B", [0, 7, 255]),
        ("UINT16", "H", [1, 65535, 3]),
        ("UINT32", "I", [1, 2**32 - 1, 3]),
        ("UINT64", "Q", [1, 2**64 - 1, 3]),
        ("INT8", "b", [-128, 0, 127]),
        ("INT16", "h", [-2, 300, -32768]),
        ("INT32", "i", [-(2**31), 5, 6]),
        ("INT64", "q", [-(2**63), 5, 2**62]),
        ("FP16", "e", [1.5, -2.0, 0.25]),
        ("FP32", "f", [6.900000095367432, 3.0999999046325684, -5.5]),
        ("FP64", "d", [6.9, 3.1, -5.5e300]),
    ],
)
def test_each_numeric_datatype_reads_as_its_little_endian_elements(
    datatype: str, element: str, values: list[Any]
) -> None:
    raw = struct.pack(f"<{len(values)}{element}", *values)
    body, head = binary_body(("x", datatype, raw))
    data = read_v2(body, head)["inputs"][0]["data"]
    assert isinstance(data, Tensor)
    assert len(data) == 3
    assert list(data) == values
    assert [data[0], data[2], data[-1], data[-3]] == [values[0], values[2], values[2], values[0]]
    assert data[1:] == values[1:]
    for past in (3, 100, -4):
        with pytest.raises(IndexError):
            data[past]
    assert read_v2(body, head, as_lists=True)["inputs"][0]["data"] == values


def test_tensors_follow_the_head_in_its_order_and_a_json_tensor_keeps_its_data() -> None:
    first = struct.pack("<2f", 1.0, 2.0)
    second = struct.pack("<3q", 7, 8, 9)
    head = orjson.dumps(
        {
            "id": "r",
            "inputs": [
                {"name": "a", "datatype": "FP32", "parameters": {"binary_data_size": 8}},
                {"name": "j", "datatype": "FP32", "data": [5.0]},
                {"name": "b", "datatype": "INT64", "parameters": {"binary_data_size": 24}},
            ],
            "outputs": [{"name": "out", "parameters": {"binary_data": True}}],
        }
    )
    document = read_v2(head + first + second, len(head), as_lists=True)
    assert [t["data"] for t in document["inputs"]] == [[1.0, 2.0], [5.0], [7, 8, 9]]
    assert document["id"] == "r"
    assert "data" not in document["outputs"][0]  # asked for, not sent


def test_an_answer_s_binary_outputs_read_as_its_inputs_do() -> None:
    body, head = binary_body(("label", "INT64", struct.pack("<q", 2)), section="outputs")
    assert read_v2(body, head, as_lists=True)["outputs"][0]["data"] == [2]


def test_bytes_elements_are_length_prefixed_text() -> None:
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"hello", b"", b"\xff\xfeok"))
    body, head = binary_body(("t", "BYTES", raw))
    data = read_v2(body, head)["inputs"][0]["data"]
    assert isinstance(data, BytesTensor)
    assert (data[2], data[0], data[-2]) == ("\ufffd\ufffdok", "hello", "")
    assert list(data) == ["hello", "", "\ufffd\ufffdok"]
    assert (len(data), data[1:], data.broken) == (3, ["", "\ufffd\ufffdok"], False)
    assert (data[-1], data[-3]) == ("\ufffd\ufffdok", "hello")
    for past in (3, 100, -4):
        with pytest.raises(IndexError):
            data[past]
    assert read_v2(body, head, as_lists=True)["inputs"][0]["data"] == list(data)


@pytest.mark.parametrize("cut", [2, 7, 8, 12, 13, None])
def test_a_broken_bytes_element_ends_the_tensor_and_cannot_be_written_out(cut: int | None) -> None:
    whole = struct.pack("<I", 1) + b"a" + struct.pack("<I", 5) + b"abcde"
    raw = whole[:cut] if cut is not None else whole + b"\x01"
    body, head = binary_body(("t", "BYTES", raw))
    data = read_v2(body, head)["inputs"][0]["data"]
    found = {2: [], 7: ["a"], 8: ["a"], 12: ["a"], 13: ["a"], None: ["a", "abcde"]}[cut]
    # Iterated first, with no length asked (list() asks for one, which walks all).
    assert [element for element in data] == found
    assert (len(data), data.broken) == (len(found), True)
    with pytest.raises(ValueError, match="broken element"):
        read_v2(body, head, as_lists=True)
    assert lookup(read_v2(body, head), parse_field_path("inputs[0].data[2]")) is MISSING


def test_a_fresh_bytes_tensor_reads_any_element_first_and_iterates_past_256() -> None:
    raw = b"".join(struct.pack("<I", len(s)) + s for s in (b"a", b"b", b""))
    body, head = binary_body(("t", "BYTES", raw))
    assert read_v2(body, head)["inputs"][0]["data"][1] == "b"  # an odd index, first
    ends_empty = read_v2(body, head)["inputs"][0]["data"]
    assert ([e for e in ends_empty], ends_empty.broken) == (["a", "b", ""], False)
    body, head = binary_body(("t", "BYTES", struct.pack("<I", 0) * 300))
    many = read_v2(body, head)["inputs"][0]["data"]
    assert sum(1 for _ in many) == 300  # iterated before its length is known


def test_an_entry_that_is_not_a_tensor_is_passed_over() -> None:
    raw = struct.pack("<2b", 1, 2)
    tensor = {"name": "x", "datatype": "INT8", "parameters": {"binary_data_size": 2}}
    head = orjson.dumps({"inputs": [5, tensor]})
    assert read_v2(head + raw, len(head), as_lists=True)["inputs"][1]["data"] == [1, 2]


def test_long_and_empty_tensors_are_whole_tensors() -> None:
    long = b"x" * 300
    body, head = binary_body(("t", "BYTES", struct.pack("<I", 300) + long), ("e", "FP32", b""))
    text, empty = read_v2(body, head)["inputs"]
    assert ([e for e in text["data"]], text["data"].broken) == ([long.decode()], False)
    assert list(empty["data"]) == []


def test_a_bytes_element_is_found_by_walking_only_the_ones_before_it() -> None:
    """Four million empty strings in 16 MiB: a rule reading the first must not walk
    them all on the event loop."""
    body, head = binary_body(("t", "BYTES", b"\x00" * (16 << 20)))
    data = read_v2(body, head)["inputs"][0]["data"]
    assert lookup({"d": data}, parse_field_path("d[2]")) == ""
    assert len(data._ends) == 4  # three elements found, none past them


def test_an_unknown_datatype_is_skipped_over_without_data() -> None:
    body, head = binary_body(("odd", "COMPLEX64", b"\x00" * 8), ("x", "INT8", b"\x05"))
    inputs = read_v2(body, head)["inputs"]
    assert "data" not in inputs[0]
    assert list(inputs[1]["data"]) == [5]


@pytest.mark.parametrize(
    ("tensor", "tail", "error"),
    [
        ({"datatype": "FP32", "parameters": {"binary_data_size": 8}}, b"\x00" * 4, "past the body"),
        ({"datatype": "FP32", "parameters": {"binary_data_size": 3}}, b"\x00" * 3, "whole number"),
        ({"datatype": "FP32", "parameters": {"binary_data_size": -1}}, b"", "byte count"),
        ({"datatype": "FP32", "parameters": {"binary_data_size": True}}, b"", "byte count"),
        ({"datatype": "FP32", "parameters": {"binary_data_size": "4"}}, b"\x00" * 4, "byte count"),
    ],
)
def test_tensors_that_do_not_fit_the_body_are_refused(
    tensor: dict[str, Any], tail: bytes, error: str
) -> None:
    head = orjson.dumps({"inputs": [{"name": "x", **tensor}]})
    with pytest.raises(ValueError, match=error):
        read_v2(head + tail, len(head))


def test_a_body_without_a_head_length_is_json_and_a_broken_head_is_refused() -> None:
    assert read_v2(b'{"inputs": []}', None) == {"inputs": []}
    assert read_v2(b"[1]\x00\x01", 3) == [1]  # not an object: nothing to fill in
    with pytest.raises(ValueError, match="unexpected character"):
        read_v2(b'{"inputs": [}\x00', 13)
    with pytest.raises(ValueError, match="unexpected content"):
        read_v2(b'{"inputs": []}\x00', None)  # the tensors are not JSON


def test_rules_and_field_paths_read_a_binary_tensor_as_a_json_array() -> None:
    body, head = binary_body(("iris", "FP32", struct.pack("<4f", 6.9, 3.1, 5.4, 2.1)))
    document = read_v2(body, head)
    assert lookup(document, parse_field_path("inputs[0].data[2]")) == pytest.approx(5.4)
    assert lookup(document, parse_field_path("inputs[0].data[4]")) is MISSING
    assert compile_condition({"field": "inputs[0].data[2]", "gt": 5})(document)
    assert not compile_condition({"field": "inputs[0].data[2]", "lt": 5})(document)
