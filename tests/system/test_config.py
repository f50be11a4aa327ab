"""Config loading: every class of error names its key path; units; env; redaction."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from sidecar.config.plan import load_plan
from sidecar.config.schema import (
    ConfigError,
    bundled_config_dir,
    format_byte_rate,
    format_duration,
    format_size,
    load_config,
    parse_byte_rate,
    parse_config,
    parse_duration,
    parse_size,
    render_effective,
)
from tests.conftest import run_cli

MINIMAL = """
upstreams:
  model:
    url: http://127.0.0.1:8081
routes:
  - name: all
    upstream: model
"""


def issues_of(text: str, env: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as caught:
        parse_config(text, source="test.yaml", env=env or {})
    return [str(issue) for issue in caught.value.issues]


def test_minimal_config_fills_defaults() -> None:
    config = parse_config(MINIMAL, source="t", env={})
    assert config.listen.port == 8080
    assert config.admin.host == "127.0.0.1"
    assert config.server.max_body_size == 10 * 1024 * 1024
    assert config.routes[0].path_prefix == "/"
    assert config.routes[0].timeout == 30.0


EXAMPLE_ENV = {
    "MODEL_TOKEN": "t",
    "JWT_SECRET": "s" * 40,
    "RANKING_SERVICE_KEY_DIGEST": "sha256:" + "ab" * 32,
}


def test_bundled_configs_are_valid(tmp_path: Path) -> None:
    env = {**EXAMPLE_ENV, "SIDECAR_LOG_DIR": str(tmp_path), "SIDECAR_DEMO_LOG_DIR": str(tmp_path)}
    for name in ("demo.yaml", "sidecar.example.yaml", "minimal.yaml"):
        plan = load_plan(bundled_config_dir() / name, env=env)
        assert plan.config.routes


def test_the_example_refuses_to_start_without_its_secrets() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(bundled_config_dir() / "sidecar.example.yaml", env={})
    assert {issue.path for issue in caught.value.issues} == {
        "upstreams.model.headers.Authorization",
        "auth.api_keys[0].digest",
        "auth.jwt.secret",
    }


def test_config_objects_are_frozen() -> None:
    config = parse_config(MINIMAL, source="t", env={})
    with pytest.raises(ValueError, match="frozen"):
        config.listen.port = 1  # type: ignore[misc]


def test_unknown_keys_are_named_with_their_path() -> None:
    text = MINIMAL + "listne:\n  port: 1\n"
    text = text.replace("    url: http", "    urll: x\n    url: http")
    issues = issues_of(text)
    assert "listne: unknown key" in issues
    assert "upstreams.model.urll: unknown key" in issues


def test_unknown_key_inside_a_list_item() -> None:
    issues = issues_of(MINIMAL + "    timout: 5s\n")
    assert issues == ["routes[0].timout: unknown key"]


def test_missing_keys_are_named() -> None:
    issues = issues_of("upstreams:\n  model: {}\nroutes:\n  - name: x\n")
    assert "upstreams.model.url: missing required key" in issues
    assert "routes[0].upstream: missing required key" in issues


def test_wrong_types_are_named() -> None:
    text = MINIMAL + "listen:\n  port: eighty\nadmin:\n  enabled: perhaps\n"
    issues = issues_of(text)
    assert any(i.startswith("listen.port: ") for i in issues)
    assert any(i.startswith("admin.enabled: ") for i in issues)


def test_every_error_is_listed_at_once() -> None:
    text = MINIMAL + "bogus: 1\nserver:\n  drain_timeout: 10\n  max_body_size: 1 mile\n"
    issues = issues_of(text)
    assert len(issues) == 3
    assert "bogus: unknown key" in issues


@pytest.mark.parametrize(
    ("value", "seconds"),
    [("250ms", 0.25), ("10s", 10.0), ("1.5s", 1.5), ("5m", 300.0), ("1h", 3600.0), ("50us", 5e-5)],
)
def test_durations_need_and_respect_units(value: str, seconds: float) -> None:
    assert parse_duration(value) == pytest.approx(seconds)


@pytest.mark.parametrize("value", [10, "10", "10 sec", "-1s", True, ""])
def test_durations_without_a_known_unit_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(value)


def test_duration_error_is_reported_at_its_key() -> None:
    issues = issues_of(MINIMAL + "    timeout: 30\n")
    assert len(issues) == 1
    assert issues[0].startswith("routes[0].timeout: a duration needs a unit")


@pytest.mark.parametrize(
    ("value", "size"),
    [("512B", 512), ("1KB", 1000), ("1KiB", 1024), ("10MiB", 10485760), ("2GB", 2 * 10**9)],
)
def test_sizes(value: str, size: int) -> None:
    assert parse_size(value) == size


@pytest.mark.parametrize("value", [1024, "10", "10 mb", "1.5MiB"])
def test_sizes_without_a_known_unit_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match="size"):
        parse_size(value)


@pytest.mark.parametrize(
    ("value", "per_second"),
    [("500B/s", 500), ("1KiB/s", 1024), (" 2 MiB / s", 2 << 20), ("0B/s", 0)],
)
def test_byte_rates(value: str, per_second: int) -> None:
    assert parse_byte_rate(value) == per_second
    assert parse_byte_rate(format_byte_rate(per_second)) == per_second


@pytest.mark.parametrize("value", [500, "500", "500B", "500B/m", "1KiB/h", "/s", "fast/s"])
def test_byte_rates_without_a_size_per_second_are_refused(value: object) -> None:
    with pytest.raises(ValueError, match=r"rate|size"):
        parse_byte_rate(value)


@pytest.mark.parametrize("seconds", [0.25, 10.0, 300.0, 3600.0, 5e-5, 1.5])
def test_durations_print_back_to_the_same_value(seconds: float) -> None:
    assert parse_duration(format_duration(seconds)) == pytest.approx(seconds)


@pytest.mark.parametrize("size", [1, 1000, 1024, 10485760, 3 * 1024**3])
def test_sizes_print_back_to_the_same_value(size: int) -> None:
    assert parse_size(format_size(size)) == size


def test_env_substitution_with_default_and_escape() -> None:
    text = MINIMAL.replace("http://127.0.0.1:8081", "${MODEL_URL}") + (
        "listen:\n  host: ${HOST:-127.0.0.2}\n  port: ${PORT}\n    \n"
    )
    text += "upstreams_note_unused: $${NOT_A_VAR}\n"
    issues = issues_of(text, env={"MODEL_URL": "http://10.0.0.1:9000", "PORT": "9999"})
    # The escaped $$ stays literal and the only error is the made-up key.
    assert issues == ["upstreams_note_unused: unknown key"]

    good = MINIMAL.replace("http://127.0.0.1:8081", "${MODEL_URL}") + (
        "listen:\n  host: ${HOST:-127.0.0.2}\n  port: ${PORT}\n"
    )
    config = parse_config(good, source="t", env={"MODEL_URL": "http://10.0.0.1:9000", "PORT": "9"})
    assert config.upstreams["model"].url == "http://10.0.0.1:9000"
    assert config.listen.host == "127.0.0.2"
    assert config.listen.port == 9


def test_missing_env_var_is_named_with_the_key() -> None:
    text = MINIMAL + "    max_body_size: ${BODY_LIMIT}\n"
    issues = issues_of(text)
    assert "routes[0].max_body_size: environment variable BODY_LIMIT is not set" in issues
    # Said once: that the "" it stood in for is not a size is the same problem.
    assert [issue for issue in issues if issue.startswith("routes[0].max_body_size")] == [
        "routes[0].max_body_size: environment variable BODY_LIMIT is not set"
    ]


def test_secrets_are_redacted_in_the_effective_config() -> None:
    text = MINIMAL.replace(
        "    url: http://127.0.0.1:8081",
        "    url: http://127.0.0.1:8081\n    headers:\n      Authorization: Bearer ${TOKEN}",
    )
    config = parse_config(text, source="t", env={"TOKEN": "s3cr3t-value"})
    assert config.upstreams["model"].headers["Authorization"].get_secret_value() == (
        "Bearer s3cr3t-value"
    )
    rendered = render_effective(config)
    assert "s3cr3t-value" not in rendered
    assert (
        yaml.safe_load(rendered)["upstreams"]["model"]["headers"]["Authorization"] == "**********"
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("a: [1,\n", "invalid YAML"),
        ("- just\n- a list\n", "the top level must be a mapping"),
        ("listen: {port: 1}\nlisten: {port: 2}\n", "duplicate key 'listen'"),
    ],
)
def test_malformed_files(text: str, expected: str) -> None:
    issues = issues_of(text)
    assert len(issues) == 1
    assert expected in issues[0]


def test_cross_references_are_checked() -> None:
    text = MINIMAL + "  - name: all\n    upstream: nowhere\n"
    issues = issues_of(text)
    assert "routes[1].name: duplicate route name 'all'" in issues
    assert any(i.startswith("routes[1].upstream: no upstream named 'nowhere'") for i in issues)


def test_the_bodies_budget_must_hold_the_largest_body_a_route_takes() -> None:
    # The server's limit (10 MiB by default) and a route's own, each against it.
    assert issues_of("server: {max_buffered_bodies: 8MiB}\n" + MINIMAL) == [
        "server.max_buffered_bodies: is smaller than the largest request body limit"
        " (10485760 bytes): such a body could never be read"
    ]
    route = MINIMAL + "    max_body_size: 2MiB\n"
    assert issues_of("server: {max_buffered_bodies: 1MiB, max_body_size: 1MiB}\n" + route) == [
        "server.max_buffered_bodies: is smaller than the largest request body limit"
        " (2097152 bytes): such a body could never be read"
    ]
    parse_config(
        "server: {max_buffered_bodies: 2MiB, max_body_size: 1MiB}\n" + route,
        source="test.yaml",
        env={},
    )


def test_the_heads_budget_must_hold_one_whole_head() -> None:
    assert issues_of("server: {max_buffered_heads: 16KiB}\n" + MINIMAL) == [
        "server.max_buffered_heads: is smaller than the largest request head (32768 bytes):"
        " such a head could never be read"
    ]


def test_a_fallback_chain_with_two_cache_steps_is_refused_at_the_second(
    tmp_path: Path,
) -> None:
    """Two cache steps passed validation, and only the last was ever filled: the
    first answered from an empty cache for good."""
    text = MINIMAL + (
        "    fallback:\n      chain:\n"
        "        - cache: {ttl: 1m}\n"
        "        - static: {body: 0}\n"
        "        - cache: {ttl: 1h}\n"
    )
    assert issues_of(text) == [
        "routes[0].fallback.chain[2].cache: a chain has one cache step at most (chain[0] is one)"
    ]
    path = tmp_path / "two-caches.yaml"
    path.write_text(text)
    result = run_cli("check-config", str(path))
    assert result.returncode == 1
    assert "routes[0].fallback.chain[2].cache: a chain has one cache step at most" in (
        result.stderr
    )


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("ftp://host", "http:// or https://"),
        ("http://host:99999", "bad port"),
        ("http://host/v2", "origin only"),
    ],
)
def test_upstream_urls(url: str, message: str) -> None:
    issues = issues_of(MINIMAL.replace("http://127.0.0.1:8081", url))
    assert len(issues) == 1
    assert issues[0].startswith("upstreams.model.url: ")
    assert message in issues[0]


def test_route_methods_and_prefix() -> None:
    issues = issues_of(MINIMAL + "    methods: [post, FETCH]\n    path_prefix: v2\n")
    assert "routes[0].methods: unknown HTTP method(s): FETCH" in issues
    assert "routes[0].path_prefix: must start with '/'" in issues


def test_unreadable_and_non_utf8_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="config error"):
        load_config(tmp_path / "absent.yaml", env={})
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError) as caught:
        load_config(binary, env={})
    assert caught.value.issues[0].message == "not valid UTF-8"


_cli = run_cli


def test_check_config_prints_the_effective_config_and_exits_0(tmp_path: Path) -> None:
    path = tmp_path / "ok.yaml"
    path.write_text(MINIMAL)
    result = _cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert "configuration is valid" in result.stdout
    effective = yaml.safe_load(result.stdout)
    assert effective["listen"]["port"] == 8080
    assert effective["routes"][0]["timeout"] == "30s"


def test_check_config_lists_every_error_and_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text(MINIMAL + "    upstreem: x\nlisten:\n  prot: 1\n")
    result = _cli("check-config", str(path))
    assert result.returncode == 1
    assert "2 error(s)" in result.stderr
    assert "routes[0].upstreem: unknown key" in result.stderr
    assert "listen.prot: unknown key" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_duration_or_rate_too_large_to_be_a_number_is_refused_at_its_key(
    tmp_path: Path,
) -> None:
    # 400 digits read as a float are infinity: it passed as a duration, then every
    # proxied request failed with 500 (the deadline header), and check-config printed a
    # traceback rendering it back.
    digits = "9" * 400
    assert issues_of(MINIMAL + f"    timeout: {digits}s\n") == [
        f"routes[0].timeout: '{digits}s' is too large a duration"
    ]
    rate = issues_of(MINIMAL + f"rate_limit:\n  per_principal: {{rate: {digits}/s, burst: 1}}\n")
    assert rate == [f"rate_limit.per_principal.rate: '{digits}/s' is too large a rate"]
    path = tmp_path / "huge.yaml"
    path.write_text(MINIMAL + f"server:\n  keepalive_timeout: {digits}h\n")
    result = _cli("check-config", str(path))
    assert result.returncode == 1, result.stdout
    assert "Traceback" not in result.stderr
    assert "server.keepalive_timeout: " in result.stderr


@pytest.mark.parametrize(
    ("section", "key"),
    [("server", "max_header_size"), ("server", "max_head_size"), ("logging", "queue_bytes")],
)
def test_a_zero_size_that_would_refuse_everything_is_refused(section: str, key: str) -> None:
    # Accepted before: a zero header size answered every request (and every scrape)
    # 431, and a zero log queue dropped every log line, the start-up line among them.
    assert issues_of(MINIMAL + f"{section}:\n  {key}: 0B\n") == [
        f"{section}.{key}: must be more than zero"
    ]


def test_a_credentials_methods_are_checked_like_a_routes() -> None:
    # A route's unknown method was an error, a key's or a token's was not: a typo
    # (PSOT) left a principal silently refused on the method it was meant for.
    digest = "sha256:" + "ab" * 32
    text = MINIMAL + (
        "auth:\n  enabled: true\n"
        f"  api_keys:\n    - {{name: k, digest: '{digest}', methods: [PSOT]}}\n"
        "  jwt: {algorithms: [HS256], secret: s, methods: [get, FETCH]}\n"
    )
    assert issues_of(text) == [
        "auth.api_keys[0].methods: unknown HTTP method(s): PSOT",
        "auth.jwt.methods: unknown HTTP method(s): FETCH",
    ]


def test_header_fields_that_would_break_the_wire_form_are_refused_at_their_key() -> None:
    # Accepted before and written as they were: a token read from the environment
    # with its line ending broke every request to the model (its 400 passed on), one
    # with "\r\nX-Other: 1" added a header to every request, and a fallback's headers
    # could split the answer to the client.
    text = (
        MINIMAL.replace(
            "    url: http://127.0.0.1:8081\n",
            "    url: http://127.0.0.1:8081\n"
            "    headers: {Authorization: 'Bearer ${TOKEN}', 'Bad Name': x}\n"
            "    request_id: {header: 'X-Id:'}\n",
        )
        + "    fallback:\n      chain:\n"
        + '        - static: {body: 1, headers: {X-Why: "a\\r\\nSet-Cookie: s=1"}}\n'
    )
    issues = issues_of(text, env={"TOKEN": "s3cret\n"})
    assert sorted(issues) == sorted(
        [
            "upstreams.model.request_id.header: not a header name",
            "upstreams.model.headers.Bad Name: not a header name",
            "upstreams.model.headers.Authorization: a header value may not hold CR, LF or NUL "
            "(a secret read with its line ending?)",
            "routes[0].fallback.chain[0].static.headers.X-Why: a header value may not hold CR, "
            "LF or NUL (a secret read with its line ending?)",
        ]
    )
    assert "s3cret" not in " ".join(issues)
    realm = issues_of(MINIMAL + 'auth: {realm: "a\\r\\nSet-Cookie: s=1"}\n')
    assert realm == [
        "auth.realm: a header value may not hold CR, LF or NUL (a secret read with its line "
        "ending?)"
    ]


def test_a_realm_that_would_break_its_quoted_string_is_refused() -> None:
    """The realm is written as realm="..." in WWW-Authenticate: a quote ended the
    quoted string early (and what followed became parameters of its own), a backslash
    escaped the closing quote, a control byte broke the header."""
    message = (
        'auth.realm: may hold only printable ASCII characters and spaces, not " or \\ '
        "(it is quoted in WWW-Authenticate)"
    )
    for realm in ('a\\", error=\\"x', "ends in \\\\", "bell\\a", "tab\\x7f"):
        assert issues_of(MINIMAL + f'auth: {{realm: "{realm}"}}\n') == [message], realm
    config = parse_config(MINIMAL + 'auth: {realm: "Model API (v2) \\t #1"}\n', source="t", env={})
    assert config.auth.realm == "Model API (v2) \t #1"


def test_run_with_a_broken_config_exits_2_without_serving(tmp_path: Path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("routes: []\n")
    result = _cli("run", "--config", str(path))
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, result.stderr  # one line per problem, each naming its key
    assert any(line.endswith("upstreams: missing required key") for line in lines)
    assert any(line.endswith("routes: needs at least one entry") for line in lines)
    assert all(line.startswith("sidecar run: cannot start: ") for line in lines)


def _model_keys(model: type[Any]) -> set[str]:
    keys: set[str] = set()
    for name, info in model.model_fields.items():
        keys.add(info.alias or name)
        for arg in _model_types(info.annotation):
            keys |= _model_keys(arg)
    return keys


def _model_types(annotation: Any) -> list[type[Any]]:
    from typing import get_args

    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    return [t for arg in get_args(annotation) for t in _model_types(arg)]


def test_the_example_config_mentions_every_key() -> None:
    from sidecar.config.schema import Config

    text = (bundled_config_dir() / "sidecar.example.yaml").read_text()
    missing = sorted(k for k in _model_keys(Config) if not re.search(rf"\b{k}:", text))
    assert missing == []
