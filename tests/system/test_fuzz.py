"""Hostile input, generated: raw HTTP against a running sidecar, and malformed configs.

The HTTP fuzz sends each generated request over a fresh loopback socket to a sidecar
process (auth, rate limit and schema on) in front of a fast fake model, and checks:
an answer always comes, never a 500 made by the sidecar, never a stack trace or a
Python repr in a body; afterwards the process is alive and /livez answers.
SIDECAR_FUZZ_EXAMPLES raises the number of cases (default 300 per test).
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sidecar.config.schema import ConfigError, bundled_config_dir, parse_config
from sidecar.pipeline.auth import hash_key

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = int(os.environ.get("SIDECAR_FUZZ_EXAMPLES", "300"))
KEY = "fuzz-key-0123456789"
# A stack trace, an object repr, or a Python bytes repr (b'...') in a body.
LEAKS = re.compile(rb"Traceback|File \"|object at 0x|(?<![0-9A-Za-z])b['\"]")


def _start(argv: list[str], ready: re.Pattern[bytes]) -> tuple[subprocess.Popen[bytes], int]:
    process = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=ROOT)
    assert process.stdout is not None
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line, "process exited during start-up"
        match = ready.search(line)
        if match:
            return process, int(match.group(1))
    process.kill()
    raise AssertionError("did not start")


@pytest.fixture(scope="module")
def sidecar_port(tmp_path_factory: pytest.TempPathFactory) -> Iterator[int]:
    upstream, upstream_port = _start(
        [sys.executable, str(ROOT / "loadtests" / "upstream.py"), "--port", "0"],
        re.compile(rb"listening on (\d+)"),
    )
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": False},
        "server": {"max_body_size": "64KiB", "max_header_size": "4KiB"},
        "upstreams": {"model": {"url": f"http://127.0.0.1:{upstream_port}"}},
        "routes": [
            {
                "name": "infer",
                "path_prefix": "/v2/models/iris/infer",
                "methods": ["POST"],
                "upstream": "model",
                "validate": {
                    "content_types": ["application/json"],
                    "json": True,
                    "schema": str(bundled_config_dir() / "schemas/iris-v2-request.json"),
                },
            },
            {"name": "rest", "path_prefix": "/", "upstream": "model"},
        ],
        "auth": {"enabled": True, "api_keys": [{"name": "fuzz", "digest": hash_key(KEY)}]},
        "rate_limit": {"enabled": True, "per_principal": {"rate": "100000/s", "burst": 100000}},
        "logging": {"access_log": {"enabled": False}},
    }
    path = tmp_path_factory.mktemp("fuzz") / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    sidecar, port = _start(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
        re.compile(rb'"listen":"127\.0\.0\.1:(\d+)"'),
    )
    yield port
    assert sidecar.poll() is None, "the sidecar died during the fuzz run"
    for process in (sidecar, upstream):
        process.terminate()
        process.communicate(timeout=15)  # also closes the pipe


def send_raw(port: int, raw: bytes) -> bytes:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(raw)
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


TOKEN = st.text(
    alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_",
    min_size=1,
    max_size=20,
)
HEADER_VALUE = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=60)
PATH_CHARS = "abcdefghijklmnopqrstuvwxyz0123456789/._-%~?=&:@!$'()*+,;[]\\\"<>^`{|}"
PATHS = st.one_of(
    st.sampled_from(
        [
            "/v2/models/iris/infer",
            "/v2/models/iris",
            "/livez",
            "/readyz",
            "/health",
            "/metrics",
            "/v2/models/iris/infer/../../livez",
            "/%2e%2e/metrics",
            "//evil.example/x",
            "*",
            "http://evil.example/",
        ]
    ),
    st.text(alphabet=PATH_CHARS, max_size=80).map(lambda p: "/" + p),
)
METHODS = st.one_of(
    st.sampled_from(["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS", "CONNECT"]),
    st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ()<>@,;:", min_size=1, max_size=10),
)
JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=10), children, max_size=5)
    ),
    max_leaves=30,
)
GOOD = orjson.dumps(
    {"inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]}
)
BODIES = st.one_of(
    st.binary(max_size=3000),
    JSON_VALUES.map(lambda value: json.dumps(value).encode()),
    st.just(GOOD),
    st.sampled_from([b"NaN", b'{"a":Infinity}', b"[" * 200, b"\xff\xfe\x00", b'{"inputs":[{}]}']),
)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    method=METHODS,
    path=PATHS,
    headers=st.dictionaries(TOKEN, HEADER_VALUE, max_size=6),
    authorised=st.booleans(),
    json_type=st.booleans(),
    body=BODIES,
)
def test_hostile_http_never_breaks_the_sidecar(
    sidecar_port: int,
    method: str,
    path: str,
    headers: dict[str, str],
    authorised: bool,
    json_type: bool,
    body: bytes,
) -> None:
    lines = [f"{method} {path} HTTP/1.1", "Host: 127.0.0.1"]
    lines += [f"{name}: {value}" for name, value in headers.items()]
    if authorised:
        lines.append(f"Authorization: Bearer {KEY}")
    if json_type:
        lines.append("Content-Type: application/json")
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    raw = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body
    answer = send_raw(sidecar_port, raw)
    assert answer.startswith(b"HTTP/1."), answer[:200]
    head, _, payload = answer.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    assert status != 500, answer[:500]
    from_model = b"upstream;dur=" in head  # Server-Timing names the model's time
    if status >= 400 and payload and not from_model:
        # Every refusal of the sidecar's own is the JSON error body (a model's own
        # error answers pass through untouched).
        error = orjson.loads(payload)["error"]
        assert set(error) >= {"type", "message", "request_id"}
    assert not LEAKS.search(payload), payload[:500]


def test_the_sidecar_is_alive_after_the_fuzz(sidecar_port: int) -> None:
    answer = send_raw(sidecar_port, b"GET /livez HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 200 ")


# -- the config loader ----------------------------------------------------------------

CONFIG_WORDS = [
    "listen",
    "admin",
    "server",
    "upstreams",
    "routes",
    "url",
    "name",
    "path_prefix",
    "methods",
    "upstream",
    "timeout",
    "per_try_timeout",
    "retry",
    "attempts",
    "fallback",
    "chain",
    "rules",
    "when",
    "field",
    "gt",
    "all",
    "any",
    "not",
    "static",
    "cache",
    "drift",
    "baseline",
    "auth",
    "api_keys",
    "digest",
    "jwt",
    "rate_limit",
    "global",
    "rate",
    "burst",
    "validate",
    "schema",
    "logging",
    "port",
    "host",
    "enabled",
    "max_body_size",
    "triggers",
]
SCALARS = (
    st.none()
    | st.booleans()
    | st.integers(-10, 100_000)
    | st.floats(allow_nan=True)
    | st.text(max_size=15)
    | st.sampled_from(["10s", "1MiB", "100/s", "${X}", "$$", "http://h:1"])
)
TREES = st.recursive(
    SCALARS,
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.sampled_from(CONFIG_WORDS) | st.text(max_size=8), children, max_size=6)
    ),
    max_leaves=40,
)


def _parse_or_config_error(text: str) -> None:
    """Either a config comes out, or a ConfigError whose every issue has a message."""
    issues = []
    try:
        parse_config(text, source="fuzz.yaml", env={"X": "1"})
    except ConfigError as exc:
        issues = exc.issues
        assert issues
    assert all(isinstance(issue.message, str) and issue.message for issue in issues)


def test_a_mapping_or_list_as_a_key_is_a_config_error() -> None:
    """YAML's complex keys (``? {a: 1}``) made a dict key: TypeError, unhashable."""
    for text in ("? {a: 1}\n: 2\n", "server:\n  ? [1, 2]\n  : 3\n"):
        with pytest.raises(ConfigError) as refused:
            parse_config(text, source="fuzz.yaml", env={})
        [issue] = refused.value.issues
        assert "a key must be a plain value" in issue.message


@settings(max_examples=EXAMPLES, deadline=None)
@given(st.text(max_size=400))
def test_any_text_is_a_config_or_a_config_error(text: str) -> None:
    _parse_or_config_error(text)


@settings(max_examples=EXAMPLES, deadline=None)
@given(TREES)
def test_any_yaml_tree_is_a_config_or_a_config_error(tree: Any) -> None:
    _parse_or_config_error(yaml.safe_dump(tree, allow_unicode=True))


@settings(max_examples=max(50, EXAMPLES // 3), deadline=None)
@given(st.integers(0, 200), st.text(max_size=30))
def test_a_damaged_real_config_gives_config_errors(cut: int, junk: str) -> None:
    text = (bundled_config_dir() / "demo.yaml").read_text()
    position = cut * len(text) // 200
    _parse_or_config_error(text[:position] + junk + text[position:])
