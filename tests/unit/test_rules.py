"""Fallback rule conditions: operators, combinators, missing fields, and load-time errors."""

from __future__ import annotations

import re
from typing import Any

import pytest

from sidecar.config.rules import compile_condition, parse_field_path
from sidecar.config.schema import ConfigError, parse_config

DOC = {
    "inputs": [{"name": "x", "data": [5.1, 3.5, 1.4, 0.2]}],
    "parameters": {"tier": "gold", "beta": True, "count": 3},
}


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"field": "inputs[0].data[2]", "gt": 1.0}, True),
        ({"field": "inputs[0].data[2]", "gt": 1.4}, False),
        ({"field": "inputs[0].data[2]", "ge": 1.4}, True),
        ({"field": "inputs[0].data[0]", "lt": 5.1}, False),
        ({"field": "inputs[0].data[0]", "lt": 4.0}, False),  # above: lt is not ne
        ({"field": "inputs[0].data[0]", "lt": 6.0}, True),
        ({"field": "inputs[0].data[4]", "exists": False}, True),  # one past the end: missing
        ({"field": "inputs[0].data[0]", "le": 5.1}, True),
        ({"field": "inputs[0].data[2]", "ge": 1.0}, True),  # strictly above: ge, not le
        ({"field": "inputs[0].data[2]", "ge": 2.0}, False),
        ({"field": "inputs[0].data[0]", "le": 6}, True),  # strictly below: le, not ge
        ({"field": "inputs[0].data[0]", "le": 5}, False),
        ({"field": "parameters.beta", "in": [1]}, False),  # true is not among the numbers
        ({"field": "inputs[0].data[2]", "gt": 9.0}, False),  # below: gt is not ne
        ({"field": "inputs[0].data[2]", "eq": 1.5}, False),  # another number of one type
        ({"field": "inputs[0].data[2]", "eq": 1.3}, False),
        ({"field": "parameters.count", "eq": 2}, False),
        ({"field": "parameters.count", "ne": 2}, True),
        # equal, not identical (built at run time: literals would be interned)
        ({"field": "parameters.tier", "eq": "".join(["gol", "d"])}, True),
        ({"field": "parameters.tier", "in": ["".join(["g", "old"])]}, True),
        ({"field": "parameters.count", "in": [2]}, False),  # 3 is not among them
        ({"field": "parameters.tier", "in": ["silver"]}, False),
        ({"field": "inputs[0].data[1]", "le": 3.5}, True),
        ({"field": "inputs[0].data[1]", "lt": 3.5}, False),
        ({"field": "parameters.tier", "eq": "gold"}, True),
        ({"field": "parameters.tier", "ne": "gold"}, False),
        ({"field": "parameters.count", "eq": 3.0}, True),
        ({"field": "parameters.beta", "eq": 1}, False),  # true is not the number 1
        ({"field": "parameters.tier", "in": ["silver", "gold"]}, True),
        ({"field": "parameters.count", "in": [True]}, False),
        ({"field": "parameters.tier", "exists": True}, True),
        ({"field": "parameters.nope", "exists": False}, True),
        ({"field": "parameters.tier", "exists": False}, False),
        ({"field": "parameters.nope", "eq": None}, False),  # missing is not null
        ({"field": "parameters.nope", "ne": "x"}, False),  # missing never compares
        ({"field": "inputs[5].data", "exists": True}, False),
        ({"field": "parameters.tier", "gt": 5}, False),  # a string is not above a number
        ({"field": "parameters.tier", "gt": "apple"}, True),
        (
            {
                "all": [
                    {"field": "parameters.tier", "eq": "gold"},
                    {"field": "inputs[0].data[3]", "lt": 1},
                ]
            },
            True,
        ),
        (
            {
                "any": [
                    {"field": "parameters.tier", "eq": "bronze"},
                    {"field": "inputs[0].name", "eq": "x"},
                ]
            },
            True,
        ),
        ({"not": {"field": "parameters.tier", "eq": "gold"}}, False),
    ],
)
def test_conditions(condition: dict[str, Any], expected: bool) -> None:
    assert compile_condition(condition)(DOC) is expected


def test_non_object_documents_never_match() -> None:
    predicate = compile_condition({"field": "a", "exists": True})
    for document in (None, [], "a", 3):
        assert predicate(document) is False


@pytest.mark.parametrize(
    ("text", "parts"),
    [("a", ("a",)), ("a.b", ("a", "b")), ("a[0]", ("a", 0)), ("a[0][1].b-c", ("a", 0, 1, "b-c"))],
)
def test_field_paths(text: str, parts: tuple[Any, ...]) -> None:
    assert parse_field_path(text) == parts


@pytest.mark.parametrize("text", ["", "[0]", "a.", ".a", "a..b", "a[x]", "a b", "a[0]b"])
def test_bad_field_paths(text: str) -> None:
    with pytest.raises(ValueError, match="field path"):
        parse_field_path(text)


