"""sidecar.pipeline.validation: content type, strict JSON and a route's JSON Schema,
called directly."""

from __future__ import annotations

import math
import struct
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.config.jsontext import _key_count, _keys_in, repeats_a_key
from sidecar.config.schema import ValidationSettings
from sidecar.config.schemas import CompiledSchema, SchemaError, load_schema
from sidecar.http import errors
from sidecar.pipeline.validation import (
    RequestValidator,
    SchemaFailed,
    nesting_exceeds,
    schema_field,
)
from sidecar.telemetry.metrics import Metrics

SCHEMA = {
    "type": "object",
    "required": ["inputs"],
    "properties": {
        "inputs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "name": {"type": "string"},
                    "data": {"type": "array", "items": {"type": "number"}},
                },
            },
        },
        "params": {"type": "object", "additionalProperties": {"type": "integer"}},
    },
}


def schema(tmp_path: Path, document: Any = SCHEMA) -> CompiledSchema:
    path = tmp_path / "schema.json"
    path.write_bytes(orjson.dumps(document))
    return load_schema(path)


class Validator:
    def __init__(self, compiled: CompiledSchema | None = None, **settings: Any) -> None:
        self.metrics = Metrics()
        self.validator = RequestValidator(
            "infer", ValidationSettings.model_validate(settings), compiled, self.metrics
        )

    def violations(self, field: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sidecar_schema_violations_total", {"route": "infer", "field": field}
        )
        return value or 0.0

    def invalid(self, body: bytes) -> str:
        with pytest.raises(errors.InvalidJson) as refused:
            self.validator.check_body(body)
        return refused.value.message

    def violation(self, document: Any) -> errors.SchemaViolation:
        with pytest.raises(SchemaFailed) as failed:
            self.validator.check_body(orjson.dumps(document))
        assert failed.value.document == document
        return self.validator.violation(failed.value.document)


# loading a schema


def test_a_schema_that_cannot_be_read_names_its_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"cannot read .*missing.json: No such file"):
        load_schema(tmp_path / "missing.json")


def test_a_schema_that_is_not_json_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "schema.json"
    path.write_text("{type: object")
    with pytest.raises(SchemaError, match=r"schema.json is not JSON"):
        load_schema(path)


def test_a_schema_that_is_not_a_json_schema_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SchemaError, match=r"is not a valid JSON Schema: 5 is not valid"):
        schema(tmp_path, {"type": 5})
    with pytest.raises(SchemaError, match=r"is not a valid JSON Schema"):
        schema(tmp_path, {"type": "object", "properties": {"a": {"pattern": "("}}})


# nesting


def nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


def test_nesting_up_to_the_limit_passes_and_one_more_level_does_not() -> None:
    assert not nesting_exceeds(nested(3), 3)
    assert nesting_exceeds(nested(4), 3)
    assert not nesting_exceeds(b'{"a": [{"b": [1]}]}', 4)
    assert nesting_exceeds(b'{"a": [{"b": [1]}]}', 3)


def test_many_brackets_side_by_side_are_not_deep() -> None:
    assert not nesting_exceeds(b"[[], [], [], [], [[]]]", 3)
    assert nesting_exceeds(b"[[], [], [], [], [[[]]]]", 3)


def test_brackets_inside_strings_do_not_count() -> None:
    assert not nesting_exceeds(b'{"a": "[[[[[[[[{{{{"}', 2)
    assert not nesting_exceeds(b'{"a": "\\"[[[[[[[[[", "b": "x"}', 2)
    assert not nesting_exceeds(b'{"a": "\\\\", "b": "[[[[[[[[["}', 2)
    assert nesting_exceeds(b'{"a": "\\\\", "b": [[[1]]]}', 2)


# repeated keys


def repeats(body: bytes) -> bool:
    return repeats_a_key(body, orjson.loads(body))


