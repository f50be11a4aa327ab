"""sidecar.analytics.compare: a candidate's answer against production's, called directly."""

from __future__ import annotations

import array
import base64
import math
from typing import Any

import orjson
import pytest

from sidecar.analytics.compare import Comparer, Comparison
from sidecar.config.schema import ShadowCompare


def v2(*values: float) -> bytes:
    return orjson.dumps({"outputs": [{"name": "out", "data": list(values)}]})


def comparer(**settings: Any) -> Comparer:
    values: dict[str, Any] = {"abs_tol": 0.0, "rel_tol": 0.0}
    values.update(settings)
    return Comparer(ShadowCompare.model_validate(values))


def openai(*vectors: list[float]) -> bytes:
    return orjson.dumps({"data": [{"embedding": vector} for vector in vectors]})


def test_agreement_is_unknown_for_errors_and_says_whether_the_answers_matched() -> None:
    assert Comparison("match").agreement is True
    assert Comparison("mismatch").agreement is False
    assert Comparison("error").agreement is None


def test_different_statuses_are_a_mismatch_naming_both() -> None:
    comparison = comparer().compare(200, v2(1.0), 503, v2(1.0))
    assert (comparison.result, comparison.reason) == ("mismatch", "status")
    assert comparison.differences == [{"field": "status", "primary": 200, "shadow": 503}]


def test_streams_report_the_first_differing_byte_and_forty_bytes_from_it() -> None:
    primary = b"data: " + b"a" * 10 + b"X" + b"b" * 60
    shadow = b"data: " + b"a" * 10 + b"Y" + b"b" * 60
    comparison = comparer().compare(200, primary, 200, shadow, streamed=True)
    assert (comparison.result, comparison.reason) == ("mismatch", "stream")
    assert comparison.differences == [
        {"field": "stream[16]", "primary": "X" + "b" * 39, "shadow": "Y" + "b" * 39}
    ]


def test_a_stream_cut_short_differs_where_the_shorter_one_ends() -> None:
    comparison = comparer().compare(200, b"data: ab", 200, b"data: abcd", streamed=True)
    assert comparison.result == "mismatch"
    assert comparison.differences == [{"field": "stream[8]", "primary": "", "shadow": "cd"}]


def test_identical_streams_match_even_when_not_json() -> None:
    assert comparer().compare(200, b"data: {", 200, b"data: {", streamed=True).result == "match"


def test_answers_that_are_not_json_match_only_when_byte_identical() -> None:
    assert comparer().compare(200, b"plain", 200, b"plain").result == "match"
    error = comparer().compare(200, b"plain", 200, b"other")
    assert (error.result, error.reason) == ("error", "an answer is not JSON")
    assert error.agreement is None


def test_numeric_answers_match_within_tolerance_and_report_the_worst_difference() -> None:
    close = comparer(abs_tol=0.1).compare(200, v2(1.0, 2.0), 200, v2(1.05, 2.0))
    assert (close.result, close.reason, close.differences) == ("match", None, [])
    assert close.max_abs_diff == pytest.approx(0.05)
    far = comparer(abs_tol=0.1).compare(200, v2(1.0, 2.0, 3.0), 200, v2(1.0, 2.5, 2.75))
    assert (far.result, far.reason) == ("mismatch", "numeric")
    assert far.differences == [
        {"field": "predictions[1]", "primary": 2.0, "shadow": 2.5},
        {"field": "predictions[2]", "primary": 3.0, "shadow": 2.75},
    ]
    assert far.max_abs_diff == 0.5
    assert far.label_agreement is None  # no classes: no labels to agree on


def test_identical_numeric_answers_have_no_difference() -> None:
    same = comparer().compare(200, v2(0.25, 0.75), 200, v2(0.25, 0.75))
    assert (same.result, same.max_abs_diff) == ("match", 0.0)


