"""Differential: generated requests sent straight to an echo upstream and through the
sidecar must look the same to the upstream (method, target, body, end-to-end
headers) and to the client (status, body, end-to-end headers). Bodies come both with
a Content-Length and chunked. The safety net for replacing the data plane."""

from __future__ import annotations

import base64
import re
import sys
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.system.test_fuzz import _start, send_raw

# Headers a proxy sets, replaces or drops by design (RFC 9110 hop-by-hop, framing,
# the sidecar's identity and forwarding headers), on the way up and on the way back.
UPSTREAM_NOT_COMPARED = {
    "host",
    "content-length",
    "transfer-encoding",
    "connection",
    "x-request-id",
    "traceparent",
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-sidecar-timeout-ms",
}
CLIENT_NOT_COMPARED = {
    "date",
    "server",
    "content-length",
    "transfer-encoding",
    "connection",
    "keep-alive",
    "x-request-id",
    "server-timing",
}


@pytest.fixture(scope="module")
def ports(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[int, int]]:
    upstream, upstream_port = _start(
        [sys.executable, str(Path(__file__).parents[1] / "echo_server.py")],
        re.compile(rb"listening on (\d+)"),
    )
    config = {
        "listen": {"host": "127.0.0.1", "port": 0},
        "admin": {"enabled": False},
        "upstreams": {
            "model": {
                "url": f"http://127.0.0.1:{upstream_port}",
                "breaker": {"enabled": False},
                "health": {"path": "/"},
            }
        },
        "routes": [{"name": "all", "path_prefix": "/", "upstream": "model"}],
        "logging": {"access_log": {"enabled": False}},
    }
    path = tmp_path_factory.mktemp("differential") / "sidecar.yaml"
    path.write_text(yaml.safe_dump(config))
    sidecar, port = _start(
        [sys.executable, "-m", "sidecar", "run", "--config", str(path)],
        re.compile(rb'"listen":"127\.0\.0\.1:(\d+)"'),
    )
    yield upstream_port, port
    for process in (sidecar, upstream):
        process.terminate()
        process.communicate(timeout=15)


def parse(raw: bytes) -> tuple[int, list[tuple[str, str]], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = [tuple(line.split(":", 1)) for line in lines[1:]]
    fields = [(name.strip().lower(), value.strip()) for name, value in headers]
    if ("transfer-encoding", "chunked") in fields:
        body = _unchunk(body)
    return status, fields, body


def _unchunk(data: bytes) -> bytes:
    out = b""
    while True:
        size_line, _, data = data.partition(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            return out
        out, data = out + data[:size], data[size + 2 :]


TOKEN = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-", min_size=1, max_size=12)
SEGMENT = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789-_~", min_size=1, max_size=10)
# The sidecar answers these paths itself (no admin listener here): never forwarded.
OWN_PATHS = {"/livez", "/readyz", "/health", "/metrics"}
TARGETS = st.builds(
    lambda segments, query: "/" + "/".join(segments) + (f"?{query}" if query else ""),
    st.lists(SEGMENT, max_size=4),
    st.one_of(
        st.none(),
        st.from_regex(r"[a-z0-9]{1,8}=[a-z0-9%]{0,12}(&[a-z]{1,5}=[0-9]{1,3})?", fullmatch=True),
    ),
).filter(lambda target: target.split("?", 1)[0] not in OWN_PATHS)
VALUE = st.text(
    alphabet=st.characters(min_codepoint=0x21, max_codepoint=0x7E), min_size=1, max_size=30
)
HEADERS = st.lists(
    st.tuples(TOKEN.map(lambda t: "x-" + t), VALUE), max_size=6, unique_by=lambda h: h[0]
)


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    method=st.sampled_from(["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]),
    target=TARGETS,
    headers=HEADERS,
    body=st.binary(max_size=2048),
    chunked=st.booleans(),
    status=st.sampled_from([200, 201, 202, 400, 404, 409, 422, 500]),
)
def test_the_sidecar_is_transparent_to_upstream_and_client(
    ports: tuple[int, int],
    method: str,
    target: str,
    headers: list[tuple[str, str]],
    body: bytes,
    chunked: bool,
    status: int,
) -> None:
    upstream_port, sidecar_port = ports
    fields = [*headers, ("x-echo-status", str(status)), ("x-echo-reply", "r-" + target[:20])]
    head = f"{method} {target} HTTP/1.1\r\nHost: model\r\nConnection: close\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in fields)
    if chunked:
        framed = b"".join(
            b"%x\r\n%s\r\n" % (len(part), part) for part in (body[:100], body[100:]) if part
        )
        raw = (head + "Transfer-Encoding: chunked\r\n\r\n").encode() + framed + b"0\r\n\r\n"
    else:
        raw = (head + f"Content-Length: {len(body)}\r\n\r\n").encode() + body
    answers = [parse(send_raw(port, raw)) for port in (upstream_port, sidecar_port)]
    (
        (direct_status, direct_headers, direct_body),
        (proxied_status, proxied_headers, proxied_body),
    ) = answers
    assert proxied_status == direct_status == status

    def end_to_end(fields: list[tuple[str, str]]) -> list[tuple[str, str]]:
        return sorted(f for f in fields if f[0] not in CLIENT_NOT_COMPARED)

    assert end_to_end(proxied_headers) == end_to_end(direct_headers)
    seen = [orjson.loads(b) for b in (direct_body, proxied_body)]
    for view in seen:
        view["headers"] = sorted(
            (k.lower(), v) for k, v in view["headers"] if k.lower() not in UPSTREAM_NOT_COMPARED
        )
    assert seen[1] == seen[0]
    assert base64.b64decode(seen[1]["body"]) == body
    assert seen[1]["target"] == target