def test_a_key_named_twice_in_one_object_is_found() -> None:
    assert repeats(b'{"a": 1, "a": 2}')
    assert repeats(b'{"x": {"a" : 1, "a" : 2}}')
    assert repeats(b'{"a\\"b": 1, "a\\"b": 2}')


def test_a_repeat_deep_in_arrays_of_objects_is_found() -> None:
    assert repeats(b'[1, {"k": [{"k": 1, "k": 1}]}]')
    assert repeats(b'{"inputs": [{"data": [1, 2]}, {"name": "b", "name": "c"}]}')
    assert not repeats(b'{"inputs": [{"name": "a"}, {"name": "b"}], "name": "c"}')
    assert not repeats(b'"a string: with a colon"')
    assert not repeats(b"5")


json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=30,
)


@given(json_values)
def test_the_parsed_document_counts_the_keys_its_text_has(document: Any) -> None:
    # Written by orjson, a document names each key once: as many keys as its text.
    text = orjson.dumps(document)
    assert _keys_in(orjson.loads(text)) == _key_count(text)
    assert not repeats(text)


@given(st.dictionaries(st.text(), json_values, min_size=1, max_size=4), json_values)
def test_a_key_named_again_is_found_whatever_the_strings_hold(
    document: dict[str, Any], again: Any
) -> None:
    # Strings may hold colons: the one-count shortcut must then give way to the count
    # of keys in the text.
    text = orjson.dumps(document)
    key = next(iter(document))
    repeated = b"{" + orjson.dumps(key) + b":" + orjson.dumps(again) + b"," + text[1:]
    assert repeats(repeated)
    assert repeats(b"[" + text + b"," + repeated + b"]")


def test_the_same_key_in_different_objects_or_as_a_value_is_not_a_repeat() -> None:
    assert not repeats(b'{"a": 1, "b": {"a": 2}}')
    assert not repeats(b'{"a": "a", "b": ":"}')
    assert not repeats(b'[1, 2, {"a": 1}]')
    assert not repeats(b'{"a\\\\": 1, "b": 2}')
    assert not repeats(b"[1, 2, 3]")


# content types


def test_any_content_type_is_accepted_without_a_list() -> None:
    Validator().validator.check_content_type("text/plain", True)


def test_a_body_of_another_content_type_is_refused_with_the_accepted_ones() -> None:
    v = Validator(content_types=["Application/JSON", "application/x-ndjson"])
    v.validator.check_content_type("application/json", True)
    v.validator.check_content_type("APPLICATION/JSON", True)
    v.validator.check_content_type("text/plain", False)  # no body: nothing to judge
    with pytest.raises(errors.UnsupportedMediaType) as refused:
        v.validator.check_content_type("text/plain", True)
    assert refused.value.message == (
        "content type 'text/plain' is not accepted here; use application/json, application/x-ndjson"
    )
    assert refused.value.status == 415
    with pytest.raises(errors.UnsupportedMediaType, match=r"content type '\(none\)'"):
        v.validator.check_content_type("", True)


# bodies


def test_a_route_that_asks_for_nothing_reads_nothing() -> None:
    assert Validator().validator.check_body(b"not json") is None


def test_a_json_route_returns_the_document_and_refuses_what_is_not_json() -> None:
    v = Validator(json=True)
    assert v.validator.check_body(b'{"a": [1, 2]}') == {"a": [1, 2]}
    assert v.invalid(b"{nope") == "the body is not valid JSON (UTF-8, no NaN or Infinity)"
    assert v.invalid(b"[NaN]") == "the body is not valid JSON (UTF-8, no NaN or Infinity)"


def test_a_body_deeper_than_the_limit_is_refused_whoever_notices() -> None:
    v = Validator(json=True, max_depth=5)
    assert v.validator.check_body(nested(5)) == [[[[[]]]]]
    assert v.invalid(nested(6)) == "JSON nests deeper than 5 levels"
    assert v.invalid(nested(2000)) == "JSON nests deeper than 5 levels"  # past orjson's own limit


