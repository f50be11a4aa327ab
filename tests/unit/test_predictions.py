"""sidecar.analytics.predictions: reading prediction numbers out of model answers, by protocol."""

from __future__ import annotations

import array
import base64
import sys
from typing import Any

import orjson
import pytest

from sidecar.analytics.predictions import PredictionReader, embeddings, json_object


def b64(*values: float) -> str:
    floats = array.array("f", values)
    if sys.byteorder == "big":
        floats.byteswap()
    return base64.b64encode(floats.tobytes()).decode()


def test_v2_reads_every_output_or_the_named_one() -> None:
    answer = {
        "outputs": [
            {"name": "probabilities", "data": [0.25, [0.75, 1]]},
            {"name": "label", "data": [2]},
            "not a tensor",
            {"name": "empty"},
        ]
    }
    assert PredictionReader.build("v2").values(answer) == [0.25, 0.75, 1.0, 2.0]
    assert PredictionReader.build("v2", "label").values(answer) == [2.0]
    assert PredictionReader.build("v2", "missing").values(answer) == []


def test_v2_without_outputs_has_no_predictions() -> None:
    reader = PredictionReader.build("v2")
    for answer in ({}, {"outputs": {"data": [1]}}, [1, 2], "text", None):
        assert reader.values(answer) == [], answer


def test_numbers_are_found_in_lists_and_objects_but_booleans_and_text_are_not() -> None:
    reader = PredictionReader.build("v1")
    answer = {
        "predictions": [{"score": 0.5, "ok": True, "name": "x", "n": None}, [1, [2.5]], False]
    }
    assert reader.values(answer) == [0.5, 1.0, 2.5]
    assert reader.values({"predictions": 3}) == [3.0]
    assert reader.values({"predictions": True}) == []
    assert reader.values({"other": [1]}) == []


def test_openai_embeddings_are_each_vectors_norm_or_every_number_when_raw() -> None:
    answer = {"data": [{"embedding": [3.0, 4.0]}, {"embedding": b64(0.0, 2.0)}]}
    assert PredictionReader.build("openai").values(answer) == [5.0, 2.0]
    raw = PredictionReader.build("openai", raw_embeddings=True)
    assert raw.values(answer) == [3.0, 4.0, 0.0, 2.0]


def test_an_embeddings_norm_does_not_overflow_and_a_vector_without_one_is_skipped() -> None:
    answer = {
        "data": [
            {"embedding": [3e200, 4e200]},  # squares overflow: the norm does not
            {"embedding": b64(float("inf"), 1.0)},  # base64 may carry inf and NaN
            {"embedding": b64(float("nan"), 1.0)},
            {"embedding": [3e-200, 4e-200]},  # squares underflow to zero
        ]
    }
    assert PredictionReader.build("openai").values(answer) == pytest.approx([5e200, 5e-200])


def test_raw_embeddings_leave_out_a_vector_holding_inf_or_nan() -> None:
    answer = {
        "data": [
            {"embedding": [1.0, 2.0]},
            {"embedding": b64(float("inf"), 1.0)},
            {"embedding": b64(float("nan"), 1.0)},
            {"embedding": [3.0]},
        ]
    }
    reader = PredictionReader.build("openai", raw_embeddings=True)
    assert reader.values(answer) == [1.0, 2.0, 3.0]
    assert reader.values(answer, limit=2) == [1.0, 2.0]


def test_openai_completions_are_each_choices_text_length() -> None:
    reader = PredictionReader.build("openai")
    answer = {
        "choices": [
            {"message": {"content": "four"}},
            {"text": "three"},
            {"message": {"content": None}, "text": "xy"},
            {"message": "not an object", "text": 7},
            "not a choice",
        ]
    }
    assert reader.values(answer) == [4.0, 5.0, 2.0, 0.0, 0.0]
    assert reader.values({"choices": "none"}) == []
    assert reader.values({"object": "list"}) == []


def test_json_path_reads_the_numbers_at_that_place() -> None:
    reader = PredictionReader.build("json_path", json_path="result.scores[1]")
    assert reader.values({"result": {"scores": [0.1, [0.2, 0.3]]}}) == [0.2, 0.3]
    assert reader.values({"result": {"scores": [0.1]}}) == []
    assert reader.values({"result": {"scores": [0.1, None]}}) == []


