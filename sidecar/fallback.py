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
import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import aiohttp
import orjson
import structlog
from aiohttp import web
from multidict import CIMultiDict

from sidecar.config import Answer, CacheFallback, FallbackPolicy, UpstreamFallback
from sidecar.rules import Predicate, compile_condition
from sidecar.upstreams import UpstreamClient, Upstreams

log = structlog.get_logger("sidecar.fallback")

FALLBACK_HEADER = "X-Sidecar-Fallback"


@dataclass(frozen=True, slots=True)
class _Canned:
    """A configured answer, encoded once."""

    name: str
    status: int
    body: bytes
    headers: tuple[tuple[str, str], ...]

    @classmethod
    def from_answer(cls, name: str, answer: Answer) -> _Canned:
        headers = {"Content-Type": "application/json", **answer.headers}
        return cls(name, answer.status, orjson.dumps(answer.body), tuple(headers.items()))

    def response(self) -> web.Response:
        response = web.Response(status=self.status, body=self.body, headers=self.headers)
        response.headers[FALLBACK_HEADER] = self.name
        return response


@dataclass(slots=True)
class _CacheEntry:
    stored_at: float
    status: int
    content_type: str | None
    body: bytes


def canonical_key(body: bytes) -> str:
    """The same JSON written differently (key order, spaces) gives the same key."""
    try:
        canonical = orjson.dumps(orjson.loads(body), option=orjson.OPT_SORT_KEYS)
    except orjson.JSONDecodeError:
        canonical = body
    return hashlib.blake2b(canonical, digest_size=16).hexdigest()


class ResponseCache:
    """Bounded LRU of good answers with a time to live."""

    name = "cache"

    def __init__(self, settings: CacheFallback, clock: Callable[[], float] = time.monotonic):
        self._settings = settings
        self._clock = clock
        self._entries: OrderedDict[str, _CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def store(
        self, request_body: bytes, status: int, content_type: str | None, body: bytes
    ) -> None:
        if len(body) > self._settings.max_body_size:
            return
        key = canonical_key(request_body)
        self._entries[key] = _CacheEntry(self._clock(), status, content_type, body)
        self._entries.move_to_end(key)
        while len(self._entries) > self._settings.max_entries:
            self._entries.popitem(last=False)

    def answer(self, request_body: bytes) -> web.Response | None:
        key = canonical_key(request_body)
        entry = self._entries.get(key)
        if entry is None:
            return None
        age = self._clock() - entry.stored_at
        if age > self._settings.ttl:
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        headers = CIMultiDict({FALLBACK_HEADER: self.name, "Age": str(int(age))})
        if entry.content_type:
            headers["Content-Type"] = entry.content_type
        return web.Response(status=entry.status, body=entry.body, headers=headers)


class RuleSet:
    def __init__(self, rules: tuple[tuple[str, Predicate, _Canned], ...]) -> None:
        self._rules = rules

    def answer(self, request_body: bytes) -> web.Response | None:
        try:
            document: Any = orjson.loads(request_body)
        except orjson.JSONDecodeError:
            return None
        for _name, matches, canned in self._rules:
            if matches(document):
                return canned.response()
        return None


class SecondaryUpstream:
    def __init__(self, upstream: UpstreamClient, settings: UpstreamFallback) -> None:
        self.upstream = upstream
        self.timeout = settings.timeout

    async def answer(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> web.Response | None:
        try:
            async with (
                asyncio.timeout(self.timeout),
                self.upstream.session.request(
                    method,
                    self.upstream.url_for(target),
                    headers=headers,
                    data=body or None,
                    allow_redirects=False,
                ) as response,
            ):
                payload = await response.read()
        except (aiohttp.ClientError, TimeoutError) as exc:
            log.warning(
                "fallback_upstream_failed", upstream=self.upstream.name, error=type(exc).__name__
            )
            return None
        if response.status >= 500:
            return None
        out = web.Response(status=response.status, body=payload)
        if response.content_type:
            out.headers["Content-Type"] = response.headers.get("Content-Type", "")
        out.headers[FALLBACK_HEADER] = self.upstream.name
        return out


Step = ResponseCache | RuleSet | _Canned | SecondaryUpstream


class FallbackChain:
    def __init__(
        self,
        policy: FallbackPolicy,
        upstreams: Upstreams,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.triggers = frozenset(policy.triggers)
        self.cache: ResponseCache | None = None
        steps: list[Step] = []
        for step in policy.chain:
            if step.cache is not None:
                self.cache = ResponseCache(step.cache, clock)
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
                        )
                    )
                )
            elif step.static is not None:
                steps.append(_Canned.from_answer(step.static.name, step.static))
            elif step.upstream is not None:
                steps.append(SecondaryUpstream(upstreams[step.upstream.name], step.upstream))
        self._steps = tuple(steps)

    async def answer(
        self, method: str, target: str, headers: CIMultiDict[str], body: bytes
    ) -> web.Response | None:
        for step in self._steps:
            if isinstance(step, _Canned):
                return step.response()
            if isinstance(step, SecondaryUpstream):
                answer = await step.answer(method, target, headers, body)
            else:
                answer = step.answer(body)
            if answer is not None:
                return answer
        return None
