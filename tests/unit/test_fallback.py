"""sidecar.upstream.fallback: cache, rules, static answers and the secondary upstream, called
directly. The secondary upstream talks to an in-process fake model server (loopback,
no subprocess); everything else is plain calls on a fake clock."""

from __future__ import annotations

import asyncio
import functools
import struct
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlsplit

import orjson
import pytest
from aiohttp import web
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from sidecar.config.schema import (
    BreakerSettings,
    CacheFallback,
    FallbackPolicy,
    Upstream,
    UpstreamFallback,
)
from sidecar.http.client import READ_AHEAD, Pool
from sidecar.http.messages import Headers, Response
from sidecar.telemetry.metrics import Metrics
from sidecar.upstream.breaker import CLOSED, OPEN, UpstreamBreaker
from sidecar.upstream.fallback import (
    FALLBACK_HEADER,
    FallbackChain,
    ResponseCache,
    SecondaryAnswer,
    SecondaryUpstream,
    as_event_stream,
    asks_for_a_stream,
    canonical_key,
    keeps,
    restamp_id,
)
from sidecar.upstream.upstreams import UpstreamCall, UpstreamClient
from tests.conftest import LOOPBACK, FakeClock, MakeFakeModel, closed_port


class FakeCounter:
    """A counter child's stand-in."""

    def __init__(self) -> None:
        self.count = 0

    def inc(self) -> None:
        self.count += 1


def cache(
    clock: FakeClock, protocol: str = "plain", evicted: Any = None, **settings: Any
) -> ResponseCache:
    values: dict[str, Any] = {"ttl": "60s"}
    values.update(settings)
    return ResponseCache(CacheFallback.model_validate(values), protocol, clock, evicted)


def call(
    body: bytes | None = b"{}", target: str = "/infer", request_id: str = "r-1"
) -> UpstreamCall:
    return UpstreamCall("POST", target, Headers([("X-Client", "c")]), body, request_id)


def chain(
    *steps: dict[str, Any], upstreams: Any = None, clock: FakeClock | None = None, **policy: Any
) -> FallbackChain:
    settings = FallbackPolicy.model_validate({"chain": list(steps), **policy})
    return FallbackChain(settings, upstreams or {}, clock or FakeClock())


# canonical_key


def test_the_same_json_in_another_key_order_or_spacing_has_the_same_key() -> None:
    assert canonical_key("POST", "/a", b'{"x": 1, "y": [1, 2]}') == canonical_key(
        "POST", "/a", b'{"y":[1,2],"x":1}'
    )


def test_method_target_and_content_keep_keys_apart() -> None:
    key = canonical_key("POST", "/a", b'{"x": 1}')
    assert canonical_key("PUT", "/a", b'{"x": 1}') != key
    assert canonical_key("POST", "/b", b'{"x": 1}') != key
    assert canonical_key("POST", "/a", b'{"x": 2}') != key


def test_a_v2_request_id_is_not_part_of_the_key_but_a_plain_one_is() -> None:
    assert canonical_key("POST", "/a", b'{"id": "1", "x": 1}', "v2") == canonical_key(
        "POST", "/a", b'{"id": "2", "x": 1}', "v2"
    )
    assert canonical_key("POST", "/a", b'{"id": "1", "x": 1}') != canonical_key(
        "POST", "/a", b'{"id": "2", "x": 1}'
    )
    assert canonical_key("POST", "/a", b'[{"id": "1"}]', "v2") != canonical_key(
        "POST", "/a", b'[{"id": "2"}]', "v2"
    )


def test_bodies_that_are_not_json_are_keyed_by_their_bytes() -> None:
    assert canonical_key("POST", "/a", b"raw one") == canonical_key("POST", "/a", b"raw one")
    assert canonical_key("POST", "/a", b"raw one") != canonical_key("POST", "/a", b"raw two")
    assert canonical_key("POST", "/a", b"raw  one") != canonical_key("POST", "/a", b"raw one")


def test_a_body_that_repeats_a_key_is_keyed_by_its_bytes_not_as_the_copy_orjson_kept() -> None:
    """orjson keeps a repeated key's last copy, Triton (RapidJSON) reads the first: a
    request whose first "inputs" were another's had the key of a request holding only
    the second, and once the model was down that request got the first one's answer.
    So too a binary V2 head repeating "binary_data_size" (its tensors read otherwise)."""
    evil = b'{"inputs": [{"name": "x", "data": [9]}], "inputs": [{"name": "x", "data": [1]}]}'
    victim = b'{"inputs": [{"name": "x", "data": [1]}]}'
    assert canonical_key("POST", "/a", evil, "v2") != canonical_key("POST", "/a", victim, "v2")
    tensors = struct.pack("<2f", 1.0, 2.0)
    repeated = (
        b'{"inputs":[{"name":"x","datatype":"FP32",'
        b'"parameters":{"binary_data_size":4,"binary_data_size":8}}]}'
    )
    once = b'{"inputs":[{"name":"x","datatype":"FP32","parameters":{"binary_data_size":8}}]}'
    assert canonical_key("POST", "/a", repeated + tensors, "v2", len(repeated)) != canonical_key(
        "POST", "/a", once + tensors, "v2", len(once)
    )
    # A colon inside a string is no key: the same JSON in another order keeps its key.
    assert canonical_key("POST", "/a", b'{"a": "x:y", "b": 1}', "v2") == canonical_key(
        "POST", "/a", b'{"b": 1, "a": "x:y"}', "v2"
    )