def test_json_path_needs_a_path() -> None:
    with pytest.raises(ValueError, match="protocol json_path needs json_path"):
        PredictionReader.build("json_path")
    with pytest.raises(ValueError, match="protocol json_path needs json_path"):
        PredictionReader.build("json_path", json_path="")


def test_build_keeps_what_each_protocol_needs() -> None:
    assert PredictionReader.build("v2", "out") == PredictionReader("v2", "out", None, False)
    reader = PredictionReader.build("json_path", "ignored", "a.b[0]", raw_embeddings=True)
    assert reader == PredictionReader("json_path", None, ("a", "b", 0), True)


def test_a_label_is_the_value_itself_or_the_argmax_of_several() -> None:
    reader = PredictionReader.build("v1")
    assert reader.label({"predictions": [7.5]}) == 7.5
    assert reader.label({"predictions": [0.1, 0.7, 0.2]}) == 1.0
    assert reader.label({"predictions": [0.5, 0.5]}) == 0.0  # a tie: the first
    assert reader.label({"predictions": []}) is None


def test_embeddings_come_as_lists_or_little_endian_float32_base64() -> None:
    answer: dict[str, Any] = {
        "data": [
            {"embedding": [1, 2.5]},
            {"embedding": b64(0.5, -1.0)},
            {"index": 3},
            "not an item",
            {"embedding": "not base64!"},
            {"embedding": base64.b64encode(b"abcdef").decode()},  # not whole floats
        ]
    }
    assert embeddings(answer) == [[1.0, 2.5], [0.5, -1.0]]
    assert embeddings({"data": "x"}) == []
    assert embeddings([1]) == []
    assert embeddings({"data": [{"embedding": base64.b64encode(b"abcd" * 2).decode()}]}) == [
        list(array.array("f", b"abcd" * 2))
    ]


def test_a_named_output_is_found_in_an_answer_read_off_the_wire() -> None:
    answer = orjson.loads(
        b'{"outputs": [{"name": "label", "data": [3]}, {"name": "p", "data": [1]}]}'
    )
    assert PredictionReader.build("v2", "".join(["la", "bel"])).values(answer) == [3.0]


def test_items_that_are_not_embeddings_are_skipped_not_the_end() -> None:
    answer = {
        "data": [
            {"index": 0},
            {"embedding": "not base64!"},
            {"embedding": base64.b64encode(b"abcdef").decode()},
            {"embedding": [1.0]},
        ]
    }
    assert embeddings(answer) == [[1.0]]


def test_base64_vectors_of_any_whole_number_of_floats_are_read() -> None:
    answer = {"data": [{"embedding": b64(1.0)}, {"embedding": b64(1.0, 2.0, 3.0)}]}
    assert embeddings(answer) == [[1.0], [1.0, 2.0, 3.0]]


def test_a_base64_embedding_with_stray_characters_is_skipped_not_guessed_at() -> None:
    clean = b64(1.0, 2.0)
    assert embeddings({"data": [{"embedding": clean[:4] + "*" + clean[4:]}]}) == []


def test_a_reader_gives_vector_norms_unless_asked_for_raw_numbers() -> None:
    assert PredictionReader("openai").values({"data": [{"embedding": [3.0, 4.0]}]}) == [5.0]


def test_a_big_endian_host_reads_base64_embeddings_as_the_little_endian_floats_they_are(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The bytes are little-endian float32 whatever the host: on a big-endian one
    # (s390x) they are swapped before use. Here the host only says it is big-endian,
    # so the values come out swapped from what this host reads natively.
    encoded = b64(1.0, 2.0)
    swapped = array.array("f", base64.b64decode(encoded))
    swapped.byteswap()
    monkeypatch.setattr(sys, "byteorder", "big")
    assert embeddings({"data": [{"embedding": encoded}]}) == [list(swapped)]


def test_a_json_lines_record_is_an_object_or_an_error_naming_its_line() -> None:
    assert json_object(b'{"a": 1}', 3) == {"a": 1}
    with pytest.raises(ValueError, match=r"^payloads.jsonl line 3: not JSON \("):
        json_object(b"{nope", 3, "payloads.jsonl")
    with pytest.raises(ValueError, match=r"^line 4: not JSON \("):
        json_object(b"", 4)
    with pytest.raises(ValueError, match=r"^line 5: not a JSON object$"):
        json_object(b"[1, 2]", 5)
    with pytest.raises(ValueError, match=r"^log line 6: not a JSON object$"):
        json_object(b'"text"', 6, "log")