@pytest.mark.parametrize(
    ("condition", "message"),
    [
        ({"field": "a", "gtt": 1}, "unknown operator(s) gtt"),
        ({"field": "a", "gt": 1, "lt": 2}, "exactly one operator"),
        ({"field": "a"}, "exactly one operator"),
        ({"gt": 1}, "needs 'field'"),
        ({"field": "a", "in": []}, "non-empty list"),
        ({"field": "a", "exists": "yes"}, "true or false"),
        ({"field": "a", "gt": [1]}, "a number or a string"),
        ({"all": []}, "when.all: takes a non-empty list"),
        ({"all": [{"field": "a", "eq": 1}], "field": "a"}, "stands alone"),
        ({"any": [{"field": "a", "eq": 1}, {"field": "..", "eq": 1}]}, "when.any[1].field"),
        ("a > 5", "a condition is a mapping"),
    ],
)
def test_mistakes_are_named(condition: Any, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        compile_condition(condition)


def test_a_bad_rule_is_a_config_error_with_its_path() -> None:
    text = """
upstreams:
  model: {url: "http://127.0.0.1:1"}
  simple: {url: "http://127.0.0.1:2"}
routes:
  - name: infer
    upstream: model
    fallback:
      triggers: [circuit_open, meteor_strike]
      chain:
        - rules:
            - name: ok
              when: {field: "inputs[0].data[0]", gt: 5}
              respond: {body: {label: 2}}
            - name: broken
              when: {all: [{field: x, between: [1, 2]}]}
              respond: {body: {}}
        - static: {body: {}, cache: {}}
        - {}
        - upstream: {name: nowhere}
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="t", env={})
    issues = [str(i) for i in caught.value.issues]
    assert any(i.startswith("routes[0].fallback.triggers[1]: ") for i in issues), issues
    assert any(
        i.startswith("routes[0].fallback.chain[0].rules[1].when: ")
        and "when.all[0]: unknown operator(s) between" in i
        for i in issues
    ), issues
    assert "routes[0].fallback.chain[1].static.cache: unknown key" in issues
    assert (
        "routes[0].fallback.chain[2]: each step is exactly one of: cache, rules, static, upstream"
    ) in issues


def test_fallback_upstream_must_exist_and_differ() -> None:
    base = """
upstreams:
  model: {url: "http://127.0.0.1:1"}
routes:
  - name: infer
    upstream: model
    fallback:
      chain:
        - upstream: {name: %s}
"""
    for name, message in (
        ("nowhere", "no upstream named 'nowhere'"),
        ("model", "must differ from the route's"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(base % name, source="t", env={})
        issue = caught.value.issues[0]
        assert issue.path == "routes[0].fallback.chain[0].upstream.name"
        assert message in issue.message


def test_a_bad_field_path_names_the_character() -> None:
    with pytest.raises(ValueError, match=r"bad field path 'ab\[x\]' at character 3"):
        parse_field_path("ab[x]")


def test_a_bad_field_path_names_the_character_at_odd_places_too() -> None:
    with pytest.raises(ValueError, match=r"bad field path 'a\[x\]' at character 2"):
        parse_field_path("a[x]")


def test_not_stands_alone_in_its_mapping() -> None:
    with pytest.raises(ValueError, match="'not' stands alone"):
        compile_condition({"not": {"field": "a", "exists": True}, "field": "b"})


@pytest.mark.parametrize(
    ("condition", "expected"),
    [
        ({"field": "inputs[0].data", "eq": [0, 0, 7]}, True),
        ({"field": "inputs[0].data", "eq": [0, 0]}, False),  # a prefix is not the array
        ({"field": "inputs[0].data", "eq": [0, 0, 7, 0]}, False),
        ({"field": "inputs[0].data", "ne": [0, 0, 7]}, False),
        ({"field": "inputs[0].data", "ne": [0, 0, 0]}, True),
        ({"field": "inputs[0].data", "in": [[1], [0, 0, 7]]}, True),
        ({"field": "inputs[0].data", "in": [[1], 7]}, False),
        ({"field": "inputs[1].data", "eq": ["a", ""]}, True),
        ({"field": "inputs[1].data", "ne": ["a", ""]}, False),
    ],
)
def test_a_binary_tensor_s_data_compares_as_the_json_array_it_stands_for(
    condition: dict[str, Any], expected: bool
) -> None:
    """The README: inputs[0].data "reads the same in either form". Compared whole, a
    binary tensor's data was never equal to an array (eq, in: false; ne: true), so a
    rule met by a JSON request was missed by the same request in tritonclient's
    default binary form, and one asking ne was met by every binary request."""
    import struct

    import orjson

    from sidecar.config.tensors import read_v2

    numbers = struct.pack("<3q", 0, 0, 7)
    strings = struct.pack("<I", 1) + b"a" + struct.pack("<I", 0)
    tensors = [
        {"name": "x", "datatype": "INT64", "parameters": {"binary_data_size": len(numbers)}},
        {"name": "s", "datatype": "BYTES", "parameters": {"binary_data_size": len(strings)}},
    ]
    head = orjson.dumps({"inputs": tensors})
    binary = read_v2(head + numbers + strings, len(head))
    as_json = read_v2(head + numbers + strings, len(head), as_lists=True)
    predicate = compile_condition(condition)
    assert predicate(as_json) is expected  # the same request in JSON
    assert predicate(binary) is expected
