"""Edge security over real sockets: keys, JWT, rate limits, input limits, schemas,
smuggling and path tricks, and a secret that must never surface anywhere."""

from __future__ import annotations

import re
import time
from pathlib import Path
from typing import Any

import jwt
import orjson
import pytest
import yaml
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from hypothesis import given, settings
from hypothesis import strategies as st

from sidecar.config.schema import bundled_config_dir
from sidecar.pipeline.auth import hash_key
from sidecar.pipeline.validation import nesting_exceeds
from tests.conftest import (
    LOOPBACK,
    FakeClock,
    FakeModel,
    SidecarHandle,
    StartSidecar,
    base_config,
    raw_request,
    start_sidecar_process,
)
from tests.integration.test_endpoints import metric_value

ALICE_KEY = "alice-key-7f3a9c"
BOB_KEY = "bob-key-19d2e4"
OPERATOR_KEY = "operator-key-55c1ab"
WRONG_SECRET = "wrong-secret-of-enough-length-0123456789abcdef0123456789abcdef012"
HS_SECRET = "hs256-shared-secret-for-tests-only-0123456789abcdef-0123456789ab"


def secured_config(upstream: str, **extra: Any) -> dict[str, Any]:
    config = base_config(upstream)
    config["routes"] = [
        {
            "name": "infer",
            "path_prefix": "/v2/models/iris/infer",
            "methods": ["POST"],
            "upstream": "model",
        },
        {"name": "meta", "path_prefix": "/v2", "methods": ["GET"], "upstream": "model"},
    ]
    config["auth"] = {
        "enabled": True,
        "api_keys": [
            {"name": "alice", "digest": hash_key(ALICE_KEY)},
            {"name": "bob", "digest": hash_key(BOB_KEY), "routes": ["meta"], "methods": ["GET"]},
            {
                "name": "operator",
                "digest": hash_key(OPERATOR_KEY),
                "routes": ["meta"],
                "scopes": ["admin"],
            },
        ],
    }
    config.update(extra)
    return config


async def post(
    sidecar: SidecarHandle,
    path: str = "/v2/models/iris/infer",
    *,
    headers: dict[str, str] | None = None,
    data: bytes = b"{}",
) -> tuple[int, Any, Any]:
    async with sidecar.session.post(sidecar.url + path, data=data, headers=headers or {}) as r:
        body = await r.read()
        try:
            parsed = orjson.loads(body)
        except orjson.JSONDecodeError:
            parsed = body
        return r.status, parsed, r.headers


# -- API keys -------------------------------------------------------------------------