def test_relative_tolerance_scales_with_the_production_value() -> None:
    assert comparer(rel_tol=0.01).compare(200, v2(1000.0), 200, v2(1005.0)).result == "match"
    assert comparer(rel_tol=0.01).compare(200, v2(1.0), 200, v2(1.05)).result == "mismatch"


def test_at_most_five_differences_are_kept() -> None:
    comparison = comparer().compare(200, v2(*[0.0] * 7), 200, v2(*[1.0] * 7))
    assert [d["field"] for d in comparison.differences] == [f"predictions[{i}]" for i in range(5)]


def test_numeric_comparison_with_classes_also_gives_the_share_of_rows_whose_argmax_agrees() -> None:
    primary = v2(0.9, 0.1, 0.2, 0.8, 0.6, 0.4, 0.3, 0.7)
    shadow = v2(0.8, 0.2, 0.7, 0.3, 0.6, 0.4, 0.4, 0.6)  # the second row's label flips
    comparison = comparer(classes=2, abs_tol=1.0).compare(200, primary, 200, shadow)
    assert comparison.result == "match"
    assert comparison.label_agreement == 0.75


def test_one_row_whose_label_flips_has_no_agreement() -> None:
    comparison = comparer(classes=2, abs_tol=1.0).compare(200, v2(0.9, 0.1), 200, v2(0.1, 0.9))
    assert comparison.label_agreement == 0.0
    agree = comparer(classes=2, abs_tol=1.0).compare(200, v2(0.9, 0.1), 200, v2(0.6, 0.4))
    assert agree.label_agreement == 1.0


def test_fewer_numbers_than_classes_give_no_rows_and_no_crash() -> None:
    numeric = comparer(classes=3).compare(200, v2(0.5, 0.5), 200, v2(0.5, 0.5))
    assert (numeric.result, numeric.label_agreement) == ("match", 0.0)
    labels = comparer(kind="label", classes=3).compare(200, v2(0.5, 0.5), 200, v2(0.1, 0.9))
    assert (labels.result, labels.label_agreement) == ("match", 1.0)


def test_labels_are_the_argmax_of_each_row_and_a_trailing_partial_row_is_ignored() -> None:
    primary = v2(0.1, 0.7, 0.2, 0.5, 0.3, 0.2, 0.9)
    shadow = v2(0.1, 0.2, 0.7, 0.5, 0.3, 0.2, 0.1)
    comparison = comparer(kind="label", classes=3).compare(200, primary, 200, shadow)
    assert (comparison.result, comparison.reason) == ("mismatch", "label")
    assert comparison.differences == [{"field": "label[0]", "primary": 1, "shadow": 2}]
    assert comparison.label_agreement == 0.5


def test_labels_of_an_exact_number_of_rows_compare_every_row() -> None:
    comparison = comparer(kind="label", classes=2).compare(
        200, v2(0.9, 0.1, 0.9, 0.1), 200, v2(0.9, 0.1, 0.1, 0.9)
    )
    assert comparison.differences == [{"field": "label[1]", "primary": 0, "shadow": 1}]


def test_a_tie_takes_the_first_class() -> None:
    comparison = comparer(kind="label", classes=2).compare(200, v2(0.5, 0.5), 200, v2(0.6, 0.4))
    assert comparison.result == "match"


def test_labels_without_classes_are_the_values_rounded() -> None:
    match = comparer(kind="label").compare(200, v2(0.4, 1.6, 3.0), 200, v2(0.2, 2.4, 3.0))
    assert (match.result, match.label_agreement) == ("match", 1.0)
    single = comparer(kind="label").compare(200, v2(1.0), 200, v2(2.0))
    assert (single.result, single.label_agreement) == ("mismatch", 0.0)
    assert single.differences == [{"field": "label[0]", "primary": 1, "shadow": 2}]


