"""Conditions over fields of a request's JSON, compiled once into plain predicates.

A condition is a mapping, written in the config as YAML:

    {field: "inputs[0].data[2]", gt: 5}          one operator per leaf:
                                                  eq ne lt le gt ge in exists
    {all: [cond, cond, ...]}                      every one holds
    {any: [cond, cond, ...]}                      at least one holds
    {not: cond}                                   it does not hold

A field that is missing, or of the wrong type for its operator, makes the leaf
false (``exists: false`` is the way to ask for a missing field). Compiling checks
the whole tree and raises ``ValueError`` naming the place of the first mistake.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from itertools import islice
from typing import Any

from sidecar.config.tensors import BytesTensor, Tensor

Predicate = Callable[[Any], bool]
FieldPath = tuple[str | int, ...]

MISSING = object()
_FIELD_TOKEN = re.compile(r"([A-Za-z0-9_\-]+)|\[(\d+)\]|\.")
_COMPARISONS = ("eq", "ne", "lt", "le", "gt", "ge", "in", "exists")


def parse_field_path(text: str) -> FieldPath:
    """``"inputs[0].data[2]"`` -> ``("inputs", 0, "data", 2)``."""
    if not isinstance(text, str) or not text:
        raise ValueError("a field path must be a non-empty string like 'inputs[0].data[2]'")
    parts: list[str | int] = []
    position = 0
    expect_name = True
    while position < len(text):
        match = _FIELD_TOKEN.match(text, position)
        if match is None:
            raise ValueError(f"bad field path {text!r} at character {position + 1}")
        name, index = match.group(1), match.group(2)
        if name is not None:
            if not expect_name:
                raise ValueError(f"bad field path {text!r}: missing '.' before {name!r}")
            parts.append(name)
            expect_name = False
        elif index is not None:
            if not parts:
                raise ValueError(f"bad field path {text!r}: starts with an index")
            parts.append(int(index))
        else:  # a dot
            if expect_name:
                raise ValueError(f"bad field path {text!r}: empty name")
            expect_name = True
        position = match.end()
    if expect_name:
        raise ValueError(f"bad field path {text!r}: ends with '.'")
    return tuple(parts)


def lookup(document: Any, path: FieldPath) -> Any:
    """The value at ``path``, or ``MISSING``."""
    node = document
    for part in path:
        if isinstance(part, int):
            if isinstance(node, list):
                if part >= len(node):
                    return MISSING
                node = node[part]
            elif isinstance(node, Tensor | BytesTensor):
                # A binary V2 tensor's data reads as a JSON array does (config.tensors);
                # not by its length: a BYTES tensor's is found by walking all of it.
                try:
                    node = node[part]
                except IndexError:
                    return MISSING
            else:
                return MISSING
        else:
            if not isinstance(node, dict) or part not in node:
                return MISSING
            node = node[part]
    return node


def _as_array(value: Any, longest: int) -> Any:
    """A binary tensor's data as the JSON array it stands for, to be tested for
    equality with arrays of at most ``longest`` elements: one element more tells a
    longer tensor apart, so a tensor of millions is not read whole."""
    if isinstance(value, Tensor | BytesTensor):
        return list(islice(value, longest + 1))
    return value


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _comparable(a: Any, b: Any) -> bool:
    return (_is_number(a) and _is_number(b)) or (isinstance(a, str) and isinstance(b, str))


def _leaf(path: FieldPath, operator: str, operand: Any, where: str) -> Predicate:
    if operator == "exists":
        if not isinstance(operand, bool):
            raise ValueError(f"{where}: 'exists' takes true or false")
        want = operand
        return lambda doc: (lookup(doc, path) is not MISSING) == want
    if operator == "in":
        if not isinstance(operand, list) or not operand:
            raise ValueError(f"{where}: 'in' takes a non-empty list")
        choices = tuple(operand)
        longest = max((len(c) for c in choices if isinstance(c, list)), default=0)
        return lambda doc: (
            (value := _as_array(lookup(doc, path), longest)) is not MISSING
            and any(type(value) is type(c) and value == c for c in choices)
        )
    if operator in ("eq", "ne"):
        expected = operand
        equal = operator == "eq"
        longest = len(expected) if isinstance(expected, list) else 0

        def compare_equal(doc: Any) -> bool:
            value = _as_array(lookup(doc, path), longest)
            if value is MISSING:
                return False
            same = type(value) is type(expected) and value == expected
            same = same or (_is_number(value) and _is_number(expected) and value == expected)
            return same if equal else not same

        return compare_equal
    if not (_is_number(operand) or isinstance(operand, str)):
        raise ValueError(f"{where}: '{operator}' takes a number or a string")
    bound = operand
    test: Callable[[Any, Any], bool] = {
        "lt": lambda a, b: a < b,
        "le": lambda a, b: a <= b,
        "gt": lambda a, b: a > b,
        "ge": lambda a, b: a >= b,
    }[operator]

    def compare_order(doc: Any) -> bool:
        value = lookup(doc, path)
        return value is not MISSING and _comparable(value, bound) and test(value, bound)

    return compare_order


def compile_condition(node: Any, where: str = "when") -> Predicate:
    """Check a condition tree and turn it into a predicate over a JSON document."""
    if not isinstance(node, Mapping):
        raise ValueError(f"{where}: a condition is a mapping")
    keys = set(node)
    for combinator in ("all", "any"):
        if combinator in keys:
            if keys != {combinator}:
                raise ValueError(f"{where}: '{combinator}' stands alone in its mapping")
            items = node[combinator]
            if not isinstance(items, Sequence) or isinstance(items, str) or not items:
                raise ValueError(f"{where}.{combinator}: takes a non-empty list of conditions")
            parts = tuple(
                compile_condition(item, f"{where}.{combinator}[{i}]")
                for i, item in enumerate(items)
            )
            if combinator == "all":
                return lambda doc: all(p(doc) for p in parts)
            return lambda doc: any(p(doc) for p in parts)
    if "not" in keys:
        if keys != {"not"}:
            raise ValueError(f"{where}: 'not' stands alone in its mapping")
        inner = compile_condition(node["not"], f"{where}.not")
        return lambda doc: not inner(doc)
    if "field" not in keys:
        raise ValueError(
            f"{where}: needs 'field' and one operator ({', '.join(_COMPARISONS)}), "
            "or one of all, any, not"
        )
    operators = keys - {"field"}
    unknown = sorted(operators - set(_COMPARISONS))
    if unknown:
        raise ValueError(f"{where}: unknown operator(s) {', '.join(unknown)}")
    if len(operators) != 1:
        raise ValueError(f"{where}: needs exactly one operator ({', '.join(_COMPARISONS)})")
    try:
        path = parse_field_path(node["field"])
    except ValueError as exc:
        raise ValueError(f"{where}.field: {exc}") from None
    (operator,) = operators
    return _leaf(path, operator, node[operator], where)