def test_a_body_repeating_a_key_is_refused() -> None:
    assert Validator(json=True).invalid(b'{"a": 1, "a": 1}') == (
        "the body repeats a key in one object: models may read either copy"
    )


def test_a_schema_makes_a_route_read_json(tmp_path: Path) -> None:
    v = Validator(schema(tmp_path))
    assert v.validator.check_body(b'{"inputs": []}') == {"inputs": []}
    assert v.invalid(b"{") == "the body is not valid JSON (UTF-8, no NaN or Infinity)"


@pytest.mark.parametrize(
    "draft",
    [
        "http://json-schema.org/draft-07/schema#",
        "https://json-schema.org/draft/2020-12/schema",
        None,  # no $schema: 2020-12
    ],
)
def test_the_check_and_the_listing_agree_whatever_the_draft(
    tmp_path: Path, draft: str | None
) -> None:
    """The fast check (jsonschema-rs) and the listing (jsonschema) read a schema
    alike: ``format`` only annotates, in every draft (fastjsonschema asserted it in
    draft 7 while the listing did not, so such a refusal listed nothing), and a
    2020-12 keyword counts where the draft has it."""
    document: dict[str, Any] = {
        "type": "object",
        "properties": {
            "email": {"type": "string", "format": "email"},
            "pair": {"prefixItems": [{"type": "string"}]},  # 2020-12 only
        },
    }
    if draft is not None:
        document["$schema"] = draft
    v = Validator(schema(tmp_path, document))
    assert v.validator.check_body(b'{"email": "not an address"}') == {"email": "not an address"}
    body = b'{"pair": [1]}'
    if draft is not None and "draft-07" in draft:
        assert v.validator.check_body(body) == {"pair": [1]}
        return
    with pytest.raises(SchemaFailed) as failed:
        v.validator.check_body(body)
    listed = v.validator.violation(failed.value.document).details or []
    assert [d["path"] for d in listed] == ["pair[0]"]


def test_a_violation_lists_every_failing_path_and_counts_each_schema_place(tmp_path: Path) -> None:
    v = Validator(schema(tmp_path))
    document = {"inputs": [{"name": 1, "data": [1, "x"]}], "params": {"k": "v"}}
    violation = v.violation(document)
    assert violation.status == 422
    assert violation.message == (
        "the body does not match the route's schema at: inputs[0].data[1], inputs[0].name, params.k"
    )
    assert violation.details == [
        {"path": "inputs[0].data[1]", "message": "'x' is not of type 'number'"},
        {"path": "inputs[0].name", "message": "1 is not of type 'string'"},
        {"path": "params.k", "message": "'v' is not of type 'integer'"},
    ]
    assert v.violations("inputs[*].data[*]") == 1.0
    assert v.violations("inputs[*].name") == 1.0
    assert v.violations("params.{*}") == 1.0


def test_a_violation_at_the_top_is_at_dollar(tmp_path: Path) -> None:
    v = Validator(schema(tmp_path))
    violation = v.violation({"params": {}})
    assert violation.message == "the body does not match the route's schema at: $"
    assert violation.details == [{"path": "$", "message": "'inputs' is a required property"}]
    assert v.violations("$") == 1.0
    assert v.violation([1]).details == [{"path": "$", "message": "[1] is not of type 'object'"}]


def test_at_most_twenty_failing_paths_are_listed(tmp_path: Path) -> None:
    v = Validator(schema(tmp_path))
    many = v.violation({"inputs": [{"name": i} for i in range(30)]})
    assert len(many.details or []) == 20
    assert many.message.endswith(" (and more)")
    few = v.violation({"inputs": [{"name": i} for i in range(19)]})
    assert len(few.details or []) == 19
    assert not few.message.endswith(" (and more)")
    assert few.message.count(", ") == 18


