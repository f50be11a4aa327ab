"""Deployment config: one YAML file becomes frozen, typed objects.

Loading is a short pipeline, and every step reports problems as ``ConfigIssue``
(a key path and a message) so that ``sidecar check-config`` can list them all:

    read YAML (duplicate keys are errors)
      -> substitute ``${VAR}`` / ``${VAR:-default}`` from the given environment
      -> validate with pydantic (unknown keys, missing keys and wrong types)
      -> cross-reference checks (a route names an upstream that exists, ...)

This is the only module that reads the process environment.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import os
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlsplit

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    SecretStr,
    ValidationError,
    field_validator,
    model_validator,
)

from sidecar.config.rules import compile_condition, parse_field_path

# --- units -----------------------------------------------------------------------

_DURATION_UNITS = {"us": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}
_DURATION_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(us|ms|s|m|h)\s*$")
_SIZE_UNITS = {
    "B": 1,
    "KB": 1000,
    "MB": 1000**2,
    "GB": 1000**3,
    "KiB": 1024,
    "MiB": 1024**2,
    "GiB": 1024**3,
}
_SIZE_RE = re.compile(r"^\s*(\d+)\s*(B|KB|MB|GB|KiB|MiB|GiB)\s*$")


def parse_duration(value: object) -> float:
    """``"250ms"`` -> 0.25. A bare number is refused: the unit must be explicit."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError("a duration needs a unit, e.g. '250ms', '10s', '5m' (us, ms, s, m, h)")
    match = _DURATION_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a duration such as '250ms', '10s' or '5m'")
    seconds = float(match.group(1)) * _DURATION_UNITS[match.group(2)]
    if not math.isfinite(seconds):  # enough digits read as a float are infinity
        raise ValueError(f"{value!r} is too large a duration")
    return seconds


def format_duration(seconds: float) -> str:
    for unit, scale in (("h", 3600.0), ("m", 60.0), ("s", 1.0), ("ms", 1e-3)):
        count = seconds / scale
        if count >= 1 and abs(count - round(count)) < 1e-9:
            return f"{round(count)}{unit}"
    return f"{round(seconds * 1e6)}us"


def parse_size(value: object) -> int:
    """``"10MiB"`` -> 10485760. A bare number is refused: the unit must be explicit."""
    if isinstance(value, bool) or not isinstance(value, str):
        raise ValueError(
            "a size needs a unit, e.g. '512KiB', '10MiB' (B, KB, MB, GB, KiB, MiB, GiB)"
        )
    match = _SIZE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a size such as '512KiB' or '10MiB'")
    return int(match.group(1)) * _SIZE_UNITS[match.group(2)]


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size and size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return f"{size}B"


_RATE_RE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*/\s*(s|m|h)\s*$")


def parse_rate(value: object) -> float:
    """``"100/s"`` or ``"6000/m"`` -> requests per second."""
    if not isinstance(value, str):
        raise ValueError("a rate is written like '100/s', '6000/m' or '10000/h'")
    match = _RATE_RE.match(value)
    if match is None:
        raise ValueError(f"{value!r} is not a rate such as '100/s' or '6000/m'")
    per_second = float(match.group(1)) / {"s": 1.0, "m": 60.0, "h": 3600.0}[match.group(2)]
    if not math.isfinite(per_second):
        raise ValueError(f"{value!r} is too large a rate")
    return per_second


def format_rate(per_second: float) -> str:
    return f"{per_second:g}/s"


def parse_byte_rate(value: object) -> int:
    """``"1KiB/s"`` -> 1024 bytes a second (``"0B/s"``: none asked)."""
    text = value.strip() if isinstance(value, str) else ""
    size, per, unit = text.rpartition("/")
    if not per or unit.strip() != "s":
        raise ValueError("a byte rate is written like '500B/s' or '1KiB/s'")
    return parse_size(size.strip())


def format_byte_rate(per_second: int) -> str:
    return f"{format_size(per_second)}/s"


def _positive(value: float) -> float:
    if value <= 0:
        raise ValueError("must be more than zero")
    return value


Duration = Annotated[float, BeforeValidator(parse_duration), PlainSerializer(format_duration)]
# Timeouts, intervals and rates: zero would mean every request times out, a busy
# loop, or a division by zero, so it is refused where the config is read.
PositiveDuration = Annotated[
    float,
    BeforeValidator(parse_duration),
    AfterValidator(_positive),
    PlainSerializer(format_duration),
]
Rate = Annotated[
    float, BeforeValidator(parse_rate), AfterValidator(_positive), PlainSerializer(format_rate)
]
ByteSize = Annotated[int, BeforeValidator(parse_size), PlainSerializer(format_size)]
ByteRate = Annotated[int, BeforeValidator(parse_byte_rate), PlainSerializer(format_byte_rate)]
# Sizes where zero would refuse every request or drop every log line.
PositiveByteSize = Annotated[
    int, BeforeValidator(parse_size), AfterValidator(_positive), PlainSerializer(format_size)
]