# restamp_id


def test_plain_answers_keep_their_id() -> None:
    body = b'{"id": "old", "x": 1}'
    assert restamp_id(body, b'{"id": "new"}', "plain", "r-9") is body


def test_a_v2_answer_takes_this_requests_id_or_none() -> None:
    body = b'{"id": "old", "outputs": []}'
    assert orjson.loads(restamp_id(body, b'{"id": "new"}', "v2", "r-9")) == {
        "id": "new",
        "outputs": [],
    }
    assert orjson.loads(restamp_id(body, b'{"inputs": []}', "v2", "r-9")) == {"outputs": []}
    assert orjson.loads(restamp_id(body, b"not json", "v2", "r-9")) == {"outputs": []}


def test_an_openai_answer_gets_a_fresh_name() -> None:
    body = b'{"id": "chatcmpl-old", "choices": []}'
    assert orjson.loads(restamp_id(body, b"{}", "openai", "r-9")) == {
        "id": "cached-r-9",
        "choices": [],
    }


def test_answers_without_a_top_level_id_are_left_as_they_are() -> None:
    for body in (b'{"x": 1}', b'{"x": "id"}', b'{"x": {"id": 1}}', b'["id"]', b'"id" but not json'):
        assert restamp_id(body, b'{"id": "new"}', "v2", "r-9") is body, body
        assert restamp_id(body, b"{}", "openai", "r-9") is body, body


# ResponseCache


def test_a_stored_answer_is_given_back_with_its_status_type_and_age() -> None:
    clock = FakeClock()
    c = cache(clock)
    c.store("POST", "/infer", b'{"x": 1}', 201, "application/json", b'{"y": 2}')
    clock.advance(7.9)
    response = c.answer("POST", "/infer", b'{ "x" : 1 }', "r-1")
    assert response is not None
    assert response.status == 201
    assert response.body == b'{"y": 2}'
    assert response.headers[FALLBACK_HEADER] == "cache"
    assert response.headers["Age"] == "7"
    assert response.headers["Content-Type"] == "application/json"
    assert c.answer("POST", "/infer", b'{"x": 2}', "r-1") is None


def test_an_answer_without_a_content_type_gets_none_from_the_cache() -> None:
    c = cache(FakeClock())
    c.store("POST", "/infer", b"{}", 200, None, b"data")
    response = c.answer("POST", "/infer", b"{}", "r-1")
    assert response is not None
    assert "Content-Type" not in response.headers


def test_the_cache_restamps_ids_by_protocol() -> None:
    c = cache(FakeClock(), protocol="openai")
    c.store("POST", "/v1/chat", b'{"m": 1}', 200, "application/json", b'{"id": "old"}')
    response = c.answer("POST", "/v1/chat", b'{"m": 1}', "r-5")
    assert response is not None
    assert response.body is not None
    assert orjson.loads(response.body) == {"id": "cached-r-5"}


def test_a_binary_v2_answer_keeps_its_json_head_length_and_its_tensors() -> None:
    c = cache(FakeClock(), protocol="v2")
    head = b'{"id":"old","outputs":[]}'
    tensors = b"\x02\x00\x00\x00\x00\x00\x00\x00"
    request = b'{"id":"a","inputs":[]}' + b"\x01\x02"
    c.store("POST", "/infer", request, 200, None, head + tensors, len(head), len(request) - 2)
    # Another id in the request's JSON head: the same request; other tensors: not.
    again = b'{"inputs":[],"id":"b-2"}' + b"\x01\x02"
    response = c.answer("POST", "/infer", again, "r-1", len(again) - 2)
    assert response is not None
    length = int(response.headers["Inference-Header-Content-Length"])
    assert orjson.loads(response.body[:length]) == {"id": "b-2", "outputs": []}
    assert response.body[length:] == tensors
    assert c.answer("POST", "/infer", b'{"inputs":[]}\x01\x03', "r-1", 13) is None
    # A JSON answer has no such field; a length that cannot be one is none.
    c.store("POST", "/json", b"{}", 200, None, b'{"id":"x"}')
    plain = c.answer("POST", "/json", b"{}", "r-1")
    assert plain is not None
    assert "Inference-Header-Content-Length" not in plain.headers


def test_an_answer_lives_exactly_its_ttl_then_is_forgotten() -> None:
    clock = FakeClock()
    c = cache(clock, ttl="10s")
    c.store("POST", "/infer", b"{}", 200, None, b"12345")
    clock.advance(10.0)
    assert c.answer("POST", "/infer", b"{}", "r") is not None
    clock.advance(0.5)
    assert c.answer("POST", "/infer", b"{}", "r") is None
    assert (len(c), c.size_bytes) == (0, 0)


def test_answers_bigger_than_the_limit_are_not_stored() -> None:
    c = cache(FakeClock(), max_body_size="4B")
    c.store("POST", "/a", b"{}", 200, None, b"12345")
    assert (len(c), c.size_bytes) == (0, 0)
    c.store("POST", "/a", b"{}", 200, None, b"1234")
    assert (len(c), c.size_bytes) == (1, 4)