def test_answers_without_predictions_compare_as_documents_ignoring_ids_and_times() -> None:
    c = comparer()
    same = c.compare(
        200,
        orjson.dumps({"id": "a", "created": 1, "system_fingerprint": "x", "text": "hi"}),
        200,
        orjson.dumps({"id": "b", "created": 2, "system_fingerprint": "y", "text": "hi"}),
    )
    assert (same.result, same.reason) == ("match", "document")
    differ = c.compare(
        200, orjson.dumps({"id": "a", "t": 1}), 200, orjson.dumps({"id": "a", "t": 2})
    )
    assert (differ.result, differ.reason) == ("mismatch", "document")
    assert c.compare(200, b"[1]", 200, b"[1]").result == "match"
    assert c.compare(200, b"[1]", 200, b"[2]").result == "mismatch"


def test_predictions_on_one_side_only_are_a_shape_mismatch() -> None:
    comparison = comparer().compare(200, v2(1.0), 200, b"{}")
    assert (comparison.result, comparison.reason) == ("mismatch", "shape")
    assert comparison.differences == [{"field": "predictions.length", "primary": 1, "shadow": 0}]


def test_embeddings_match_by_cosine_at_least_the_minimum() -> None:
    at_minimum = comparer(kind="embedding", min_cosine=0.0).compare(
        200, v2(1.0, 0.0), 200, v2(0.0, 1.0)
    )
    assert (at_minimum.result, at_minimum.reason, at_minimum.cosine) == ("match", None, 0.0)
    assert at_minimum.differences == []
    below = comparer(kind="embedding", min_cosine=0.9).compare(200, v2(1.0, 0.0), 200, v2(1.0, 1.0))
    assert (below.result, below.reason) == ("mismatch", "cosine")
    assert below.differences == [{"field": "embedding.cosine", "primary": 1.0, "shadow": 0.707107}]
    assert below.cosine == pytest.approx(0.7071067811865476)


def test_zero_vectors_agree_only_with_zero_vectors() -> None:
    c = comparer(kind="embedding", min_cosine=0.5)
    assert c.compare(200, v2(0.0, 0.0), 200, v2(0.0, 0.0)).cosine == 1.0
    assert c.compare(200, v2(0.0, 0.0), 200, v2(1.0, 0.0)).cosine == 0.0


def test_openai_embeddings_compare_vector_by_vector() -> None:
    c = comparer(protocol="openai", kind="embedding", min_cosine=1.0)
    same = c.compare(200, openai([1.0, 0.0], [0.0, 2.0]), 200, openai([3.0, 0.0], [0.0, 1.0]))
    assert (same.result, same.reason, same.cosine) == ("match", None, 1.0)
    differ = c.compare(200, openai([1.0, 0.0], [0.0, 2.0]), 200, openai([1.0, 0.0], [1.0, 1.0]))
    assert (differ.result, differ.reason) == ("mismatch", "cosine")
    assert differ.differences == [
        {"field": "data[1].embedding.cosine", "primary": 1.0, "shadow": 0.707107}
    ]
    assert differ.cosine == pytest.approx(0.7071067811865476)


def test_openai_vectors_of_different_lengths_do_not_agree() -> None:
    c = comparer(protocol="openai", kind="embedding", min_cosine=-1.0)
    differ = c.compare(200, openai([1.0, 0.0]), 200, openai([1.0, 0.0, 0.0]))
    assert differ.cosine == 0.0


def test_openai_embedding_answers_with_different_counts_or_none_are_a_shape_mismatch() -> None:
    c = comparer(protocol="openai", kind="embedding")
    fewer = c.compare(200, openai([1.0], [1.0]), 200, openai([1.0]))
    assert (fewer.result, fewer.reason) == ("mismatch", "shape")
    assert fewer.differences == [{"field": "data.length", "primary": 2, "shadow": 1}]
    empty = c.compare(200, openai(), 200, openai())
    assert (empty.result, empty.reason) == ("mismatch", "shape")


def test_at_most_five_vector_differences_are_kept() -> None:
    c = comparer(protocol="openai", kind="embedding", min_cosine=0.5)
    primary = openai(*[[1.0, 0.0]] * 6)
    shadow = openai(*[[0.0, 1.0]] * 6)
    assert len(c.compare(200, primary, 200, shadow).differences) == 5