def known_methods(methods: tuple[str, ...]) -> tuple[str, ...]:
    """Methods in upper case; an unknown one (a typo) is an error, never a method
    that silently matches no request."""
    upper = tuple(m.upper() for m in methods)
    unknown = sorted(set(upper) - HTTP_METHODS)
    if unknown:
        raise ValueError(f"unknown HTTP method(s): {', '.join(unknown)}")
    return upper


_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+")


def _header_name(name: str) -> str:
    if _HEADER_NAME.fullmatch(name) is None:
        raise ValueError("not a header name")
    return name


def _header_value(value: Any) -> Any:
    """A value written into a header field as it is: CR or LF would end the field
    (and add one of the value's choosing), NUL is refused by every parser. The
    message never shows the value: it may be a secret."""
    text = value.get_secret_value() if isinstance(value, SecretStr) else value
    if any(c in text for c in "\r\n\0"):
        raise ValueError(
            "a header value may not hold CR, LF or NUL (a secret read with its line ending?)"
        )
    return value


_QUOTED_STRING_TEXT = re.compile(r"[\t\x20\x21\x23-\x5b\x5d-\x7e]*")


def _realm(realm: str) -> str:
    """Written between the quotes of ``realm="..."`` (RFC 9110 quoted-string): a quote
    would end it early, a backslash escape what follows, a control byte break it."""
    if _QUOTED_STRING_TEXT.fullmatch(realm) is None:
        raise ValueError(
            'may hold only printable ASCII characters and spaces, not " or \\ '
            "(it is quoted in WWW-Authenticate)"
        )
    return realm


HeaderName = Annotated[str, AfterValidator(_header_name)]
HeaderValue = Annotated[str, AfterValidator(_header_value)]
SecretHeaderValue = Annotated[SecretStr, AfterValidator(_header_value)]


def _check_field_path(path: str) -> str:
    parse_field_path(path)
    return path


FieldPathText = Annotated[str, AfterValidator(_check_field_path)]


_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$"
# Binding one of these takes the port on every address, so nothing else may share it.
_WILDCARD_HOSTS = frozenset({"0.0.0.0", "::", ""})
# The methods a route's ``methods`` may name (TRACE and CONNECT are refused on any path).
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})


# --- the config tree -------------------------------------------------------------


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class Listener(_Strict):
    host: str = "0.0.0.0"
    port: int = Field(default=8080, ge=0, le=65535)


class AdminListener(_Strict):
    enabled: bool = True
    host: str = "127.0.0.1"
    port: int = Field(default=9901, ge=0, le=65535)
    # POST /-/reload: "auto" is open on a loopback address (only this machine or pod
    # can reach it) and needs an admin credential elsewhere; "off" leaves SIGHUP.
    reload: Literal["auto", "open", "credential", "off"] = "auto"

    @property
    def reload_open_to_all(self) -> bool:
        if self.reload == "auto":
            return is_loopback(self.host)
        return self.reload == "open"


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


class ServerSettings(_Strict):
    drain_delay: Duration = 0.0
    drain_timeout: Duration = 10.0
    keepalive_timeout: PositiveDuration = 75.0
    max_body_size: ByteSize = 10 * 1024 * 1024
    # Request bodies held in memory by all requests together (each is read whole
    # before it is sent on): past it a request is refused 503, not the process killed
    # for its memory. At least the largest body limit (checked).
    max_buffered_bodies: PositiveByteSize = 64 * 1024 * 1024
    # Bytes of request heads still arriving, all connections together (each may hold
    # max_head_size for head_timeout): past it a head is refused 503. At least
    # max_head_size (checked).
    max_buffered_heads: PositiveByteSize = 8 * 1024 * 1024
    max_in_flight: int | None = Field(default=None, ge=1)
    overload_retry_after: Duration = 1.0
    max_header_size: PositiveByteSize = 8 * 1024  # the request line, and each header field
    max_head_size: PositiveByteSize = 32 * 1024  # the request line and all fields together
    max_headers: int = Field(default=100, ge=1, le=10_000)
    head_timeout: PositiveDuration = 10.0  # from a request head's first byte to its end
    body_timeout: PositiveDuration = 30.0  # silence in the middle of a request body
    # A body may take body_timeout, and a second more for each body_min_rate's
    # bytes that arrive, never banking more than body_timeout ahead ("0B/s" turns
    # this bound of the whole off).
    body_min_rate: ByteRate = 500
    send_timeout: PositiveDuration = 30.0  # a client that reads nothing of its answer