async def test_api_keys_missing_wrong_right_and_not_forwarded(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(secured_config(fake_model.url))
    status, body, headers = await post(sidecar)
    assert status == 401
    assert body["error"]["type"] == "unauthorized"
    assert headers["WWW-Authenticate"] == 'Bearer realm="sidecar"'

    status, body, _ = await post(sidecar, headers={"Authorization": "Bearer not-a-key"})
    assert status == 401
    assert "not-a-key" not in orjson.dumps(body).decode()

    status, _, _ = await post(
        sidecar, headers={"Authorization": f"Bearer {ALICE_KEY}", "Cookie": "session=model-cookie"}
    )
    assert status == 200
    status, _, _ = await post(sidecar, headers={"X-API-Key": ALICE_KEY})
    assert status == 200
    assert fake_model.hits, "the allowed requests reached the model"
    for hit in fake_model.hits:
        assert "authorization" not in hit.headers
        assert "x-api-key" not in hit.headers
    assert fake_model.hits[0].headers["cookie"] == ["session=model-cookie"]  # the model's own


async def test_keys_are_limited_to_their_routes_and_methods(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(secured_config(fake_model.url))
    bob = {"Authorization": f"Bearer {BOB_KEY}"}
    status, body, _ = await post(sidecar, headers=bob)
    assert status == 403
    assert body["error"]["type"] == "forbidden"
    async with sidecar.session.get(sidecar.url + "/v2/models/iris", headers=bob) as resp:
        assert resp.status == 200
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert metric_value(text, "sidecar_auth_failures_total", reason="forbidden") == 1


async def test_livez_and_readyz_stay_open_and_admin_detail_is_protected(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(secured_config(fake_model.url, admin={"enabled": False}))
    for path in ("/livez", "/readyz"):
        async with sidecar.session.get(sidecar.url + path) as resp:
            assert resp.status == 200, path
    for path in ("/health", "/metrics"):
        async with sidecar.session.get(sidecar.url + path) as resp:
            assert resp.status == 401, path
        # Authenticated is not enough: the operator's endpoints need the admin scope.
        async with sidecar.session.get(sidecar.url + path, headers={"X-API-Key": BOB_KEY}) as resp:
            assert resp.status == 403, path
        headers = {"X-API-Key": OPERATOR_KEY}
        async with sidecar.session.get(sidecar.url + path, headers=headers) as resp:
            assert resp.status == 200, path


def test_hash_key_command_prints_the_digest() -> None:
    import subprocess
    import sys

    result = subprocess.run(
        [sys.executable, "-m", "sidecar", "hash-key", ALICE_KEY],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.strip() == hash_key(ALICE_KEY)
    generated = subprocess.run(
        [sys.executable, "-m", "sidecar", "hash-key", "--generate"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    key_line, digest_line = generated.stdout.strip().splitlines()
    assert hash_key(key_line.split()[1]) == digest_line.split()[1]


# -- JWT ------------------------------------------------------------------------------


def jwt_config(upstream: str, public_pem: str) -> dict[str, Any]:
    config = secured_config(upstream)
    config["auth"]["jwt"] = {
        "algorithms": ["HS256", "RS256"],
        "secret": HS_SECRET,
        "public_key": public_pem,
        "issuer": "https://issuer.test",
        "audience": "sidecar",
        "principal_claim": "sub",
        "leeway": "1s",
    }
    return config


@pytest.fixture(scope="module")
def rsa_keys() -> tuple[bytes, str]:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = private.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_pem = (
        private.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )
    return private_pem, public_pem


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values = {
        "sub": "svc-ranker",
        "iss": "https://issuer.test",
        "aud": "sidecar",
        "iat": now,
        "nbf": now - 5,
        "exp": now + 300,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


async def test_jwt_hs256_and_rs256_and_every_rejection(
    fake_model: FakeModel, start_sidecar: StartSidecar, rsa_keys: tuple[bytes, str]
) -> None:
    private_pem, public_pem = rsa_keys
    sidecar = await start_sidecar(jwt_config(fake_model.url, public_pem))

    def bearer(token: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {token}"}

    good_hs = jwt.encode(claims(), HS_SECRET, algorithm="HS256")
    good_rs = jwt.encode(claims(sub="svc-batch"), private_pem, algorithm="RS256")
    for token in (good_hs, good_rs):
        status, _, _ = await post(sidecar, headers=bearer(token))
        assert status == 200

    now = int(time.time())
    cases = {
        "token expired": jwt.encode(claims(exp=now - 60), HS_SECRET, algorithm="HS256"),
        "token not yet valid": jwt.encode(claims(nbf=now + 600), HS_SECRET, algorithm="HS256"),
        "token issuer not accepted": jwt.encode(
            claims(iss="https://evil"), HS_SECRET, algorithm="HS256"
        ),
        "token audience not accepted": jwt.encode(
            claims(aud="other"), HS_SECRET, algorithm="HS256"
        ),
        "token signature invalid": jwt.encode(claims(), WRONG_SECRET, algorithm="HS256"),
        "token lacks a required claim": jwt.encode(claims(exp=None), HS_SECRET, algorithm="HS256"),
        "token algorithm not accepted": jwt.encode(claims(), HS_SECRET, algorithm="HS512"),
        "token malformed or not verifiable": "abc.def.ghi",
    }
    for reason, token in cases.items():
        status, body, headers = await post(sidecar, headers=bearer(token))
        assert status == 401, reason
        assert body["error"]["message"] == reason
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        assert HS_SECRET not in orjson.dumps(body).decode()
    unsigned = jwt.encode(claims(), None, algorithm="none")  # type: ignore[arg-type]
    status, _, _ = await post(sidecar, headers=bearer(unsigned))
    assert status == 401


# -- rate limits ----------------------------------------------------------------------


async def test_token_bucket_per_principal_with_headers(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    clock = FakeClock()
    config = secured_config(
        fake_model.url, rate_limit={"enabled": True, "per_principal": {"rate": "1/s", "burst": 3}}
    )
    sidecar = await start_sidecar(config, clock=clock)
    alice, bob = {"X-API-Key": ALICE_KEY}, {"X-API-Key": BOB_KEY}
    remaining = []
    for _ in range(3):
        status, _, headers = await post(sidecar, headers=alice)
        assert status == 200
        assert headers["RateLimit-Limit"] == "3"
        remaining.append(headers["RateLimit-Remaining"])
    assert remaining == ["2", "1", "0"]
    status, body, headers = await post(sidecar, headers=alice)
    assert status == 429
    assert body["error"]["type"] == "rate_limited"
    assert headers["Retry-After"] == "1"
    assert headers["RateLimit-Remaining"] == "0"
    assert headers["RateLimit-Reset"] == "3"
    async with sidecar.session.get(sidecar.url + "/v2/models/iris", headers=bob) as resp:
        assert resp.status == 200  # bob has his own bucket
    clock.advance(1.0)
    status, _, _ = await post(sidecar, headers=alice)
    assert status == 200
    assert len(fake_model.hits_for("/v2/models/iris/infer")) == 4


async def test_global_limit_and_report_only(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    clock = FakeClock()
    config = secured_config(
        fake_model.url, rate_limit={"enabled": True, "global": {"rate": "1/m", "burst": 2}}
    )
    sidecar = await start_sidecar(config, clock=clock)
    statuses = []
    for key in (ALICE_KEY, ALICE_KEY, ALICE_KEY):
        status, _, _ = await post(sidecar, headers={"X-API-Key": key})
        statuses.append(status)
    assert statuses == [200, 200, 429]

    config = secured_config(
        fake_model.url,
        rate_limit={
            "enabled": True,
            "report_only": True,
            "per_principal": {"rate": "1/h", "burst": 1},
        },
    )
    watcher = await start_sidecar(config, clock=clock)
    for _ in range(4):
        status, _, headers = await post(watcher, headers={"X-API-Key": ALICE_KEY})
        assert status == 200
        assert "RateLimit-Limit" not in headers
    async with watcher.session.get(watcher.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert (
        metric_value(
            text,
            "sidecar_ratelimited_total",
            scope="principal",
            principal="alice",
            mode="report_only",
        )
        == 3
    )


# -- input limits and schema ----------------------------------------------------------


def validated_config(upstream: str) -> dict[str, Any]:
    config = base_config(upstream, server={"max_body_size": "64KiB", "max_header_size": "2KiB"})
    schema = bundled_config_dir() / "schemas" / "iris-v2-request.json"
    config["routes"] = [
        {
            "name": "infer",
            "path_prefix": "/infer",
            "upstream": "model",
            "validate": {
                "content_types": ["application/json"],
                "json": True,
                "max_depth": 8,
                "schema": str(schema),
            },
        },
        {"name": "rest", "path_prefix": "/", "upstream": "model"},
    ]
    return config


GOOD = {
    "inputs": [{"name": "x", "shape": [1, 4], "datatype": "FP32", "data": [5.1, 3.5, 1.4, 0.2]}]
}


async def test_content_type_json_depth_nan_utf8(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(validated_config(fake_model.url))
    json_header = {"Content-Type": "application/json"}
    status, _, _ = await post(sidecar, "/infer", data=orjson.dumps(GOOD), headers=json_header)
    assert status == 200
    status, body, _ = await post(
        sidecar, "/infer", data=orjson.dumps(GOOD), headers={"Content-Type": "text/plain"}
    )
    assert (status, body["error"]["type"]) == (415, "unsupported_media_type")
    cases = {
        b"[" * 9 + b"]" * 9: "deeper than 8",
        b"[" * 3000 + b"]" * 3000: "deeper than 8",  # past orjson's own limit
        b'{"a": NaN}': "not valid JSON",
        b'{"a": Infinity}': "not valid JSON",
        b'{"a": 1e999}': "not valid JSON",
        b'{"a": "\xff\xfe"}': "not valid JSON",
        b'{"a": ': "not valid JSON",
    }
    for data, message in cases.items():
        status, body, _ = await post(sidecar, "/infer", data=data, headers=json_header)
        assert status == 400, data
        assert body["error"]["type"] == "invalid_json"
        assert message in body["error"]["message"]
    # Brackets inside strings do not count as nesting.
    deep_text = orjson.dumps({"id": "[[[[[[[[[[[[[[[["} | GOOD)
    status, _, _ = await post(sidecar, "/infer", data=deep_text, headers=json_header)
    assert status == 200
    assert len(fake_model.hits_for("/infer")) == 2


async def test_a_validated_route_takes_bodiless_reads_unchecked(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    # A route that validates its bodies still serves its metadata and readiness GETs.
    sidecar = await start_sidecar(validated_config(fake_model.url))
    for method in ("GET", "HEAD", "DELETE", "OPTIONS"):
        async with sidecar.session.request(method, sidecar.url + "/infer/ready") as r:
            assert r.status == 200, method
    assert len(fake_model.hits_for("/infer/ready")) == 4
    # A body is checked whatever the method; a POST without one is not JSON.
    for method, data in (("GET", b"not json"), ("POST", b""), ("PUT", b"")):
        async with sidecar.session.request(
            method, sidecar.url + "/infer", data=data, headers={"Content-Type": "application/json"}
        ) as r:
            body = orjson.loads(await r.read())
            assert (r.status, body["error"]["type"]) == (400, "invalid_json"), method
    assert fake_model.hits_for("/infer") == []


def _depth(document: Any) -> int:
    if isinstance(document, list):
        return 1 + max((_depth(item) for item in document), default=0)
    if isinstance(document, dict):
        return 1 + max((_depth(item) for item in document.values()), default=0)
    return 0


_JSON_TREES = st.recursive(
    st.none() | st.integers(-1000, 1000) | st.text(alphabet='[]{}"\\ab'),
    lambda inner: (
        st.lists(inner, max_size=3)
        | st.dictionaries(st.text(alphabet='[]{}"\\k', max_size=4), inner, max_size=3)
    ),
    max_leaves=30,
)


@settings(max_examples=300, deadline=None)
@given(document=_JSON_TREES, limit=st.integers(min_value=1, max_value=12))
def test_nesting_check_agrees_with_walking_the_document(document: Any, limit: int) -> None:
    # Brackets inside strings and keys (escaped quotes too) must not count.
    assert nesting_exceeds(orjson.dumps(document), limit) == (_depth(document) > limit)


async def test_schema_violation_lists_every_failing_path_and_counts_fields(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(validated_config(fake_model.url))
    bad = {
        "inputs": [
            {"name": "x", "shape": [1, 4], "datatype": "INT8", "data": [5.1, "three", 1.4, 0.2]}
        ],
        "extra": 1,
    }
    status, body, _ = await post(
        sidecar, "/infer", data=orjson.dumps(bad), headers={"Content-Type": "application/json"}
    )
    assert status == 422
    error = body["error"]
    assert error["type"] == "schema_violation"
    paths = [d["path"] for d in error["details"]]
    assert paths == ["$", "inputs[0].data[1]", "inputs[0].datatype"]
    assert fake_model.hits_for("/infer") == []
    async with sidecar.session.get(sidecar.admin_url + "/metrics") as resp:
        text = await resp.text()
    for field in ("$", "inputs[*].data[*]", "inputs[*].datatype"):
        assert (
            metric_value(text, "sidecar_schema_violations_total", route="infer", field=field) == 1
        )


def test_bad_schema_file_is_a_config_error(tmp_path: Path) -> None:
    from sidecar.config.plan import load_plan
    from sidecar.config.schema import ConfigError

    (tmp_path / "s.json").write_text('{"type": "objekt"}')
    config = base_config("http://127.0.0.1:1")
    config["routes"][0]["validate"] = {"schema": "s.json"}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    with pytest.raises(ConfigError) as caught:
        load_plan(path, env={})
    assert caught.value.issues[0].path == "routes[0].validate.schema"
    assert "not a valid JSON Schema" in caught.value.issues[0].message


# -- smuggling and path tricks (raw sockets) ------------------------------------------

CLOSE = b"Connection: close\r\n\r\n"
SMUGGLING = {
    "content-length and transfer-encoding": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 4\r\n"
        b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
    ),
    "duplicate content-length": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 2\r\n\r\nab"
    ),
    "conflicting content-length": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nContent-Length: 2\r\nContent-Length: 3\r\n\r\nabc"
    ),
    "obsolete line folding": b"GET /x HTTP/1.1\r\nHost: a\r\nX-A: b\r\n c\r\n" + CLOSE,
    "transfer coding other than chunked": (
        b"POST /x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n"
        b"Connection: close\r\n\r\n0\r\n\r\n"
    ),
    "absolute-form naming another host": (
        b"GET http://internal.example/admin HTTP/1.1\r\nHost: a\r\n" + CLOSE
    ),
    "dot segments": b"GET /v2/../livez HTTP/1.1\r\nHost: a\r\n" + CLOSE,
    "encoded dot segments": b"GET /v2/%2e%2e/%2E%2E/metrics HTTP/1.1\r\nHost: a\r\n" + CLOSE,
    "encoded slash": b"GET /v2%2f..%2fhealth HTTP/1.1\r\nHost: a\r\n" + CLOSE,
    "double encoding": b"GET /v2/%252e%252e/health HTTP/1.1\r\nHost: a\r\n" + CLOSE,
    "header too large": b"GET /x HTTP/1.1\r\nHost: a\r\nX-Big: " + b"a" * 5000 + b"\r\n" + CLOSE,
    "CONNECT tunnel": b"CONNECT /infer HTTP/1.1\r\nHost: a\r\n" + CLOSE,
    "TRACE reflection": b"TRACE /infer HTTP/1.1\r\nHost: a\r\n" + CLOSE,
}


async def test_smuggling_and_path_tricks_are_refused_and_never_forwarded(
    fake_model: FakeModel, start_sidecar: StartSidecar
) -> None:
    sidecar = await start_sidecar(validated_config(fake_model.url), wait_ready=True)
    for name, raw in SMUGGLING.items():
        answer = await raw_request(sidecar.running.main_port, raw)
        head, _, body = answer.partition(b"\r\n\r\n")
        status = int(head.split(b" ")[1])
        expected = {"header too large": 431, "CONNECT tunnel": 405, "TRACE reflection": 405}
        assert status == expected.get(name, 400), (name, head)
        error = orjson.loads(body)["error"]
        assert error["type"] in ("bad_request", "header_too_large", "method_not_allowed"), name
        assert len(error["request_id"]) == 32
        assert b"b'" not in body, name
        assert b"Traceback" not in body, name
    assert fake_model.hits == []


# -- one secret, every path -----------------------------------------------------------

SECRET = "S3CR3T-c0ffee-9a7b-5d1e-4c22-8f0a-77aa"


async def test_a_secret_sent_everywhere_surfaces_nowhere(
    fake_model: FakeModel, tmp_path: Path
) -> None:
    config = secured_config(
        fake_model.url,
        logging={
            "access_log": {"path": str(tmp_path / "access.jsonl")},
            "payload_log": {"path": str(tmp_path / "payload.jsonl")},
            "redact_fields": ["parameters.token"],
        },
    )
    config["auth"]["api_keys"].append({"name": "carol", "digest": hash_key(SECRET)})
    config["auth"]["jwt"] = {"algorithms": ["HS256"], "secret": SECRET}
    config["routes"][0]["payload_sample"] = 1.0
    config["routes"][0]["fallback"] = {"chain": [{"static": {"body": {}}}]}
    config_path = tmp_path / "sidecar.yaml"
    config_path.write_text(yaml.safe_dump(config))

    async def fixed(request: web.Request) -> web.Response:
        return web.json_response({"outputs": []})  # the model echoes nothing back

    fake_model.on("/v2/models/iris/infer", fixed)
    process, port, admin_port = await start_sidecar_process(config_path)
    base = f"http://{LOOPBACK}:{port}"
    import aiohttp

    body = orjson.dumps({"parameters": {"token": SECRET}, "x": 1})
    attempts = [
        {"Authorization": f"Bearer {SECRET}"},  # a valid key
        {"X-API-Key": SECRET, "Cookie": f"sid={SECRET}"},
        {"Authorization": f"Bearer {SECRET}x"},  # a wrong key containing it
        {"Authorization": f"Bearer {jwt.encode(claims(), SECRET, algorithm='HS256')}"},
        {"Authorization": f"Bearer {SECRET}.{SECRET}.{SECRET}"},  # a broken token
        {"Authorization": f"Basic {SECRET}"},
    ]
    try:
        async with aiohttp.ClientSession() as session:
            for headers in attempts:
                async with session.post(
                    base + "/v2/models/iris/infer?k=" + SECRET, data=body, headers=headers
                ) as resp:
                    text = await resp.text()
                    assert SECRET not in text
                    assert all(SECRET not in v for k, v in resp.headers.items())
            admin = f"http://{LOOPBACK}:{admin_port}"
            for path in ("/health", "/metrics", "/readyz"):
                async with session.get(
                    admin + path, headers={"Authorization": f"Bearer {SECRET}"}
                ) as resp:
                    assert SECRET not in await resp.text()
    finally:
        process.terminate()
        stdout, stderr = await process.communicate()
    captured = [
        stdout,
        stderr,
        (tmp_path / "access.jsonl").read_bytes(),
        (tmp_path / "payload.jsonl").read_bytes(),
    ]
    assert (tmp_path / "payload.jsonl").read_bytes().count(b"[REDACTED]") >= 1
    for output in captured:
        assert SECRET.encode() not in output
    for hit in fake_model.hits:
        assert all(
            SECRET not in v
            for name, values in hit.headers.items()
            if name in ("authorization", "x-api-key")
            for v in values
        )


@pytest.mark.parametrize(
    ("target", "refused"),
    [
        ("/v2/models/iris/infer?x=1", None),
        ("/a?q=%2f%2e%2e", None),  # the query is the model's business
        ("/a%2fb", "encoded '/' or backslash"),
        ("/a%5Cb", "encoded '/' or backslash"),
        ("/a\\b", "backslash or NUL"),
        ("/a%00b", "backslash or NUL"),
        ("/a%ffb", "not valid UTF-8"),
        ("/a/%2e%2e/b", "dot segments"),
        ("/a/./b", "dot segments"),
        ("/a%252e", "double-encoded"),
        ("//other-host/x", "origin-form"),
        ("http://other-host/x", "origin-form"),
    ],
)
def test_targets_a_proxy_must_not_forward(target: str, refused: str | None) -> None:
    """The guard on its own, whatever a parser in front of it lets through."""
    from sidecar.http import errors
    from sidecar.pipeline.guard import check_target

    if refused is None:
        check_target(target)
        return
    with pytest.raises(errors.BadRequest, match=re.escape(refused)):
        check_target(target)


@pytest.mark.parametrize(
    ("coding", "accepted"),
    [
        (None, True),
        ("chunked", True),
        (" Chunked ", True),
        ("br", False),
        ("gzip", False),
        ("gzip, chunked", False),
    ],
)
def test_only_plain_chunked_framing_is_accepted(coding: str | None, accepted: bool) -> None:
    from sidecar.http import errors
    from sidecar.pipeline.guard import check_framing

    if accepted:
        check_framing(coding)
    else:
        with pytest.raises(errors.BadRequest, match="only the 'chunked' transfer coding"):
            check_framing(coding)