def test_a_numeric_comparison_of_openai_embeddings_compares_every_number_not_the_norms() -> None:
    comparison = comparer(protocol="openai").compare(
        200, openai([1.0, 0.0]), 200, openai([0.0, 1.0])
    )
    assert comparison.result == "mismatch"
    assert comparison.max_abs_diff == 1.0


def test_openai_completions_compare_by_text_length() -> None:
    def chat(text: str) -> bytes:
        return orjson.dumps({"id": text, "choices": [{"message": {"content": text}}]})

    c = comparer(protocol="openai")
    assert c.compare(200, chat("four"), 200, chat("five")).result == "match"
    assert c.compare(200, chat("four"), 200, chat("three")).result == "mismatch"


def fresh(value: str) -> bytes:
    """Equal bytes in a new object, as two answers read from two sockets are."""
    return bytes(bytearray(value.encode()))


def test_equal_answers_match_whatever_object_holds_them() -> None:
    c = comparer()
    assert c.compare(int("503"), fresh("x"), int("503"), fresh("x")).result == "match"
    assert c.compare(200, fresh("data: a"), 200, fresh("data: a"), streamed=True).result == "match"


def test_a_lower_status_from_the_candidate_is_a_mismatch_too() -> None:
    assert comparer().compare(503, v2(1.0), 200, v2(1.0)).reason == "status"


def test_a_longer_primary_stream_or_body_is_not_taken_for_a_match() -> None:
    c = comparer()
    stream = c.compare(200, b"data: abcd", 200, b"data: ab", streamed=True)
    assert stream.differences == [{"field": "stream[8]", "primary": "cd", "shadow": ""}]
    assert c.compare(200, b"plain-b", 200, b"plain-a").result == "error"


def test_a_stream_reports_the_first_difference_whichever_side_is_greater() -> None:
    primary = b"data: aZ" + b"c" * 50
    shadow = b"data: aA" + b"c" * 50
    comparison = comparer().compare(200, primary, 200, shadow, streamed=True)
    assert comparison.differences == [
        {"field": "stream[7]", "primary": "Z" + "c" * 39, "shadow": "A" + "c" * 39}
    ]
    early = comparer().compare(200, b"data: ab" + b"Q" * 50, 200, b"data: ab", streamed=True)
    assert early.differences[0]["primary"] == "Q" * 40


def test_a_json_path_embedding_is_one_vector_from_that_path() -> None:
    c = comparer(protocol="json_path", json_path="result.vector", kind="embedding", min_cosine=0.9)
    same = c.compare(
        200,
        orjson.dumps({"result": {"vector": [1.0, 2.0]}}),
        200,
        orjson.dumps({"result": {"vector": [2.0, 4.0]}}),
    )
    assert (same.result, same.cosine) == ("match", pytest.approx(1.0))


def test_fewer_predictions_from_production_are_a_shape_mismatch() -> None:
    comparison = comparer().compare(200, v2(1.0), 200, v2(1.0, 2.0))
    assert comparison.differences == [{"field": "predictions.length", "primary": 1, "shadow": 2}]


def test_large_class_ids_agree_when_equal_and_differ_either_way() -> None:
    c = comparer(kind="label")
    assert c.compare(200, v2(1000.0, 70000.0), 200, v2(1000.2, 69999.9)).result == "match"
    differ = c.compare(200, v2(3.0), 200, v2(2.0))
    assert differ.differences == [{"field": "label[0]", "primary": 3, "shadow": 2}]


def test_rows_of_three_classes_that_fill_the_answer_exactly_are_all_compared() -> None:
    comparison = comparer(kind="label", classes=3).compare(
        200, v2(0.1, 0.8, 0.1, 0.7, 0.2, 0.1), 200, v2(0.1, 0.8, 0.1, 0.2, 0.7, 0.1)
    )
    assert comparison.differences == [{"field": "label[1]", "primary": 0, "shadow": 1}]