class ShadowCompare(_Strict):
    protocol: Literal["v2", "v1", "openai", "json_path"] = "v2"
    output: str | None = None
    json_path: FieldPathText | None = None
    kind: Literal["numeric", "label", "embedding"] = "numeric"
    classes: int | None = Field(default=None, ge=2)
    abs_tol: float = Field(default=1e-6, ge=0.0)
    rel_tol: float = Field(default=1e-3, ge=0.0)
    min_cosine: float = Field(default=0.99, ge=-1.0, le=1.0)
    max_body_size: ByteSize = 1024 * 1024

    @model_validator(mode="after")
    def _path_for_json_path(self) -> ShadowCompare:
        if self.protocol == "json_path" and not self.json_path:
            raise ValueError("protocol json_path needs json_path")
        return self


class CanarySettings(_Strict):
    path: str
    method: Literal["GET", "POST"] = "POST"
    body: Any = None  # sent as JSON, with Content-Type: application/json
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)  # and the upstream's
    expect: Any
    compare: ShadowCompare = ShadowCompare()


class UpstreamHealth(_Strict):
    path: str = "/v2/health/ready"
    interval: PositiveDuration = 5.0
    timeout: PositiveDuration = 2.0
    models: tuple[str, ...] = ()
    model_ready_path: str = "/v2/models/{name}/ready"
    canary: CanarySettings | None = None

    @field_validator("path")
    @classmethod
    def _absolute(cls, path: str) -> str:
        if not path.startswith("/"):
            raise ValueError("must start with '/'")
        return path


HttpStatus = Annotated[int, Field(ge=100, le=599)]
# The model being unavailable, as opposed to answering: what opens a breaker and what
# a fallback answers for. A 500 or a 4xx is the model's answer to this input.
UNAVAILABLE_STATUSES = (502, 503, 504)


class BreakerSettings(_Strict):
    enabled: bool = True
    failures: int = Field(default=5, ge=1)
    # Answers counted as failures, besides connect errors and timeouts.
    failure_statuses: tuple[HttpStatus, ...] = UNAVAILABLE_STATUSES
    reset_timeout: PositiveDuration = 10.0
    half_open_probes: int = Field(default=1, ge=1)


class RetryBudgetSettings(_Strict):
    ratio: float = Field(default=0.2, gt=0.0, le=1.0)
    min_retries: int = Field(default=3, ge=0)


class RequestIdForwarding(_Strict):
    # The header that carries the request id to this upstream (null: none is sent),
    # and its form: the id the client sees, or a UUID (some servers, llama.cpp among
    # them, refuse anything else). The client's id stays in logs and in the answer.
    header: HeaderName | None = "X-Request-ID"
    format: Literal["as_received", "uuid"] = "as_received"