def test_failing_paths_are_listed_in_path_order(tmp_path: Path) -> None:
    v = Validator(
        schema(
            tmp_path,
            {"type": "object", "properties": {"b": {"type": "string"}, "a": {"type": "string"}}},
        )
    )
    violation = v.violation({"b": 1, "a": 2})
    assert [d["path"] for d in violation.details or []] == ["a", "b"]


def test_long_messages_are_cut_to_two_hundred_characters(tmp_path: Path) -> None:
    v = Validator(schema(tmp_path, {"type": "object", "properties": {"a": {"type": "string"}}}))
    violation = v.violation({"a": ["x" * 300]})
    details = violation.details or []
    assert len(details[0]["message"]) == 200


def test_a_violation_in_an_empty_schema_path_counts_at_the_top(tmp_path: Path) -> None:
    v = Validator(schema(tmp_path, {"type": "array"}))
    v.violation({})
    assert v.violations("$") == 1.0


# naming a schema place


def test_schema_places_are_named_by_the_schemas_structure() -> None:
    assert schema_field(["properties", "inputs", "items", "properties", "data", "type"]) == (
        "inputs[*].data"
    )
    assert schema_field(["additionalProperties", "type"]) == "{*}"
    assert schema_field(["properties", "params", "additionalProperties", "type"]) == "params.{*}"
    assert schema_field(["patternProperties", "^x", "type"]) == "{*}"
    assert schema_field(
        ["properties", "p", "patternProperties", "^x", "properties", "n", "type"]
    ) == ("p.{*}.n")
    assert schema_field(["prefixItems", 0, "type"]) == "[*]"
    assert schema_field(["properties", "a", "additionalItems", "type"]) == "a[*]"
    assert schema_field(["items", "type"]) == "[*]"
    assert schema_field(["required"]) == "$"
    assert schema_field(["properties"]) == "$"
    assert schema_field(["properties", "properties", "type"]) == "properties"
    assert schema_field(["allOf", 1, "properties", "a", "type"]) == "a"


def test_a_repeat_is_found_whatever_the_values_around_it() -> None:
    assert repeats(b'{"a": 1, "c": 2, "a": "v"}')
    assert repeats(b'{"a": 1, "b": "v", "a": 1}')


def test_escaped_characters_in_values_are_not_taken_for_keys() -> None:
    assert not repeats(b'{"a": "\\u003ax", "b": "\\u003a"}')


def test_hundreds_of_distinct_keys_are_not_a_repeat() -> None:
    body = orjson.dumps({f"k{i}": i for i in range(300)}, option=orjson.OPT_INDENT_2)
    assert not repeats(body)
    assert Validator(json=True).validator.check_body(body) == orjson.loads(body)


def test_schema_places_skip_what_names_a_pattern_or_stands_alone() -> None:
    assert schema_field(["items", "properties", "type"]) == "[*]"  # no name after it
    assert schema_field(["additionalProperties", "properties", "n", "type"]) == "{*}.n"
    assert schema_field(["patternProperties", "items", "type"]) == "{*}"  # "items" is a pattern


def test_a_property_named_like_a_keyword_is_a_name() -> None:
    assert schema_field(["properties", "items", "type"]) == "items"
    assert schema_field(["properties", "items", "properties", "x", "type"]) == "items.x"


def test_a_pattern_keyword_at_the_end_names_any_key() -> None:
    assert schema_field(["properties", "p", "patternProperties", "minProperties"]) == "p.{*}"


def test_hundreds_of_distinct_keys_with_a_colon_in_a_string_are_not_a_repeat() -> None:
    # A colon in a string sends the check to counting the text's keys: 301 there and
    # 301 in the document, compared as numbers (not as objects: past 256, equal
    # counts are distinct int objects).
    document: dict[str, Any] = {f"k{i}": i for i in range(300)}
    document["time"] = "12:30"
    body = orjson.dumps(document)
    assert not repeats(body)
    assert Validator(json=True).validator.check_body(body) == document
    assert repeats(body[:-1] + b',"k7":7}')