def test_storing_the_same_request_again_replaces_the_answer() -> None:
    c = cache(FakeClock())
    c.store("POST", "/a", b"{}", 200, None, b"first!")
    c.store("POST", "/a", b"{}", 200, None, b"second")
    c.store("POST", "/a", b"{}", 200, None, b"3rd")
    assert (len(c), c.size_bytes) == (1, 3)
    response = c.answer("POST", "/a", b"{}", "r")
    assert response is not None
    assert response.body == b"3rd"


def test_the_least_recently_used_answer_is_evicted_beyond_max_entries() -> None:
    evicted = FakeCounter()
    c = cache(FakeClock(), evicted=evicted, max_entries=2)
    c.store("POST", "/a", b"{}", 200, None, b"a")
    c.store("POST", "/b", b"{}", 200, None, b"bb")
    assert c.answer("POST", "/a", b"{}", "r") is not None  # /a is now the most recent
    c.store("POST", "/c", b"{}", 200, None, b"ccc")
    assert (len(c), c.size_bytes, evicted.count) == (2, 4, 1)
    assert c.answer("POST", "/b", b"{}", "r") is None
    assert c.answer("POST", "/a", b"{}", "r") is not None
    assert c.answer("POST", "/c", b"{}", "r") is not None


def test_answers_are_evicted_to_stay_within_max_bytes() -> None:
    evicted = FakeCounter()
    c = cache(FakeClock(), evicted=evicted, max_bytes="10B")
    c.store("POST", "/a", b"{}", 200, None, b"aaaa")
    c.store("POST", "/b", b"{}", 200, None, b"bbbbbb")
    assert (len(c), c.size_bytes, evicted.count) == (2, 10, 0)
    c.store("POST", "/c", b"{}", 200, None, b"ccccccc")
    assert (len(c), c.size_bytes, evicted.count) == (1, 7, 2)
    assert c.answer("POST", "/c", b"{}", "r") is not None


def test_an_answer_larger_than_max_bytes_is_not_kept_and_evicts_nothing() -> None:
    """An answer within max_body_size but over max_bytes (a config may set them so)
    was stored, then everything was evicted to make room for it, itself last: one
    large answer emptied the cache, and counted every answer it threw out."""
    evicted = FakeCounter()
    c = cache(FakeClock(), evicted=evicted, max_bytes="10B", max_body_size="1KiB")
    c.store("POST", "/a", b"{}", 200, None, b"aaaa")
    c.store("POST", "/b", b"{}", 200, None, b"bbbb")
    c.store("POST", "/c", b"{}", 200, None, b"c" * 11)
    assert (len(c), c.size_bytes, evicted.count) == (2, 8, 0)
    assert c.answer("POST", "/a", b"{}", "r") is not None
    assert c.answer("POST", "/b", b"{}", "r") is not None


def test_a_newer_answer_too_large_to_keep_drops_the_older_one() -> None:
    """The cache gives the last good answer to a request: when the model's newest
    answer is too large to keep, an older one is no longer that answer."""
    c = cache(FakeClock(), max_body_size="4B")
    c.store("POST", "/a", b"{}", 200, None, b"old")
    c.store("POST", "/b", b"{}", 200, None, b"bb")
    c.store("POST", "/a", b"{}", 200, None, b"newer")
    assert c.answer("POST", "/a", b"{}", "r") is None
    assert (len(c), c.size_bytes) == (1, 2)


def test_eviction_without_a_counter_still_evicts() -> None:
    c = cache(FakeClock(), max_entries=1)
    c.store("POST", "/a", b"{}", 200, None, b"a")
    c.store("POST", "/b", b"{}", 200, None, b"b")
    assert len(c) == 1


# the chain


def test_the_chain_keeps_its_triggers_statuses_and_cache() -> None:
    fallback = chain(
        {"cache": {}}, {"static": {"body": {"x": 1}}}, triggers=["timeout"], statuses=[503]
    )
    assert fallback.triggers == frozenset({"timeout"})
    assert fallback.statuses == frozenset({503})
    assert isinstance(fallback.cache, ResponseCache)
    assert chain({"static": {}}).cache is None


async def test_a_static_answer_is_json_with_its_own_headers_and_name() -> None:
    fallback = chain(
        {
            "static": {
                "name": "default-answer",
                "status": 202,
                "body": {"label": 0},
                "headers": {"X-Extra": "1"},
            }
        }
    )
    response = await fallback.answer(call(), b"{}")
    assert response is not None
    assert response.status == 202
    assert orjson.loads(response.body) == {"label": 0}  # type: ignore[arg-type]
    assert response.headers["Content-Type"] == "application/json"
    assert response.headers["X-Extra"] == "1"
    assert response.headers[FALLBACK_HEADER] == "default-answer"


async def test_a_static_answer_may_set_its_own_content_type() -> None:
    fallback = chain({"static": {"body": "text", "headers": {"Content-Type": "text/plain"}}})
    response = await fallback.answer(call(), b"{}")
    assert response is not None
    assert response.headers["Content-Type"] == "text/plain"
    assert response.headers[FALLBACK_HEADER] == "static"