class Upstream(_Strict):
    url: str
    request_id: RequestIdForwarding = RequestIdForwarding()
    max_connections: int = Field(default=100, ge=1, le=100_000)
    connect_timeout: PositiveDuration = 1.0
    read_timeout: PositiveDuration = 30.0
    headers: dict[HeaderName, SecretHeaderValue] = Field(default_factory=dict)
    health: UpstreamHealth = UpstreamHealth()
    breaker: BreakerSettings = BreakerSettings()
    retry_budget: RetryBudgetSettings = RetryBudgetSettings()

    @field_validator("url")
    @classmethod
    def _http_origin(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError("must be an http:// or https:// URL with a host")
        if parts.path not in ("", "/") or parts.query or parts.fragment:
            raise ValueError("must be an origin only (scheme, host, port), without a path")
        try:
            parts.port  # noqa: B018 - urlsplit validates the port lazily
        except ValueError as exc:
            raise ValueError(f"bad port: {exc}") from None
        return url.rstrip("/")


class RetryPolicy(_Strict):
    attempts: int = Field(default=2, ge=1, le=10)
    on_statuses: tuple[int, ...] = (502, 503, 504)
    backoff_base: Duration = 0.025
    backoff_max: Duration = 0.25


def _check_condition(node: Any) -> Any:
    compile_condition(node)
    return node


Condition = Annotated[dict[str, Any], AfterValidator(_check_condition)]


class Answer(_Strict):
    status: int = Field(default=200, ge=200, le=599)
    body: Any = None
    headers: dict[HeaderName, HeaderValue] = Field(default_factory=dict)


class Rule(_Strict):
    name: str = Field(pattern=_NAME_PATTERN)
    when: Condition
    respond: Answer


class StaticFallback(Answer):
    name: str = Field(default="static", pattern=_NAME_PATTERN)


class CacheFallback(_Strict):
    max_entries: int = Field(default=1000, ge=1)
    max_bytes: ByteSize = 16 * 1024 * 1024  # the answers held, all entries together
    ttl: PositiveDuration = 300.0
    max_body_size: ByteSize = 64 * 1024


class UpstreamFallback(_Strict):
    name: str
    timeout: PositiveDuration = 1.0
    # An answer declaring a larger Content-Length fails this step (none: no limit;
    # answers are relayed as they come, never held whole past 256 KiB).
    max_body_size: ByteSize | None = None


FallbackTrigger = Literal["circuit_open", "upstream_error", "timeout", "overloaded"]


class FallbackStep(_Strict):
    cache: CacheFallback | None = None
    rules: tuple[Rule, ...] | None = None
    static: StaticFallback | None = None
    upstream: UpstreamFallback | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> FallbackStep:
        given = [
            k for k in ("cache", "rules", "static", "upstream") if getattr(self, k) is not None
        ]
        if len(given) != 1:
            raise ValueError("each step is exactly one of: cache, rules, static, upstream")
        return self


class FallbackPolicy(_Strict):
    # Not "on": YAML 1.1 reads a bare `on` key as the boolean true.
    triggers: tuple[FallbackTrigger, ...] = (
        "circuit_open",
        "upstream_error",
        "timeout",
        "overloaded",
    )
    # A model's answer with one of these statuses counts as upstream_error.
    statuses: tuple[HttpStatus, ...] = UNAVAILABLE_STATUSES
    chain: tuple[FallbackStep, ...]
    # Request bodies past this are not parsed (on the event loop, 5-15 ms a MiB, in
    # one step): rules do not read them (counted), the cache keys them by their bytes.
    max_parse_bytes: ByteSize = 1024 * 1024

    @field_validator("chain")
    @classmethod
    def _not_empty(cls, chain: tuple[FallbackStep, ...]) -> tuple[FallbackStep, ...]:
        if not chain:
            raise ValueError("needs at least one step")
        return chain


class DriftFeature(_Strict):
    name: str = Field(pattern=_NAME_PATTERN)
    field: FieldPathText


class DriftSettings(_Strict):
    protocol: Literal["v2", "v1", "openai", "json_path"] = "v2"
    output: str | None = None
    json_path: FieldPathText | None = None
    baseline: str
    freeze_after: int | None = Field(default=None, ge=10)
    window: int = Field(default=1000, ge=10)
    # Bodies waiting to be parsed (each second, or each interval when shorter): past
    # this, pairs are dropped and counted (sidecar_dropped_total{buffer="drift_pending"}).
    max_pending_bytes: ByteSize = 16 * 1024 * 1024
    # A larger pair (request and response together) is not parsed: one pair is parsed
    # in one step on the event loop, about 3 ms a MiB of JSON. Counted
    # (sidecar_dropped_total{buffer="drift_too_large"}).
    max_pair_bytes: ByteSize = 1024 * 1024
    min_samples: int = Field(default=100, ge=1)
    interval: PositiveDuration = 10.0
    bins: int = Field(default=10, ge=2, le=100)
    threshold: float = Field(default=0.2, gt=0.0)
    clear_below: float = Field(default=0.1, ge=0.0)
    features: tuple[DriftFeature, ...] = ()

    @model_validator(mode="after")
    def _consistent(self) -> DriftSettings:
        if self.protocol == "json_path" and self.json_path is None:
            raise ValueError("protocol json_path needs json_path")
        if self.clear_below >= self.threshold:
            raise ValueError("clear_below must be under threshold (hysteresis)")
        return self


class ValidationSettings(_Strict):
    content_types: tuple[str, ...] = ()
    require_json: bool = Field(default=False, alias="json")
    max_depth: int = Field(default=32, ge=1, le=1000)
    schema_file: str | None = Field(default=None, alias="schema")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("content_types")
    @classmethod
    def _lower(cls, types: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(t.strip().lower() for t in types)


class ShadowGovernor(_Strict):
    enabled: bool = True
    interval: PositiveDuration = 10.0
    min_samples: int = Field(default=20, ge=1)
    max_shadow_failure_rate: float = Field(default=0.5, ge=0.0, le=1.0)
    max_latency_increase: float = Field(default=0.25, ge=0.0)
    min_latency_increase: Duration = 0.005
    max_error_rate_increase: float = Field(default=0.05, ge=0.0, le=1.0)
    backoff_factor: float = Field(default=0.5, gt=0.0, lt=1.0)
    recover_step: float = Field(default=0.1, gt=0.0, le=1.0)


class ShadowSettings(_Strict):
    upstream: str
    fraction: float = Field(default=0.1, ge=0.0, le=1.0)
    timeout: PositiveDuration = 5.0
    max_in_flight: int = Field(default=32, ge=1)
    # The request bodies the copies out hold together (each until its candidate
    # answers or times out, after the request itself has ended): past it, skipped.
    max_bytes: ByteSize = 16 * 1024 * 1024
    compare: ShadowCompare = ShadowCompare()
    governor: ShadowGovernor = ShadowGovernor()


# The API a route's model server speaks: it shapes the sidecar's own error bodies
# and how fallbacks treat request and answer ids.
RouteProtocol = Literal["plain", "v2", "openai"]


class Route(_Strict):
    name: str = Field(pattern=_NAME_PATTERN)
    path_prefix: str = "/"
    methods: tuple[str, ...] = ()
    upstream: str
    protocol: RouteProtocol = "plain"
    timeout: PositiveDuration = 30.0
    per_try_timeout: PositiveDuration | None = None
    connect_timeout: PositiveDuration | None = None
    idle_timeout: PositiveDuration | None = None  # default: the upstream's read_timeout
    retryable: bool = False
    retry: RetryPolicy = RetryPolicy()
    max_body_size: ByteSize | None = None
    max_in_flight: int | None = Field(default=None, ge=1)
    fallback: FallbackPolicy | None = None
    payload_sample: float = Field(default=0.0, ge=0.0, le=1.0)
    drift: DriftSettings | None = None
    shadow: ShadowSettings | None = None
    validate_: ValidationSettings | None = Field(default=None, alias="validate")

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @field_validator("path_prefix")
    @classmethod
    def _absolute(cls, prefix: str) -> str:
        if not prefix.startswith("/"):
            raise ValueError("must start with '/'")
        return prefix

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        return known_methods(methods)


class AccessLogSettings(_Strict):
    enabled: bool = True
    path: str = "-"
    max_bytes: ByteSize | None = None
    backups: int = Field(default=3, ge=0, le=100)


class PayloadLogSettings(_Strict):
    path: str
    max_body_size: ByteSize = 64 * 1024
    max_bytes: ByteSize | None = None
    backups: int = Field(default=3, ge=0, le=100)


class RateSettings(_Strict):
    rate: Rate
    burst: int = Field(ge=1)


def _check_digest(value: str) -> str:
    if re.fullmatch(r"sha256:[0-9a-f]{64}", value) is None:
        raise ValueError(
            "must be sha256: and 64 lower-case hex digits; `sidecar hash-key KEY` "
            "prints the digest of a key (`--generate` makes a new key)"
        )
    return value


KeyDigest = Annotated[str, AfterValidator(_check_digest)]


class ApiKey(_Strict):
    name: str = Field(pattern=_NAME_PATTERN)
    digest: KeyDigest
    routes: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()
    rate_limit: RateSettings | None = None
    # "admin": may read /health and /metrics on the main listener (when the admin
    # listener is off) and reload the config where reloading needs a credential.
    scopes: tuple[Literal["admin"], ...] = ()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        return known_methods(methods)


class JwtSettings(_Strict):
    algorithms: tuple[Literal["HS256", "RS256"], ...] = ("RS256",)
    secret: SecretStr | None = None
    public_key: str | None = None
    issuer: str | None = None
    audience: str | None = None
    principal_claim: str = "sub"
    # Tokens whose space-separated "scope" claim holds this may use admin endpoints.
    admin_scope: str | None = None
    leeway: Duration = 30.0
    routes: tuple[str, ...] = ()
    methods: tuple[str, ...] = ()

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: tuple[str, ...]) -> tuple[str, ...]:
        return known_methods(methods)

    @model_validator(mode="after")
    def _keys_for_algorithms(self) -> JwtSettings:
        if "HS256" in self.algorithms and self.secret is None:
            raise ValueError("HS256 needs a secret")
        if "RS256" in self.algorithms and self.public_key is None:
            raise ValueError("RS256 needs a public_key (PEM text or a file)")
        return self


class AuthSettings(_Strict):
    enabled: bool = False
    header: HeaderName | None = "X-API-Key"
    realm: Annotated[HeaderValue, AfterValidator(_realm)] = "sidecar"  # in WWW-Authenticate
    api_keys: tuple[ApiKey, ...] = ()
    jwt: JwtSettings | None = None

    @model_validator(mode="after")
    def _some_scheme(self) -> AuthSettings:
        if self.enabled and not self.api_keys and self.jwt is None:
            raise ValueError("auth is enabled but has neither api_keys nor jwt")
        return self


class RateLimitSettings(_Strict):
    enabled: bool = False
    report_only: bool = False
    per_principal: RateSettings | None = None
    global_limit: RateSettings | None = Field(default=None, alias="global")
    max_principals: int = Field(default=10_000, ge=1)

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


class SharedStateSettings(_Strict):
    redis_url: SecretStr
    key_prefix: str = "sidecar"
    timeout: PositiveDuration = 0.1
    retry_after: PositiveDuration = 5.0
    # Connections to Redis a process's request path may hold at once (during a
    # reload's drain too, when the reload keeps redis_url, timeout, max_connections and
    # max_waiting: the new runtime shares the old one's). A request that finds them all
    # busy waits its turn (first come, first served) for up to ``timeout``, with at
    # most ``max_waiting`` requests waiting at once (0: none waits); one that still gets
    # no connection is decided by the local copy of the global bucket (Redis's last
    # answer, refilled locally), counted in sidecar_ratelimit_local_fallback_total.
    # Redis is busy, not lost, so what that copy lets through is owed: the process's
    # next call to Redis charges it to the shared bucket (which may go below empty, and
    # the fleet then refuses until it is paid back), so a slow Redis delays when a
    # request counts against the fleet-wide limit, not whether. While Redis is lost
    # nothing is owed: each replica keeps the whole limit to itself until Redis is back.
    max_connections: int = Field(default=32, ge=1, le=10_000)
    max_waiting: int = Field(default=256, ge=0, le=100_000)
    rate_limits: bool = True
    breakers: bool = True
    sync_interval: PositiveDuration = 1.0

    @field_validator("redis_url")
    @classmethod
    def _redis_scheme(cls, url: SecretStr) -> SecretStr:
        if not url.get_secret_value().startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("must be a redis://, rediss:// or unix:// URL")
        return url


class HealthSettings(_Strict):
    max_loop_lag: PositiveDuration = 0.5
    max_log_queue_fill: float = Field(default=0.9, gt=0.0, le=1.0)
    degraded_is_ready: bool = True
    # A log sink that fails (a full disk, a closed stdout) makes the sidecar degraded,
    # or not ready: the requests themselves are still answered either way.
    log_failure: Literal["degraded", "not_ready"] = "degraded"


class LoggingSettings(_Strict):
    level: Literal["debug", "info", "warning", "error"] = "info"
    queue_size: int = Field(default=10_000, ge=1)
    queue_bytes: PositiveByteSize = 64 * 1024 * 1024  # per log: what its queued records may hold
    # At a stop: how long the logs together may take to write what they hold (a stuck
    # sink's records are then dropped and counted, so the stop never waits on it).
    flush_timeout: PositiveDuration = 10.0
    access_log: AccessLogSettings = AccessLogSettings()
    payload_log: PayloadLogSettings | None = None
    shadow_log: PayloadLogSettings | None = None
    redact_fields: tuple[FieldPathText, ...] = ()


class Config(_Strict):
    listen: Listener = Listener()
    admin: AdminListener = AdminListener()
    server: ServerSettings = ServerSettings()
    upstreams: dict[str, Upstream]
    routes: tuple[Route, ...]
    auth: AuthSettings = AuthSettings()
    rate_limit: RateLimitSettings = RateLimitSettings()
    health: HealthSettings = HealthSettings()
    shared_state: SharedStateSettings | None = None
    logging: LoggingSettings = LoggingSettings()

    # An after-validator, not min_length: min_length would also complain about an
    # empty list when the only problem is a bad item inside it.
    @field_validator("upstreams", "routes")
    @classmethod
    def _not_empty(cls, value: dict[str, Upstream] | tuple[Route, ...]) -> Any:
        if not value:
            raise ValueError("needs at least one entry")
        return value

    def route_body_limit(self, route: Route) -> int:
        return route.max_body_size if route.max_body_size is not None else self.server.max_body_size


# --- loading ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class ConfigIssue:
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


class ConfigError(Exception):
    """Every problem found in one config file, each with the path of its key."""

    def __init__(self, source: str, issues: list[ConfigIssue]) -> None:
        self.source = source
        self.issues = issues
        super().__init__(f"{source}: {len(issues)} config error(s)")

    def render(self) -> str:
        lines = [f"{self.source}: {len(self.issues)} error(s)"]
        lines += [f"  - {issue}" for issue in self.issues]
        return "\n".join(lines)


def cannot_listen(source: str, key: str, host: str, port: int, exc: OSError) -> ConfigError:
    """The error for a listener that could not be opened (a busy or privileged port)."""
    reason = os.strerror(exc.errno).lower() if exc.errno else str(exc)
    return ConfigError(source, [ConfigIssue(key, f"cannot listen on {host}:{port}: {reason}")])


@dataclass(frozen=True, slots=True)
class LoadedConfig:
    """A validated config plus where it came from (for reloads and relative paths) and
    the bytes it was read from (a worker supervisor starts a replacement worker with
    those: the config in service, not what the file says now)."""

    config: Config
    path: Path
    sha256: str
    data: bytes = b""

    def resolve(self, file: str) -> Path:
        """A path from the config: relative ones are relative to the config's folder."""
        return (self.path.parent / file).resolve()


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate mapping keys instead of keeping the last."""


def _construct_unique_mapping(loader: _UniqueKeyLoader, node: yaml.MappingNode) -> dict[Any, Any]:
    mapping: dict[Any, Any] = {}
    for key_node, value_node in node.value:
        key = loader.construct_object(key_node)
        if isinstance(key, (dict, list)):  # YAML's "? {a: 1}": no config key is one
            raise yaml.constructor.ConstructorError(
                None,
                None,
                "a key must be a plain value, not a mapping or a list",
                key_node.start_mark,
            )
        if key in mapping:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key {key!r}", key_node.start_mark
            )
        mapping[key] = loader.construct_object(value_node, deep=True)
    return mapping


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG,
    _construct_unique_mapping,
)

_ENV_RE = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def format_path(loc: tuple[int | str, ...]) -> str:
    """``('routes', 0, 'upstream')`` -> ``routes[0].upstream``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def _substitute_env(
    node: Any, env: Mapping[str, str], loc: tuple[int | str, ...], issues: list[ConfigIssue]
) -> Any:
    if isinstance(node, dict):
        return {k: _substitute_env(v, env, (*loc, k), issues) for k, v in node.items()}
    if isinstance(node, list):
        return [_substitute_env(v, env, (*loc, i), issues) for i, v in enumerate(node)]
    if not isinstance(node, str) or "$" not in node:
        return node

    def replace(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        if name in env:
            return env[name]
        if default is not None:
            return default
        issues.append(ConfigIssue(format_path(loc), f"environment variable {name} is not set"))
        return ""

    return _ENV_RE.sub(replace, node)


_MESSAGES = {
    "extra_forbidden": "unknown key",
    "missing": "missing required key",
}


def _pydantic_issues(exc: ValidationError) -> Iterator[ConfigIssue]:
    for error in exc.errors(include_url=False):
        message = _MESSAGES.get(error["type"], error["msg"])
        message = message.removeprefix("Value error, ")
        loc = tuple(error["loc"])
        if loc[-1:] == ("[key]",):  # a mapping's key failed: the path ends at the key
            loc = loc[:-1]
        yield ConfigIssue(format_path(loc), message)


def _cross_reference_issues(config: Config) -> Iterator[ConfigIssue]:
    server = config.server
    largest = max(config.route_body_limit(route) for route in config.routes)
    if largest > server.max_buffered_bodies:
        yield ConfigIssue(
            "server.max_buffered_bodies",
            f"is smaller than the largest request body limit ({largest} bytes):"
            " such a body could never be read",
        )
    # A head may hold max_head_size, or one field of max_header_size when larger.
    largest = max(server.max_head_size, server.max_header_size)
    if largest > server.max_buffered_heads:
        yield ConfigIssue(
            "server.max_buffered_heads",
            f"is smaller than the largest request head ({largest} bytes):"
            " such a head could never be read",
        )
    seen: set[str] = set()
    for index, route in enumerate(config.routes):
        if route.upstream not in config.upstreams:
            known = ", ".join(sorted(config.upstreams))
            yield ConfigIssue(
                f"routes[{index}].upstream",
                f"no upstream named {route.upstream!r} (known: {known})",
            )
        if route.name in seen:
            yield ConfigIssue(f"routes[{index}].name", f"duplicate route name {route.name!r}")
        seen.add(route.name)
        if route.per_try_timeout is not None and route.per_try_timeout > route.timeout:
            yield ConfigIssue(
                f"routes[{index}].per_try_timeout", "is longer than the route's total timeout"
            )
        if route.payload_sample > 0 and config.logging.payload_log is None:
            yield ConfigIssue(
                f"routes[{index}].payload_sample", "needs logging.payload_log to write to"
            )
        if route.shadow is not None:
            where = f"routes[{index}].shadow.upstream"
            if route.shadow.upstream not in config.upstreams:
                yield ConfigIssue(where, f"no upstream named {route.shadow.upstream!r}")
            elif route.shadow.upstream == route.upstream:
                yield ConfigIssue(where, "the shadow upstream must differ from the route's")
        if route.fallback is not None:
            cache_at: int | None = None
            for step_index, step in enumerate(route.fallback.chain):
                if step.cache is not None:
                    if cache_at is not None:
                        # One cache is filled (the last); a second would answer from
                        # an empty one, or hold what the first should.
                        yield ConfigIssue(
                            f"routes[{index}].fallback.chain[{step_index}].cache",
                            f"a chain has one cache step at most (chain[{cache_at}] is one)",
                        )
                    else:
                        cache_at = step_index
                if step.upstream is None:
                    continue
                where = f"routes[{index}].fallback.chain[{step_index}].upstream.name"
                if step.upstream.name not in config.upstreams:
                    yield ConfigIssue(where, f"no upstream named {step.upstream.name!r}")
                elif step.upstream.name == route.upstream:
                    yield ConfigIssue(where, "a fallback upstream must differ from the route's")
    route_names = {r.name for r in config.routes}
    for index, key in enumerate(config.auth.api_keys):
        for r_index, name in enumerate(key.routes):
            if name not in route_names:
                yield ConfigIssue(
                    f"auth.api_keys[{index}].routes[{r_index}]", f"no route named {name!r}"
                )
    if config.auth.jwt is not None:
        for r_index, name in enumerate(config.auth.jwt.routes):
            if name not in route_names:
                yield ConfigIssue(f"auth.jwt.routes[{r_index}]", f"no route named {name!r}")
    names = [k.name for k in config.auth.api_keys]
    for index, name in enumerate(names):
        if names.index(name) != index:
            yield ConfigIssue(f"auth.api_keys[{index}].name", f"duplicate key name {name!r}")
    for name in config.upstreams:
        if re.match(_NAME_PATTERN, name) is None:
            yield ConfigIssue(f"upstreams.{name}", "names use letters, digits, '_', '.', '-'")
    if (
        config.admin.enabled
        and config.admin.port == config.listen.port != 0
        and (
            config.admin.host == config.listen.host
            or _WILDCARD_HOSTS & {config.admin.host, config.listen.host}
        )
    ):
        yield ConfigIssue("admin.port", "the admin listener needs a port of its own")


def parse_config(text: str, *, source: str, env: Mapping[str, str]) -> Config:
    """Validate config text. Raises ``ConfigError`` listing every problem found."""
    try:
        raw = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(source, [ConfigIssue("", f"{where}invalid YAML: {problem}")]) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(source, [ConfigIssue("", "the top level must be a mapping of keys")])

    issues: list[ConfigIssue] = []
    substituted = _substitute_env(raw, env, (), issues)
    try:
        config = Config.model_validate(substituted)
    except ValidationError as exc:
        # A key whose variable is unset was given "": that it is then not a valid
        # value is the same problem, said once.
        unset = {issue.path for issue in issues}
        found = [issue for issue in _pydantic_issues(exc) if issue.path not in unset]
        raise ConfigError(source, issues + found) from None
    issues += _cross_reference_issues(config)
    if issues:
        raise ConfigError(source, issues)
    return config


def load_config(
    path: str | Path, *, env: Mapping[str, str] | None = None, data: bytes | None = None
) -> LoadedConfig:
    """Read and validate a config file; ``env`` defaults to the process environment.
    ``data``: the file's bytes as read before (relative paths still resolve beside
    ``path``, and a reload reads ``path`` again).

    The files and places the config names are checked by ``sidecar.config.plan.load_plan``.
    """
    path = Path(path)
    try:
        data = path.read_bytes() if data is None else data
    except OSError as exc:
        raise ConfigError(str(path), [ConfigIssue("", f"cannot read: {exc.strerror}")]) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(str(path), [ConfigIssue("", "not valid UTF-8")]) from None
    config = parse_config(text, source=str(path), env=os.environ if env is None else env)
    return LoadedConfig(
        config=config, path=path.resolve(), sha256=hashlib.sha256(data).hexdigest(), data=data
    )


def render_effective(config: Config) -> str:
    """The config with every default filled in and every secret redacted, as YAML."""
    dumped = config.model_dump(mode="json", by_alias=True)
    return yaml.safe_dump(dumped, sort_keys=False, default_flow_style=False)


DEFAULT_CONFIG_PATH = "/etc/sidecar/sidecar.yaml"


def default_config_path() -> str:
    """``run --config`` when not given: ``$SIDECAR_CONFIG``, else the image's path."""
    return os.environ.get("SIDECAR_CONFIG") or DEFAULT_CONFIG_PATH


def multiprocess_directory() -> str | None:
    """Where prometheus-client keeps per-process metric files when workers share a port."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or None


def bundled_config_dir() -> Path:
    """Where ``config/`` lives: inside an installed wheel, or beside the source tree."""
    package = Path(__file__).resolve().parent.parent  # sidecar/
    installed = package / "_bundled_config"
    if installed.is_dir():
        return installed
    return package.parent / "config"
