"""Fallback answers for when the model cannot give one: tried in order, first wins.

    cache      the last good answer to the same canonical request body (LRU + TTL)
    rules      ordered conditions over the request JSON -> a configured answer
    static     a fixed default answer
    upstream   a secondary (simpler) model server

Every fallback answer carries ``X-Sidecar-Fallback: <rule name>``. Everything is
compiled when the config is loaded; answering only reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Final, TypeAlias

import orjson
import structlog

from sidecar.config.jsontext import repeats_a_key
from sidecar.config.rules import Predicate, compile_condition
from sidecar.config.schema import Answer, CacheFallback, FallbackPolicy, UpstreamFallback
from sidecar.config.tensors import JSON_HEAD_LENGTH, json_head_length, read_v2
from sidecar.http import errors
from sidecar.http.client import READ_AHEAD, BrokenAnswer, ClientResponse
from sidecar.http.messages import Headers, Response
from sidecar.upstream.breaker import BreakerFailure, UpstreamBreaker
from sidecar.upstream.upstreams import UpstreamCall, UpstreamClient

log: Final = structlog.get_logger("sidecar.upstream.fallback")

FALLBACK_HEADER: Final = "X-Sidecar-Fallback"


@dataclass(frozen=True, slots=True)
class _Canned:
    """A configured answer, encoded once."""

    name: str
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def from_answer(cls, name: str, answer: Answer) -> _Canned:
        headers = tuple(answer.headers.items())
        # The body is JSON unless the answer names its type: in any case, as field
        # names are (a second Content-Type field would make the message invalid).
        if not any(field.lower() == "content-type" for field, _ in headers):
            headers = (("Content-Type", "application/json"), *headers)
        return cls(name, answer.status, orjson.dumps(answer.body), headers)

    def response(self) -> Response:
        response = Response(self.status, self.body, Headers(self.headers))
        response.headers[FALLBACK_HEADER] = self.name
        return response


@dataclass(slots=True)
class _CacheEntry:
    stored_at: float
    status: int
    content_type: str | None
    body: bytes
    json_head: int | None  # the body's JSON head in bytes (binary V2 tensors follow)


def canonical_key(
    method: str,
    target: str,
    body: bytes,
    protocol: str = "plain",
    json_head: int | None = None,
    max_parse_bytes: int | None = None,
) -> str:
    """The same request to the same model gives the same key, whatever the JSON's key
    order or spacing; the method and target keep two models behind one route apart.
    A V2 request's top-level ``id`` names the request, not its inputs: it is left out.
    ``json_head``: a binary V2 request's JSON is its first bytes, its tensors follow.
    A body (or head) longer than ``max_parse_bytes`` is keyed by its bytes, unparsed."""
    tensors = b""
    if json_head is not None:
        body, tensors = body[:json_head], body[json_head:]
    # The bytes as they came are the key when the body is not JSON, when it is nested
    # deeper than orjson writes (254 levels; it reads 1024), or when it names a key
    # twice: orjson keeps the last copy, Triton's parser the first, so as canonical
    # JSON a body whose first "inputs" were another's took the key of the body holding
    # only the second, and once the model was down that body's client got its answer.
    canonical = body
    if max_parse_bytes is None or len(body) <= max_parse_bytes:
        try:
            document = orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        else:
            if not repeats_a_key(body, document):
                if protocol == "v2" and isinstance(document, dict):
                    document.pop("id", None)
                with contextlib.suppress(orjson.JSONEncodeError):
                    canonical = orjson.dumps(document, option=orjson.OPT_SORT_KEYS)
    digest = hashlib.blake2b(digest_size=16)
    if json_head is not None:  # the head's length keeps it apart from the tensors
        canonical = b"%d\n%b%b" % (len(canonical), canonical, tensors)
    for part in (method.encode(), b" ", target.encode(), b"\n", canonical):
        digest.update(part)
    return digest.hexdigest()


def restamp_id(body: bytes, request_body: bytes, protocol: str, request_id: str) -> bytes:
    """A cached answer's top-level ``id`` belonged to the request that was cached. V2
    echoes the request's ``id``: this request's, or none when it named none. OpenAI
    names each completion: a fresh name. Plain JSON answers are left as they are
    (their ``id`` is data, and it was part of the cache key)."""
    if protocol == "plain" or b'"id"' not in body:
        return body
    try:
        answer = orjson.loads(body)
    except orjson.JSONDecodeError:
        return body
    if not isinstance(answer, dict) or "id" not in answer:
        return body
    if protocol == "openai":
        answer["id"] = f"cached-{request_id}"
    else:
        try:
            request = orjson.loads(request_body)
        except orjson.JSONDecodeError:
            request = None
        if isinstance(request, dict) and "id" in request:
            answer["id"] = request["id"]
        else:
            del answer["id"]
    try:
        return orjson.dumps(answer)
    except orjson.JSONEncodeError:  # nested deeper than orjson writes
        return body


def asks_for_a_stream(request_body: bytes) -> bool:
    """An OpenAI-style request with ``"stream": true``: its client reads events."""
    if b'"stream"' not in request_body:
        return False
    try:
        request = orjson.loads(request_body)
    except orjson.JSONDecodeError:
        return False
    return isinstance(request, dict) and request.get("stream") is True


def as_event_stream(answer: Response) -> Response:
    """A whole OpenAI-style answer (a rule's, the static one, the cache's) in the
    form a client that asked for a stream reads: one server-sent event holding it (a
    chat completion as its one chunk, each choice's ``message`` as its ``delta``),
    then ``[DONE]``. Sent as JSON, the openai package found no event in it and gave
    the user an empty stream without an error. Other answers (an error status, a
    body that is not a JSON object, one that is a stream already) are left alone."""
    if not 200 <= answer.status < 300 or answer.content_type != "application/json":
        return answer
    try:
        document = orjson.loads(answer.body)
    except orjson.JSONDecodeError:
        return answer
    if not isinstance(document, dict):
        return answer
    choices = document.get("choices")
    if document.get("object") == "chat.completion" or (
        isinstance(choices, list) and any(isinstance(c, dict) and "message" in c for c in choices)
    ):
        document["object"] = "chat.completion.chunk"
        if isinstance(choices, list):
            document["choices"] = [
                {("delta" if key == "message" else key): value for key, value in choice.items()}
                if isinstance(choice, dict)
                else choice
                for choice in choices
            ]
    # orjson writes no newline, which would end the event's data line.
    body = b"data: " + orjson.dumps(document) + b"\n\ndata: [DONE]\n\n"
    headers = answer.headers.copy()
    headers["Content-Type"] = "text/event-stream"
    headers["Cache-Control"] = "no-cache"
    return Response(answer.status, body, headers)


# Directives by which a model says an answer to an authorized request may be shared
# (RFC 9111, section 3.5).
_SHAREABLE: Final = frozenset({"public", "s-maxage", "must-revalidate"})


def keeps(status: int, headers: Headers, authorized: bool = False) -> bool:
    """Whether the cache may keep a model's answer, to answer any request with the
    same key: only a whole answer, a 200 (a 206 to a Range request is a part, its
    Content-Range dropped; a 201, 202 or 204 speaks of that one request); not an
    encoded one (gzip, br: the cache keeps a body and its Content-Type only, and
    clients would get bytes they cannot read); and only one it may share."""
    return (
        status == 200
        and headers.get_raw(b"content-encoding") in (None, b"identity")
        and _may_share(headers, authorized)
    )


def _may_share(headers: Headers, authorized: bool) -> bool:
    """Whether a model's answer may stand in for the same request from anyone: not
    when it says it is one client's (``Cache-Control: private``, ``no-store``) or
    that it depends on request fields the cache key leaves out (``Vary``, but for
    Accept-Encoding: only an unencoded answer is kept, which every client reads).
    ``authorized``: the model was sent the client's Authorization field, so the
    answer is that client's unless the model says otherwise (``public``,
    ``s-maxage``, ``must-revalidate``), as for a shared HTTP cache: the key leaves
    the credential out, and a client the model would refuse must not get it."""
    shared = not authorized
    for value in headers.getall("Cache-Control"):
        directives = {d.strip().split("=", 1)[0].lower() for d in value.split(",")}
        if "no-store" in directives or "private" in directives:
            return False
        if not directives.isdisjoint(_SHAREABLE):
            shared = True
    if not shared:
        return False
    for value in headers.getall("Vary"):
        if {name.strip().lower() for name in value.split(",")} - {"", "accept-encoding"}:
            return False
    return True


class ResponseCache:
    """An LRU of good answers with a time to live, bounded in entries and in bytes;
    what it evicts to stay in budget is counted."""

    name = "cache"

    def __init__(
        self,
        settings: CacheFallback,
        protocol: str = "plain",
        clock: Callable[[], float] = time.monotonic,
        evicted: Any = None,
        max_parse_bytes: int | None = None,
    ):
        self._settings = settings
        self._protocol = protocol
        self._max_parse_bytes = max_parse_bytes  # larger requests are keyed by their bytes
        self._clock = clock
        self._entries: OrderedDict[str, _CacheEntry] = OrderedDict()
        self._bytes = 0
        self._evicted = evicted  # a counter child, or None

    @property
    def size_bytes(self) -> int:
        return self._bytes

    def __len__(self) -> int:
        return len(self._entries)

    def store(
        self,
        method: str,
        target: str,
        request_body: bytes,
        status: int,
        content_type: str | None,
        body: bytes,
        json_head: int | None = None,
        request_json_head: int | None = None,
    ) -> None:
        """``json_head``, ``request_json_head``: the answer's and the request's
        Inference-Header-Content-Length (binary V2 tensors), when they have one."""
        settings = self._settings
        key = canonical_key(
            method,
            target,
            request_body,
            self._protocol,
            request_json_head,
            self._max_parse_bytes,
        )
        old = self._entries.pop(key, None)
        if old is not None:
            self._bytes -= len(old.body)
        if len(body) > settings.max_body_size or len(body) > settings.max_bytes:
            # Not kept, and the older answer went with it (it is not the last one any
            # more). One over max_bytes is not stored either: to make room, every
            # other answer was evicted before it was itself.
            return
        self._entries[key] = _CacheEntry(self._clock(), status, content_type, body, json_head)
        self._bytes += len(body)
        while len(self._entries) > settings.max_entries or self._bytes > settings.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self._bytes -= len(evicted.body)
            if self._evicted is not None:
                self._evicted.inc()

    def answer(
        self,
        method: str,
        target: str,
        request_body: bytes,
        request_id: str,
        request_json_head: int | None = None,
    ) -> Response | None:
        # A HEAD is answered with the head of the GET (RFC 9110 section 9.3.2): its
        # Content-Length and fields are the GET's; the server sends no body.
        key = canonical_key(
            "GET" if method == "HEAD" else method,
            target,
            request_body,
            self._protocol,
            request_json_head,
            self._max_parse_bytes,
        )
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self._clock() - entry.stored_at
        if age > self._settings.ttl:
            del self._entries[key]
            self._bytes -= len(entry.body)
            return None
        self._entries.move_to_end(key)
        headers = Headers([(FALLBACK_HEADER, self.name), ("Age", str(int(age)))])
        if entry.content_type:
            headers["Content-Type"] = entry.content_type
        if request_json_head is not None:
            request_body = request_body[:request_json_head]
        if entry.json_head is None:
            body = restamp_id(entry.body, request_body, self._protocol, request_id)
        else:
            # Binary tensors after a JSON head: without the field saying where the head
            # ends, tritonclient read the whole body as JSON and failed. The id is the
            # head's, whose length it changes.
            head = restamp_id(
                entry.body[: entry.json_head], request_body, self._protocol, request_id
            )
            body = head + entry.body[entry.json_head :]
            headers[JSON_HEAD_LENGTH] = str(len(head))
        return Response(entry.status, body, headers)


class RuleSet:
    def __init__(
        self,
        rules: tuple[tuple[str, Predicate, _Canned], ...],
        max_parse_bytes: int | None = None,
        unparsed: Any = None,
    ) -> None:
        """``max_parse_bytes``: larger requests are not read (counted in ``unparsed``,
        a counter child, or None): parsed on the event loop in one step, a 16 MiB body
        held every other client up for a second."""
        self._rules = rules
        self._max_parse_bytes = max_parse_bytes
        self._unparsed = unparsed
        self._said_unparsed = False

    def answer(self, request_body: bytes, json_head: int | None = None) -> Response | None:
        """The first rule's answer whose condition the request meets. ``json_head``: a
        binary V2 request's JSON head length; its tensors' elements are read as data
        (each when a rule reads it, so only the head counts as parsed)."""
        parsed = len(request_body) if json_head is None else json_head
        limit = self._max_parse_bytes
        if limit is not None and parsed > limit:
            if self._unparsed is not None:
                self._unparsed.inc()
            if not self._said_unparsed:
                self._said_unparsed = True
                log.warning(
                    "fallback_rules_skipped_large_body",
                    bytes=parsed,
                    max_parse_bytes=limit,
                    message="rules do not read requests this large (counted in "
                    'sidecar_dropped_total{buffer="fallback_unparsed"}); the next step '
                    "answers; raise fallback.max_parse_bytes",
                )
            return None
        try:
            document: Any = read_v2(request_body, json_head)
        except ValueError:
            return None
        for _name, matches, canned in self._rules:
            if matches(document):
                return canned.response()
        return None


# A secondary model's 4xx that are about the request itself: the primary would have
# said the same, and a later step (rules, static) must not make up a prediction for
# input a model rejected. Any other status fails the step (see SecondaryUpstream).
_REQUESTS_FAULT: Final = frozenset({400, 422})
_TOO_LARGE: Final = "answer_too_large"


@dataclass(slots=True)
class SecondaryAnswer:
    """A secondary model's answer that its step took: the pipeline relays it as it
    relays the primary's (a stream as it comes, with the same flow control and idle
    limit), then releases it."""

    upstream: UpstreamClient
    response: ClientResponse
    started: float  # time.perf_counter() when it was asked: its own upstream time


class SecondaryUpstream:
    """A second model that answers in the first one's place. A small answer (a
    Content-Length within the read-ahead) must arrive whole within the step's
    ``timeout``, or the step fails and the next one answers; a larger one, or a
    stream, is handed on once its head is in (an LLM fallback's tokens are not held
    back), so no answer of it is held whole in memory. One declaring more than
    ``max_body_size``, when set, fails the step (counted in ``too_large``).

    Only a 2xx, or a 400 or 422 (the request's fault), is its answer. Anything else
    says it cannot answer either: a 5xx, a 404 (it does not serve this path or model),
    a 429 (it is overloaded), a 401 or 403 (its credentials are wrong), a redirect
    (never followed), and so on; the step fails and the next one answers.

    ``breaker``: the secondary upstream's own (the one its routes, if any, use). Its
    connect errors, timeouts, broken answers and ``failure_statuses`` count on it as
    the primary's count on the primary's; while it is open the step is skipped at
    once, so a secondary that hangs does not cost every fallback the step's timeout."""

    def __init__(
        self,
        upstream: UpstreamClient,
        settings: UpstreamFallback,
        too_large: Any = None,
        breaker: UpstreamBreaker | None = None,
    ) -> None:
        self.upstream = upstream
        self.timeout = settings.timeout
        self.max_body_size = settings.max_body_size
        self._too_large = too_large  # a counter child, or None
        self.breaker = breaker
        self._unavailable = frozenset(upstream.config.breaker.failure_statuses)

    async def answer(self, call: UpstreamCall) -> SecondaryAnswer | None:
        breaker = self.breaker
        try:
            if breaker is None:
                return await self._ask(call)
            with breaker.attempt():
                return await self._ask(call)
        except errors.CircuitOpen:
            log.warning(
                "fallback_upstream_failed", upstream=self.upstream.name, error="circuit_open"
            )
            return None
        except (BreakerFailure, errors.Reloaded):
            return None  # logged where it failed

    async def _ask(self, call: UpstreamCall) -> SecondaryAnswer | None:
        """Its answer, or None when it gave one the step does not take; raises
        ``BreakerFailure`` when it was unavailable (its breaker counts that), and
        ``Reloaded`` when a reload's refusal kept it from being asked (leaving the
        breaker's block as neither a failure nor an answer)."""
        upstream = self.upstream
        response: ClientResponse | None = None
        started = time.perf_counter()
        try:
            async with asyncio.timeout(self.timeout):
                # This upstream's own headers and deadline, never the primary's.
                response = await upstream.send(call, within=self.timeout)
                problem = self._refusal(response)
                # A small answer is awaited whole even when refused for its status:
                # read to the end, its connection is kept for the next.
                if problem != _TOO_LARGE and _arrives_whole(response):
                    await response.wait_complete(self.timeout)
        except (errors.SidecarError, BrokenAnswer, TimeoutError) as exc:
            if response is not None:
                response.close()
            if isinstance(exc, errors.SidecarError):
                reason = exc.type
            else:
                reason = "upstream_timeout" if isinstance(exc, TimeoutError) else "upstream_error"
            log.warning("fallback_upstream_failed", upstream=upstream.name, error=reason)
            if isinstance(exc, errors.Reloaded):
                # The sidecar's doing: the secondary neither failed nor answered (a
                # return here would be a success, closing a half-open circuit).
                raise
            raise BreakerFailure(exc) from None
        except BaseException:
            if response is not None:
                response.close()  # cancelled (the client left): free its connection
            raise
        if problem is not None:
            if response.complete:
                response.take_whole()  # dropped: its connection is kept for the next
            response.release()  # else closed
            log.warning(
                "fallback_upstream_failed",
                upstream=upstream.name,
                error=problem,
                status=response.status,
            )
            if response.status in self._unavailable:
                raise BreakerFailure(problem)
            return None
        return SecondaryAnswer(upstream, response, started)

    def _refusal(self, response: ClientResponse) -> str | None:
        """Why this step does not take the answer, or None when it does."""
        status = response.status
        if not (200 <= status < 300 or status in _REQUESTS_FAULT):
            return "status"
        limit = self.max_body_size
        length = response.content_length
        if limit is not None and length is not None and length > limit:
            if self._too_large is not None:
                self._too_large.inc()
            return _TOO_LARGE
        return None


def _arrives_whole(response: ClientResponse) -> bool:
    """A body small enough to wait for whole before anything is sent on (as the relay
    reads it), so that breaking off or going silent in it fails the step."""
    length = response.content_length
    return not response.complete and length is not None and length <= READ_AHEAD


# A string: compiled classes do not make a union with | at run time.
Step: TypeAlias = "ResponseCache | RuleSet | _Canned | SecondaryUpstream"


class FallbackChain:
    def __init__(
        self,
        policy: FallbackPolicy,
        upstreams: Mapping[str, UpstreamClient],  # the secondary upstreams named, by name
        clock: Callable[[], float] = time.monotonic,
        protocol: str = "plain",
        evicted: Any = None,
        too_large: Any = None,
        cache: ResponseCache | None = None,
        breakers: Mapping[str, UpstreamBreaker | None] | None = None,
        unparsed: Any = None,
    ) -> None:
        """``evicted``, ``too_large``, ``unparsed``: counters of cached answers evicted,
        of secondary models' answers too large to take, and of requests too large
        for the rules to read. ``breakers``: the upstreams'
        breakers by name (None where one is switched off), which the secondary
        models' steps go through. ``cache``: the cache of the
        chain a reload replaces, carried on for the cache step (the caller checked
        that its answers mean the same here); it goes on holding, and counting in its
        budget, what both chains store."""
        self.triggers = frozenset(policy.triggers)
        self.protocol = protocol
        self.statuses = frozenset(policy.statuses)
        # What readiness needs to know: the secondary models the chain asks, and
        # whether a step answers without any model (cache, rules, static).
        self.secondaries = tuple(s.upstream.name for s in policy.chain if s.upstream is not None)
        self.answers_without_a_model = any(s.upstream is None for s in policy.chain)
        self.cache: ResponseCache | None = None
        steps: list[Step] = []
        for step in policy.chain:
            if step.cache is not None:
                # Not ``cache or ...``: an empty cache is falsy (it has a length).
                self.cache = (
                    cache
                    if cache is not None
                    else ResponseCache(step.cache, protocol, clock, evicted, policy.max_parse_bytes)
                )
                steps.append(self.cache)
            elif step.rules is not None:
                steps.append(
                    RuleSet(
                        tuple(
                            (
                                rule.name,
                                compile_condition(rule.when),
                                _Canned.from_answer(rule.name, rule.respond),
                            )
                            for rule in step.rules
                        ),
                        policy.max_parse_bytes,
                        unparsed,
                    )
                )
            elif step.static is not None:
                steps.append(_Canned.from_answer(step.static.name, step.static))
            elif step.upstream is not None:
                name = step.upstream.name
                steps.append(
                    SecondaryUpstream(
                        upstreams[name],
                        step.upstream,
                        too_large,
                        breakers.get(name) if breakers is not None else None,
                    )
                )
        self._steps = tuple(steps)

    async def answer(self, call: UpstreamCall, body: bytes) -> Response | SecondaryAnswer | None:
        answer: Response | SecondaryAnswer | None
        json_head = json_head_length(call.headers.get(JSON_HEAD_LENGTH), len(body))
        for step in self._steps:
            if isinstance(step, _Canned):
                return self._as_asked(step.response(), body)
            if isinstance(step, SecondaryUpstream):
                answer = await step.answer(call)  # asked the request itself: it streams
                if answer is not None:
                    return answer
                continue
            if isinstance(step, ResponseCache):
                answer = step.answer(
                    call.method,
                    call.target,
                    body,
                    call.request_id,
                    json_head,
                )
            else:
                answer = step.answer(body, json_head)
            if answer is not None:
                return self._as_asked(answer, body)
        return None

    def _as_asked(self, answer: Response, body: bytes) -> Response:
        """A whole answer made here, as a stream when an OpenAI client asked for one."""
        if self.protocol == "openai" and asks_for_a_stream(body):
            return as_event_stream(answer)
        return answer