RULES = {
    "rules": [
        {"name": "big", "when": {"field": "x", "gt": 10}, "respond": {"body": "big"}},
        {"name": "any-x", "when": {"field": "x", "exists": True}, "respond": {"body": "x"}},
    ]
}


async def test_an_openai_stream_gets_a_made_up_answer_as_one_event_and_others_as_they_are() -> None:
    completion = {"object": "chat.completion", "choices": [{"index": 0, "message": {"c": 1}}]}
    text = {"object": "text_completion", "choices": [{"index": 0, "text": "t"}]}
    steps = {
        "rules": [
            {"name": "chat", "when": {"field": "k", "eq": "c"}, "respond": {"body": completion}},
            {"name": "text", "when": {"field": "k", "eq": "t"}, "respond": {"body": text}},
            {"name": "e", "when": {"field": "k", "eq": "e"}, "respond": {"status": 503}},
            {
                "name": "sse",
                "when": {"field": "k", "eq": "s"},
                "respond": {"body": "x", "headers": {"Content-Type": "text/event-stream"}},
            },
        ]
    }
    settings = FallbackPolicy.model_validate({"chain": [steps]})
    fallback = FallbackChain(settings, {}, FakeClock(), protocol="openai")
    plain = chain(steps)

    async def ask(chain: FallbackChain, body: dict[str, Any]) -> Any:
        answer = await chain.answer(call(), orjson.dumps(body))
        assert answer is not None
        return answer

    streamed = await ask(fallback, {"k": "c", "stream": True})
    assert streamed.headers["Content-Type"] == "text/event-stream"
    assert streamed.headers[FALLBACK_HEADER] == "chat"
    event, done = streamed.body.split(b"\n\n", 1)
    assert done == b"data: [DONE]\n\n"
    chunk = orjson.loads(event.removeprefix(b"data: "))
    assert chunk == {
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"c": 1}}],
    }
    text_event = (await ask(fallback, {"k": "t", "stream": True})).body.split(b"\n\n")[0]
    assert orjson.loads(text_event.removeprefix(b"data: ")) == text  # its streamed form too
    # Not asked for a stream, not an answer of its own success, already a stream, or
    # not an OpenAI route: as configured.
    for chain_, body in (
        (fallback, {"k": "c"}),
        (fallback, {"k": "c", "stream": "yes"}),
        (fallback, {"k": "e", "stream": True}),
        (fallback, {"k": "s", "stream": True}),
        (plain, {"k": "c", "stream": True}),
    ):
        answer = await ask(chain_, body)
        assert answer.headers["Content-Type"] != "text/event-stream" or body["k"] == "s"
        assert not answer.body.startswith(b"data: ")


async def test_the_first_rule_that_matches_answers() -> None:
    fallback = chain(RULES, {"static": {"body": "default"}})
    big = await fallback.answer(call(), b'{"x": 11}')
    small = await fallback.answer(call(), b'{"x": 1}')
    other = await fallback.answer(call(), b'{"y": 1}')
    assert big is not None
    assert small is not None
    assert other is not None
    assert [r.headers[FALLBACK_HEADER] for r in (big, small, other)] == ["big", "any-x", "static"]
    assert orjson.loads(big.body) == "big"  # type: ignore[arg-type]


async def test_rules_do_not_answer_a_body_that_is_not_json_and_the_chain_may_end_empty() -> None:
    fallback = chain(RULES)
    assert await fallback.answer(call(), b"not json") is None
    assert await fallback.answer(call(), b'{"y": 1}') is None


async def test_rules_read_a_binary_v2_request_s_tensors_by_its_head_length() -> None:
    head = b'{"inputs":[{"name":"x","datatype":"INT64","parameters":{"binary_data_size":8}}]}'
    rules = {
        "rules": [
            {"name": "big", "when": {"field": "inputs[0].data[0]", "gt": 10}, "respond": {}},
        ]
    }
    fallback = chain(rules)

    def binary(value: int, length: str) -> UpstreamCall:
        body = head + struct.pack("<q", value)
        headers = Headers([("Inference-Header-Content-Length", length)])
        return UpstreamCall("POST", "/infer", headers, body, "r-1")

    big = binary(11, str(len(head)))
    answer = await fallback.answer(big, big.body or b"")
    assert answer is not None
    assert answer.headers[FALLBACK_HEADER] == "big"
    for unmet in (binary(10, str(len(head))), binary(11, "x"), binary(11, str(len(head) - 1))):
        assert await fallback.answer(unmet, unmet.body or b"") is None