def test_objects_alone_nested_past_the_limit_are_too_deep() -> None:
    body = b'{"a": {"a": {"a": {"a": 1}}}}'  # four levels, no array
    assert not nesting_exceeds(body, 4)
    assert nesting_exceeds(body, 3)
    assert Validator(json=True, max_depth=3).invalid(body) == "JSON nests deeper than 3 levels"
    assert nesting_exceeds(b"[[[[1]]]]", 3)  # arrays alone too


@pytest.mark.parametrize("data_schema", ["iris", "any array"])
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_a_binary_tensor_holding_nan_or_infinity_is_not_json_the_schema_can_check(
    tmp_path: Path, data_schema: str, bad: float
) -> None:
    """JSON cannot hold NaN nor infinity (a JSON body with them is 400), a binary FP32
    tensor can. The fast validator refused NaN and the thorough one found nothing
    wrong: a 422 listing no path at all ("at: $"), counted under "$". Infinity passed
    a schema without bounds. Either is what a JSON body could not be: 400, naming it."""
    from sidecar.config.schema import bundled_config_dir

    if data_schema == "iris":
        compiled = load_schema(bundled_config_dir() / "schemas" / "iris-v2-request.json")
    else:
        compiled = schema(
            tmp_path,
            {"type": "object", "properties": {"inputs": {"type": "array"}}},
        )
    validator = RequestValidator(
        "infer", ValidationSettings.model_validate({}), compiled, Metrics(), binary_tensors=True
    )
    raw = struct.pack("<4f", 5.1, 3.5, bad, 0.2)
    tensor = {"name": "x", "shape": [1, 4], "datatype": "FP32"}
    head = orjson.dumps({"inputs": [tensor | {"parameters": {"binary_data_size": len(raw)}}]})
    with pytest.raises(errors.InvalidJson) as refused:
        validator.check_body(head + raw, str(len(head)))
    assert "inputs[0].data[2]" in refused.value.message
    assert "NaN or infinity" in refused.value.message
    finite = head + struct.pack("<4f", 5.1, 3.5, 1.4, 0.2)
    assert validator.check_body(finite, str(len(head)))["inputs"][0]["data"][2] == pytest.approx(
        1.4
    )
    if data_schema != "iris":  # finite numbers whose sum overflows are no NaN
        large = struct.pack("<2d", 1.7e308, 1.7e308)
        wide = {"name": "x", "datatype": "FP64", "parameters": {"binary_data_size": 16}}
        head = orjson.dumps({"inputs": [wide]})
        assert validator.check_body(head + large, str(len(head)))["inputs"][0]["data"] == [
            1.7e308,
            1.7e308,
        ]


def test_only_a_large_binary_body_on_a_route_with_a_schema_is_checked_in_a_thread(
    tmp_path: Path,
) -> None:
    """Checked as the lists its tensors make, a binary body is Python work in
    proportion to its elements; a JSON one is parsed in C, and without a schema the
    tensors are not read."""
    from sidecar.pipeline.validation import CHECK_INLINE_BYTES

    def validator(compiled: CompiledSchema | None, binary: bool) -> RequestValidator:
        settings = ValidationSettings.model_validate({"json": True})
        return RequestValidator("infer", settings, compiled, Metrics(), binary_tensors=binary)

    with_schema = validator(schema(tmp_path), binary=True)
    assert CHECK_INLINE_BYTES == 16 * 1024
    assert with_schema.checks_in_a_thread("10", CHECK_INLINE_BYTES + 1)
    assert not with_schema.checks_in_a_thread("10", CHECK_INLINE_BYTES)
    assert not with_schema.checks_in_a_thread(None, 1 << 20)  # JSON
    for other in (validator(None, binary=True), validator(schema(tmp_path), binary=False)):
        assert not other.checks_in_a_thread("10", 1 << 20)