def test_fewer_vectors_from_production_are_a_shape_mismatch() -> None:
    c = comparer(protocol="openai", kind="embedding")
    fewer = c.compare(200, openai([1.0]), 200, openai([1.0], [1.0]))
    assert fewer.differences == [{"field": "data.length", "primary": 1, "shadow": 2}]


def test_cosines_above_the_minimum_match() -> None:
    vectors = comparer(protocol="openai", kind="embedding", min_cosine=0.5)
    above = vectors.compare(200, openai([1.0, 0.0]), 200, openai([1.0, 0.1]))
    assert (above.result, above.differences) == ("match", [])
    single = comparer(kind="embedding", min_cosine=0.5).compare(
        200, v2(1.0, 0.0), 200, v2(1.0, 0.1)
    )
    assert single.result == "match"


def test_a_longer_production_vector_does_not_agree() -> None:
    c = comparer(protocol="openai", kind="embedding", min_cosine=-1.0)
    assert c.compare(200, openai([1.0, 0.0, 0.0]), 200, openai([1.0, 0.0])).cosine == 0.0


def test_a_zero_candidate_vector_does_not_agree_with_a_real_one() -> None:
    c = comparer(kind="embedding", min_cosine=0.5)
    assert c.compare(200, v2(1.0, 0.0), 200, v2(0.0, 0.0)).cosine == 0.0


def test_a_stream_difference_shows_forty_bytes_of_each_side() -> None:
    primary = b"data: ab" + b"P" * 60
    shadow = b"data: ab" + b"S" * 60
    comparison = comparer().compare(200, primary, 200, shadow, streamed=True)
    assert comparison.differences == [
        {"field": "stream[8]", "primary": "P" * 40, "shadow": "S" * 40}
    ]


def test_different_answers_that_are_not_json_are_an_error_whichever_sorts_first() -> None:
    assert comparer().compare(200, b"plain-a", 200, b"plain-b").result == "error"


def test_answers_with_hundreds_of_predictions_are_compared_value_by_value() -> None:
    values = [i / 1000 for i in range(300)]
    assert comparer().compare(200, v2(*values), 200, v2(*values)).result == "match"
    vector = [float(i) for i in range(300)]
    c = comparer(protocol="openai", kind="embedding", min_cosine=0.999)
    assert c.compare(200, openai(vector), 200, openai(list(vector))).result == "match"
    many = [[1.0, float(i)] for i in range(300)]
    assert c.compare(200, openai(*many), 200, openai(*many)).result == "match"


def test_rows_of_a_thousand_classes_agree_on_a_high_class_index() -> None:
    row = [0.0] * 1000
    row[500] = 1.0
    comparison = comparer(classes=1000, abs_tol=1.0).compare(200, v2(*row), 200, v2(*row))
    assert comparison.label_agreement == 1.0


def test_vectors_of_huge_numbers_are_compared_not_taken_for_a_match() -> None:
    # Products of numbers near 1e200 overflow to infinity, and +inf + -inf is NaN;
    # NaN is below no threshold, so the opposite vectors here were counted as a match.
    huge = 1e200
    vectors = comparer(protocol="openai", kind="embedding", min_cosine=0.9)
    opposite = vectors.compare(200, openai([huge, huge]), 200, openai([-huge, -huge]))
    assert (opposite.result, opposite.reason) == ("mismatch", "cosine")
    assert opposite.cosine == pytest.approx(-1.0)
    same = vectors.compare(200, openai([huge, huge]), 200, openai([huge, huge]))
    assert (same.result, same.cosine) == ("match", pytest.approx(1.0))
    single = comparer(kind="embedding", min_cosine=0.9)
    assert single.compare(200, v2(huge, huge), 200, v2(-huge, -huge)).cosine == pytest.approx(-1)
    tiny = single.compare(200, v2(1e-200, 0.0), 200, v2(0.0, 1e-200))  # underflow: not zero
    assert (tiny.result, tiny.cosine) == ("mismatch", 0.0)