async def test_requests_over_max_parse_bytes_are_not_read_by_rules_nor_canonicalised() -> None:
    """Parsed on the event loop in one step, a 16 MiB body held every other client up
    for a second (found by a hostile test with the model down)."""
    counted = FakeCounter()
    settings = FallbackPolicy.model_validate(
        {"chain": [RULES, {"static": {"body": "default"}}], "max_parse_bytes": "16B"}
    )
    fallback = FallbackChain(settings, {}, FakeClock(), unparsed=counted)
    read = await fallback.answer(call(), b'{"x": 11}')  # 9 bytes
    skipped = await fallback.answer(call(), b'{"x": 11, "pad": "....."}')
    assert read is not None
    assert skipped is not None
    assert (read.headers[FALLBACK_HEADER], skipped.headers[FALLBACK_HEADER]) == ("big", "static")
    assert counted.count == 1
    # A binary V2 request's head is what is parsed; its tensors are read as asked.
    head = b'{"x": 11}'
    binary = UpstreamCall(
        "POST", "/infer", Headers([("Inference-Header-Content-Length", "9")]), head, "r-1"
    )
    tensors = head + b"\x00" * 64
    answer = await fallback.answer(binary, tensors)
    assert answer is not None
    assert answer.headers[FALLBACK_HEADER] == "big"
    # The cache keys a larger body by its bytes: the same JSON in another key order
    # is another request there.
    small, small_reordered = b'{"a":1,"b":2}', b'{"b":2,"a":1}'
    large, large_reordered = b'{"a":1,"b":2,"c":"....."}', b'{"c":".....","b":2,"a":1}'
    key = functools.partial(canonical_key, "POST", "/infer", max_parse_bytes=16)
    assert key(small) == key(small_reordered)
    assert key(large) != key(large_reordered)
    assert key(large) == canonical_key("POST", "/infer", large, max_parse_bytes=16)


async def test_the_cache_comes_first_when_it_has_the_answer() -> None:
    fallback = chain({"cache": {}}, {"static": {"body": "default"}})
    assert fallback.cache is not None
    fallback.cache.store("POST", "/infer", b'{"x": 1}', 200, None, b"cached")
    hit = await fallback.answer(call(), b'{"x": 1}')
    miss = await fallback.answer(call(), b'{"x": 2}')
    assert hit is not None
    assert miss is not None
    assert (hit.body, hit.headers[FALLBACK_HEADER]) == (b"cached", "cache")
    assert miss.headers[FALLBACK_HEADER] == "static"


# the secondary upstream (an in-process fake model server)


@pytest.fixture
async def pools() -> AsyncIterator[list[Pool]]:
    made: list[Pool] = []
    yield made
    for pool in made:
        pool.close()


def secondary(url: str, pools: list[Pool], timeout: str = "5s") -> SecondaryUpstream:
    client = UpstreamClient("simple", Upstream(url=url))
    parts = urlsplit(url)
    pool = Pool(parts.hostname or LOOPBACK, parts.port or 80)
    pools.append(pool)
    client.attach(pool)
    return SecondaryUpstream(client, UpstreamFallback(name="simple", timeout=timeout))


def answering(status: int, body: bytes = b"", content_type: str | None = None) -> Any:
    async def answer(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=status, body=body, content_type=content_type)

    return answer


def taken(answer: object) -> tuple[int, bytes, Headers]:
    """The status, whole body and header fields of a secondary model's answer its step
    took (the pipeline relays it; here it is read and released)."""
    assert isinstance(answer, SecondaryAnswer)
    response = answer.response
    assert response.complete  # a small answer arrived whole within the step's timeout
    body = response.take_whole()
    response.release()
    return response.status, body, response.headers