def test_an_embedding_holding_nan_or_infinity_is_a_comparison_error() -> None:
    def encoded(*values: float) -> str:
        return base64.b64encode(array.array("f", values).tobytes()).decode()

    vectors = comparer(protocol="openai", kind="embedding", min_cosine=0.9)
    for bad in (math.nan, math.inf):
        comparison = vectors.compare(
            200, openai([1.0, 1.0]), 200, orjson.dumps({"data": [{"embedding": encoded(bad, 1.0)}]})
        )
        assert (comparison.result, comparison.agreement) == ("error", None)
        assert comparison.reason == "an embedding holds a number that is not finite"


def binary_v2(*values: float, name: str = "out") -> tuple[bytes, str]:
    """An answer with its output as a binary tensor (tritonclient asks for that by
    default), and its Inference-Header-Content-Length."""
    raw = array.array("d", values).tobytes()  # this machine is little-endian, as V2 is
    head = orjson.dumps(
        {
            "outputs": [
                {"name": name, "datatype": "FP64", "parameters": {"binary_data_size": len(raw)}}
            ]
        }
    )
    return head + raw, str(len(head))


def test_binary_v2_answers_are_compared_by_their_tensors_not_called_errors() -> None:
    """Each was "an answer is not JSON" unless the bytes were the same."""
    c = comparer(abs_tol=0.01)
    (primary, primary_head), (close, close_head) = binary_v2(1.0, 2.0), binary_v2(1.0, 2.005)
    result = c.compare(200, primary, 200, close, primary_head=primary_head, shadow_head=close_head)
    assert result.result == "match"
    far, far_head = binary_v2(1.0, 3.0)
    result = c.compare(200, primary, 200, far, primary_head=primary_head, shadow_head=far_head)
    assert (result.result, result.max_abs_diff) == ("mismatch", pytest.approx(1.0))
    # One binary, one JSON: the same values either way.
    assert c.compare(200, primary, 200, v2(1.0, 2.0), primary_head=primary_head).result == "match"
    # Without their head lengths they are not JSON; with none to read, documents are
    # compared whole, tensors included.
    assert c.compare(200, primary, 200, far).result == "error"
    other, other_head = binary_v2(5.0, name="other")
    reader = comparer(output="out")
    assert (
        reader.compare(200, other, 200, other, primary_head=other_head, shadow_head=other_head)
    ).result == "match"
    changed, _ = binary_v2(6.0, name="other")
    assert (
        reader.compare(200, other, 200, changed, primary_head=other_head, shadow_head=other_head)
    ).result == "mismatch"


@pytest.mark.parametrize("settings", [{"kind": "label"}, {"kind": "label", "classes": 2}, {}])
def test_a_prediction_that_is_nan_or_infinity_is_a_comparison_error(
    settings: dict[str, Any],
) -> None:
    """JSON holds no NaN nor infinity, a binary tensor may. Rounding one to a label
    raised, out of the shadow's task (the comparison neither counted nor logged);
    compared as numbers, NaN is close to nothing, itself included, so NaN against NaN
    counted as the candidate disagreeing."""
    c = comparer(abs_tol=0.01, **settings)
    good, good_head = binary_v2(1.0, 0.0)
    for bad_value in (math.nan, math.inf, -math.inf):
        bad, bad_head = binary_v2(1.0, bad_value)
        for result in (
            c.compare(200, bad, 200, good, primary_head=bad_head, shadow_head=good_head),
            c.compare(200, good, 200, bad, primary_head=good_head, shadow_head=bad_head),
            c.compare(200, bad, 200, bad, primary_head=bad_head, shadow_head=bad_head),
        ):
            assert (result.result, result.agreement) == ("error", None)
            assert result.reason == "a prediction is not a finite number"
    same = c.compare(200, good, 200, good, primary_head=good_head, shadow_head=good_head)
    assert same.result == "match"