async def test_a_secondary_upstream_answers_with_its_own_status_body_and_name(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    model.on("/infer", answering(203, b'{"label": 1}', "application/json"))
    fallback = chain(
        {"upstream": {"name": "simple"}},
        upstreams={"simple": secondary(model.url, pools).upstream},
    )
    answer = await fallback.answer(call(b'{"x": 1}', "/infer?v=1", "fb-1"), b'{"x": 1}')
    assert isinstance(answer, SecondaryAnswer)
    assert answer.upstream.name == "simple"  # the pipeline stamps X-Sidecar-Fallback with it
    status, body, headers = taken(answer)
    assert (status, body) == (203, b'{"label": 1}')
    assert headers["Content-Type"] == "application/json"
    [hit] = model.hits_for("/infer")
    assert (hit.method, hit.target, hit.body) == ("POST", "/infer?v=1", b'{"x": 1}')
    assert hit.headers["x-request-id"] == ["fb-1"]
    assert hit.headers["x-client"] == ["c"]


async def test_a_secondary_answer_without_a_content_type_has_none(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    model.on("/infer", answering(200))
    status, _, headers = taken(await secondary(model.url, pools).answer(call(None)))
    assert status == 200
    assert "Content-Type" not in headers
    assert model.hits_for("/infer")[0].body == b""


async def test_a_secondary_upstream_that_fails_gives_way_to_the_next_step(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    model.on("/infer", answering(500, b"broken"))
    upstreams = {"simple": secondary(model.url, pools).upstream}
    fallback = chain({"upstream": {"name": "simple"}}, {"static": {"body": 0}}, upstreams=upstreams)
    response = await fallback.answer(call(), b"{}")
    assert response is not None
    assert response.headers[FALLBACK_HEADER] == "static"
    assert await secondary(model.url, pools).answer(call()) is None


async def test_a_secondary_upstream_that_is_down_or_too_slow_answers_nothing(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    down = secondary(f"http://{LOOPBACK}:{closed_port()}", pools)
    assert await down.answer(call()) is None
    model = await make_fake_model()
    gate = asyncio.Event()

    async def stuck(request: web.Request) -> web.Response:
        await gate.wait()
        return web.Response()

    model.on("/infer", stuck)
    try:
        assert await secondary(model.url, pools, timeout="50ms").answer(call()) is None
    finally:
        gate.set()


def test_the_age_of_a_cached_answer_counts_from_when_it_was_stored() -> None:
    clock = FakeClock()
    clock.now = 3.0  # a monotonic clock may read anything
    c = cache(clock, ttl="60s")
    c.store("POST", "/a", b"{}", 200, None, b"x")
    clock.advance(7.9)
    response = c.answer("POST", "/a", b"{}", "r")
    assert response is not None
    assert response.headers["Age"] == "7"


async def test_a_secondary_upstream_that_is_unavailable_gives_way(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    model.on("/infer", answering(503, b"busy"))
    assert await secondary(model.url, pools).answer(call()) is None


async def test_a_redirect_from_the_secondary_upstream_fails_the_step_and_is_not_followed(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()

    async def moved(request: web.Request) -> web.Response:
        await request.read()
        return web.Response(status=307, headers={"Location": "/elsewhere"})

    model.on("/infer", moved)
    assert await secondary(model.url, pools).answer(call()) is None  # no answer: next step
    assert model.hits_for("/elsewhere") == []


async def test_a_secondary_answers_only_with_a_2xx_or_its_verdict_on_the_input(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    step = secondary(model.url, pools)
    for status in (200, 201, 204, 299, 400, 422):
        model.on("/infer", answering(status))
        assert taken(await step.answer(call()))[0] == status
    for status in (300, 401, 403, 404, 405, 409, 413, 429, 499, 500, 502, 503, 504):
        model.on("/infer", answering(status, b"no"))
        assert await step.answer(call()) is None, status
    assert len(model.hits_for("/infer")) == 19  # one request each, none retried
    # A refused small answer is read to its end: its connection is kept for the next.
    assert step.upstream.pool.open == 1


async def test_a_secondary_models_unavailability_counts_on_its_own_breaker(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    """Its breaker's failure statuses (503 here) count against it, and an answer the
    step does not take but that is the model's own (a 404) resets the run, as the
    primary's breaker does; once open, the step asks nothing and gives way at once."""
    model = await make_fake_model()
    step = secondary(model.url, pools)
    breaker = UpstreamBreaker(
        "simple",
        BreakerSettings(failures=2, reset_timeout="60s"),
        Metrics(CollectorRegistry()),
        clock=FakeClock(),
    )
    step.breaker = breaker
    for status, state in ((503, CLOSED), (404, CLOSED), (503, CLOSED), (503, OPEN)):
        model.on("/infer", answering(status, b"no"))
        assert await step.answer(call()) is None
        assert breaker.state == state, status
    model.on("/infer", answering(200, b"{}"))
    assert await step.answer(call()) is None  # the circuit is open: not asked
    assert len(model.hits_for("/infer")) == 4


# keeps: which of the model's answers the cache may keep for any client


@pytest.mark.parametrize(
    ("status", "fields", "authorized", "kept"),
    [
        (200, [], False, True),
        (101, [], False, False),
        (200, [("Content-Type", "application/json")], False, True),
        (201, [], False, False),  # speaks of that one request
        (204, [], False, False),
        (206, [], False, False),  # a part of the answer
        (299, [], False, False),
        (200, [("Content-Encoding", "gzip")], False, False),  # the cache keeps no encoding
        (200, [("Content-Encoding", "identity")], False, True),
        (200, [("Cache-Control", "private")], False, False),
        (200, [("Cache-Control", "no-store")], False, False),
        (200, [("Cache-Control", "max-age=60, Private")], False, False),
        (200, [("Cache-Control", " NO-STORE ")], False, False),
        (200, [("Cache-Control", "max-age=60"), ("Cache-Control", "private")], False, False),
        (200, [("Cache-Control", "private=x-user")], False, False),  # a field-list form
        (200, [("Cache-Control", "max-age=60")], False, True),
        (200, [("Cache-Control", "public, no-store")], True, False),
        # Sent the client's credential, the answer is that client's unless the model
        # says anyone may have it.
        (200, [], True, False),
        (200, [("Cache-Control", "max-age=60")], True, False),
        (200, [("Cache-Control", "public")], True, True),
        (200, [("Cache-Control", "s-maxage=30")], True, True),
        (200, [("Cache-Control", "max-age=5, Must-Revalidate")], True, True),
        (200, [("Cache-Control", "max-age=5"), ("Cache-Control", "public")], True, True),
        # Vary on a request field the key leaves out: not for every client.
        (200, [("Vary", "Accept-Encoding")], False, True),
        (200, [("Vary", "accept-encoding, ")], False, True),
        (200, [("Vary", "Origin")], False, False),
        (200, [("Vary", "*")], False, False),
        (200, [("Vary", "Accept-Encoding, Authorization")], False, False),
        (200, [("Vary", "Accept-Encoding"), ("Vary", "Accept-Language")], False, False),
        (200, [("Cache-Control", "public"), ("Vary", "Cookie")], True, False),
    ],
)
def test_the_cache_keeps_only_a_whole_unencoded_answer_the_model_lets_anyone_have(
    status: int, fields: list[tuple[str, str]], authorized: bool, kept: bool
) -> None:
    assert keeps(status, Headers(fields), authorized) is kept


def test_an_answer_is_taken_as_not_authorized_unless_said() -> None:
    assert keeps(200, Headers()) is True


def test_a_body_of_exactly_max_bytes_is_kept() -> None:
    c = cache(FakeClock(), max_bytes="10B", max_body_size="10B")
    c.store("POST", "/a", b"{}", 200, None, b"0123456789")
    assert c.answer("POST", "/a", b"{}", "r") is not None
    c.store("POST", "/b", b"{}", 200, None, b"0123456789X")
    assert c.answer("POST", "/b", b"{}", "r") is None


def test_a_head_is_answered_from_the_get_and_no_other_method_is() -> None:
    c = cache(FakeClock())
    c.store("GET", "/a", b"", 200, None, b"x")
    head = c.answer("HEAD", "/a", b"", "r")
    assert head is not None
    assert head.body == b"x"  # its Content-Length is the GET's; the server sends no body
    for method in ("DELETE", "POST", "PUT", "OPTIONS"):
        assert c.answer(method, "/a", b"", "r") is None, method


def test_an_answer_nested_deeper_than_orjson_writes_keeps_its_id() -> None:
    deep = b'{"id": "a", "x": ' + b"[" * 300 + b"]" * 300 + b"}"
    assert restamp_id(deep, b'{"id": "b"}', "v2", "r") == deep  # read, but not written again
    assert restamp_id(deep, b"{}", "openai", "r") == deep


async def test_a_static_answer_with_other_fields_is_still_json() -> None:
    # Field names that sort before and after Content-Type are not taken for it.
    fallback = chain({"static": {"body": 0, "headers": {"Accept-Ranges": "none", "X-A": "1"}}})
    response = await fallback.answer(call(), b"{}")
    assert response is not None
    assert response.headers.getall("Content-Type") == ["application/json"]


def test_a_chain_says_whether_a_step_answers_without_any_model() -> None:
    client = UpstreamClient("simple", Upstream(url="http://127.0.0.1:9"))
    only_models = chain({"upstream": {"name": "simple"}}, upstreams={"simple": client})
    assert only_models.secondaries == ("simple",)
    assert only_models.answers_without_a_model is False
    with_static = chain(
        {"upstream": {"name": "simple"}}, {"static": {"body": 0}}, upstreams={"simple": client}
    )
    assert with_static.answers_without_a_model is True


# A secondary model whose answers the test writes byte by byte.


class RawModel:
    """A model server on a raw socket: each request (read to the end of its
    Content-Length) is answered with the next of ``answers``, a list of byte pieces
    written ``pause`` seconds apart; ``None`` as a piece closes the connection."""

    def __init__(self, *answers: list[bytes | None], pause: float = 0.0) -> None:
        self.answers = list(answers)
        self.pause = pause
        self.connections = 0
        self.requests = 0
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._serve, LOOPBACK, 0)
        return f"http://{LOOPBACK}:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            while self.answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                await reader.readexactly(length)
                self.requests += 1
                for piece in self.answers.pop(0):
                    if piece is None:
                        writer.close()
                        return
                    writer.write(piece)
                    await writer.drain()
                    await asyncio.sleep(self.pause)
            await reader.read()  # hold the connection until the client lets it go
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def raw_models() -> AsyncIterator[list[RawModel]]:
    made: list[RawModel] = []
    yield made
    for model in made:
        model.close()


def head(status: int, length: int) -> bytes:
    return b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (status, length)


async def test_a_secondary_answer_larger_than_its_step_takes_fails_the_step_and_is_counted(
    make_fake_model: MakeFakeModel, pools: list[Pool]
) -> None:
    model = await make_fake_model()
    client = secondary(model.url, pools).upstream
    too_large = FakeCounter()
    step = SecondaryUpstream(
        client, UpstreamFallback(name="simple", max_body_size="10B"), too_large=too_large
    )
    model.on("/infer", answering(200, b"012345678"))
    assert taken(await step.answer(call()))[1] == b"012345678"
    model.on("/infer", answering(200, b"0123456789"))
    assert taken(await step.answer(call()))[1] == b"0123456789"  # at the limit: taken
    model.on("/infer", answering(200, b"0123456789X"))
    assert await step.answer(call()) is None
    assert too_large.count == 1
    uncounted = SecondaryUpstream(client, UpstreamFallback(name="simple", max_body_size="10B"))
    assert await uncounted.answer(call()) is None


@pytest.mark.parametrize("length", [100, READ_AHEAD])
async def test_a_small_secondary_answer_that_breaks_off_fails_the_step(
    length: int, raw_models: list[RawModel], pools: list[Pool]
) -> None:
    """Within the read-ahead the answer is awaited whole, so a broken one fails the
    step (the next one answers) instead of reaching the client cut short."""
    model = RawModel([head(200, length), b"x" * 10, None])
    raw_models.append(model)
    with capture_logs() as logs:
        assert await secondary(await model.start(), pools).answer(call()) is None
    failures = [e for e in logs if e["event"] == "fallback_upstream_failed"]
    assert [e["error"] for e in failures] == ["upstream_error"]


async def test_a_small_secondary_answer_that_stalls_fails_the_step_as_a_timeout(
    raw_models: list[RawModel], pools: list[Pool]
) -> None:
    model = RawModel([head(200, 100), b"x" * 10])
    raw_models.append(model)
    url = await model.start()
    with capture_logs() as logs:
        assert await secondary(url, pools, timeout="100ms").answer(call()) is None
    failures = [e for e in logs if e["event"] == "fallback_upstream_failed"]
    assert [e["error"] for e in failures] == ["upstream_timeout"]


async def test_a_large_secondary_answer_is_taken_as_it_starts(
    raw_models: list[RawModel], pools: list[Pool]
) -> None:
    """Past the read-ahead the answer is relayed as it comes: the step takes it at
    its head (the body may take longer than the step's timeout)."""
    model = RawModel([head(200, READ_AHEAD + 1), b"x" * 10])
    raw_models.append(model)
    step = secondary(await model.start(), pools, timeout="5s")
    answer = await asyncio.wait_for(step.answer(call()), 2)
    assert isinstance(answer, SecondaryAnswer)
    assert answer.response.status == 200
    assert not answer.response.complete
    answer.response.close()


async def test_a_refused_small_answer_is_read_to_its_end_and_its_connection_kept(
    raw_models: list[RawModel], pools: list[Pool]
) -> None:
    model = RawModel(
        [head(404, 2), b"n", b"o"], [head(200, 2), b"o", b"k"], pause=0.05
    )  # each answer's body after its head
    raw_models.append(model)
    step = secondary(await model.start(), pools)
    assert await step.answer(call()) is None
    assert taken(await step.answer(call()))[1] == b"ok"
    assert (model.connections, model.requests) == (1, 2)


async def test_a_secondary_step_cancelled_while_its_answer_arrives_frees_the_connection(
    raw_models: list[RawModel], pools: list[Pool]
) -> None:
    model = RawModel([head(200, 100), b"x" * 10])
    raw_models.append(model)
    step = secondary(await model.start(), pools)
    asking = asyncio.ensure_future(step.answer(call()))
    for _ in range(200):  # until its head has come (bounded: 2 s)
        if model.requests:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.05)
    asking.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asking
    assert step.upstream.pool.open == 0  # closed, not left in use


@pytest.mark.parametrize(
    ("body", "asks"),
    [
        (b'{"model": "m", "stream": true}', True),
        (b'{"stream": false}', False),
        (b'{"stream": 1}', False),  # true itself, as the openai package sends it
        (b'{"note": "stream"}', False),
        (b'[{"stream": true}]', False),
        (b'{"stream": true', False),  # not JSON
        (b"{}", False),
    ],
)
def test_which_requests_ask_for_a_stream(body: bytes, asks: bool) -> None:
    assert asks_for_a_stream(body) is asks


def completion(**fields: Any) -> Response:
    document = {
        "id": "c-1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"content": "setosa"}, "finish_reason": "stop"}],
        **fields,
    }
    headers = Headers([(FALLBACK_HEADER, "rule")])
    return Response(200, orjson.dumps(document), headers, content_type="application/json")


def events(answer: Response) -> list[Any]:
    """The event stream's data, each parsed (``[DONE]`` as is); it ends the stream."""
    assert answer.body.endswith(b"\n\n")
    found: list[Any] = []
    for event in answer.body[:-2].split(b"\n\n"):
        assert event.startswith(b"data: "), answer.body
        data = event.removeprefix(b"data: ")
        found.append(data.decode() if data == b"[DONE]" else orjson.loads(data))
    return found


def test_a_made_chat_completion_is_sent_as_its_one_chunk_then_done() -> None:
    """With "stream": true the openai package reads events: a whole completion sent
    as JSON gave its user an empty stream, without an error."""
    streamed = as_event_stream(completion())
    assert streamed.status == 200
    assert streamed.headers["Content-Type"] == "text/event-stream"
    assert streamed.headers["Cache-Control"] == "no-cache"
    assert streamed.headers[FALLBACK_HEADER] == "rule"
    chunk, done = events(streamed)
    assert done == "[DONE]"
    assert chunk == {
        "id": "c-1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": {"content": "setosa"}, "finish_reason": "stop"}],
    }
    # A chat completion by its object alone, or by a choice's message alone.
    (chunk, _) = events(as_event_stream(completion(choices=[])))
    assert chunk["object"] == "chat.completion.chunk"
    (chunk, _) = events(as_event_stream(completion(object="a")))
    assert chunk["object"] == "chat.completion.chunk"
    # Anything else is one event as it is (a text completion has no message).
    text = completion(object="a", choices=[{"index": 0, "text": "setosa"}, "odd"])
    (chunk, _) = events(as_event_stream(text))
    assert chunk["object"] == "a"
    assert chunk["choices"] == [{"index": 0, "text": "setosa"}, "odd"]


@pytest.mark.parametrize(
    "answer",
    [
        Response(503, b'{"error": {}}', content_type="application/json"),
        Response(199, b"{}", content_type="application/json"),
        Response(300, b"{}", content_type="application/json"),
        Response(200, b"setosa", content_type="text/plain"),
        Response(200, b"data: {}\n\n", content_type="text/event-stream"),
        Response(200, b"not json", content_type="application/json"),
        Response(200, b"[1, 2]", content_type="application/json"),
    ],
    ids=["error", "199", "300", "text", "a-stream-already", "not-json", "not-an-object"],
)
def test_other_answers_are_left_as_they_are(answer: Response) -> None:
    assert as_event_stream(answer) is answer
