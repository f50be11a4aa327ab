"""sidecar.pipeline.auth: API keys and JWTs to principals, called directly."""

from __future__ import annotations

import time
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

from sidecar.config.schema import AuthSettings
from sidecar.http import errors
from sidecar.pipeline.auth import Authenticator, Principal, hash_key, new_key
from sidecar.telemetry.metrics import Metrics

ALICE, BOB = "sk_alice_key", "sk_bob_key"
SECRET = "hs256-shared-secret-for-unit-tests-only-0123456789abcdef-012345678"


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


class Auth:
    def __init__(self, public_key: str | None = None, **settings: Any) -> None:
        values: dict[str, Any] = {
            "enabled": True,
            "api_keys": [
                {"name": "alice", "digest": hash_key(ALICE)},
                {
                    "name": "bob",
                    "digest": hash_key(BOB),
                    "routes": ["infer"],
                    "methods": ["post"],
                    "scopes": ["admin"],
                },
            ],
        }
        values.update(settings)
        self.metrics = Metrics()
        self.auth = Authenticator(AuthSettings.model_validate(values), public_key, self.metrics)

    def failures(self, reason: str) -> float:
        value = self.metrics.registry.get_sample_value(
            "sidecar_auth_failures_total", {"reason": reason}
        )
        return value or 0.0

    def refused(self, authorization: str | None, header: str | None = None) -> errors.Unauthorized:
        with pytest.raises(errors.Unauthorized) as refused:
            self.auth.authenticate(authorization, header)
        return refused.value


def jwt_settings(**overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "algorithms": ["HS256"],
        "secret": SECRET,
        "issuer": "https://issuer.test",
        "audience": "sidecar",
        "leeway": "1s",
    }
    values.update(overrides)
    return values


def claims(**overrides: Any) -> dict[str, Any]:
    now = int(time.time())
    values: dict[str, Any] = {
        "sub": "svc-ranker",
        "iss": "https://issuer.test",
        "aud": "sidecar",
        "nbf": now - 5,
        "exp": now + 300,
    }
    values.update(overrides)
    return {k: v for k, v in values.items() if v is not None}


def hs(**overrides: Any) -> str:
    return jwt.encode(claims(**overrides), SECRET, algorithm="HS256")


def test_a_key_digest_is_its_sha256_in_hex() -> None:
    assert hash_key("abc") == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )


def test_new_keys_are_long_random_and_marked() -> None:
    first, second = new_key(), new_key()
    assert first.startswith("sk_")
    assert len(first) == 46  # "sk_" and 32 random bytes in url-safe base64
    assert first != second


def test_a_principal_without_limits_may_call_anything() -> None:
    anyone = Principal("a", frozenset(), frozenset(), "key")
    assert anyone.allows("infer", "GET")
    assert not anyone.admin


def test_a_principal_is_held_to_its_routes_and_methods() -> None:
    p = Principal("a", frozenset({"infer"}), frozenset({"POST"}), "key")
    assert p.allows("infer", "POST")
    assert not p.allows("infer", "GET")
    assert not p.allows("health", "POST")
    only_routes = Principal("a", frozenset({"infer"}), frozenset(), "key")
    assert only_routes.allows("infer", "DELETE")
    assert not only_routes.allows("other", "GET")
    only_methods = Principal("a", frozenset(), frozenset({"GET"}), "key")
    assert only_methods.allows("other", "GET")
    assert not only_methods.allows("other", "POST")


def test_a_key_is_accepted_as_a_bearer_token_or_in_its_header() -> None:
    a = Auth()
    assert a.auth.authenticate(f"Bearer {ALICE}", None).name == "alice"
    assert a.auth.authenticate(f"bearer  {ALICE} ", None).name == "alice"
    assert a.auth.authenticate(None, f" {ALICE} ").name == "alice"
    assert a.auth.authenticate("Basic dXNlcjpwdw==", ALICE).name == "alice"
    assert a.auth.authenticate("Bearer ", ALICE).name == "alice"
    assert a.auth.authenticate(f"Bearer {BOB}", ALICE).name == "bob"  # Authorization first


def test_a_keys_principal_carries_its_routes_methods_and_scopes() -> None:
    a = Auth()
    alice = a.auth.authenticate(None, ALICE)
    bob = a.auth.authenticate(None, BOB)
    assert alice == Principal("alice", frozenset(), frozenset(), "key", admin=False)
    assert bob == Principal("bob", frozenset({"infer"}), frozenset({"POST"}), "key", admin=True)


def test_no_credentials_is_a_401_with_a_challenge() -> None:
    a = Auth(realm="models")
    for authorization, header in ((None, None), ("", ""), ("Bearer  ", "  "), ("Basic x", None)):
        refused = a.refused(authorization, header)
        assert refused.status == 401
        assert refused.message == "credentials required"
        assert refused.headers == {"WWW-Authenticate": 'Bearer realm="models"'}
    assert a.failures("missing") == 4.0


def test_a_wrong_key_is_a_401_that_names_nothing() -> None:
    a = Auth()
    refused = a.refused(None, "sk_wrong")
    assert refused.message == "invalid credentials"
    assert refused.headers == {"WWW-Authenticate": 'Bearer realm="sidecar"'}
    assert a.failures("invalid_key") == 1.0
    assert a.failures("missing") == 0.0


def test_a_key_with_characters_utf8_cannot_encode_is_refused_not_crashed() -> None:
    assert Auth().refused(None, "sk_\udcff").message == "invalid credentials"


def test_a_key_with_non_ascii_characters_matches_its_digest_as_it_travels() -> None:
    # `sidecar hash-key` hashes the key's UTF-8 bytes; the HTTP layer hands header
    # fields over decoded latin-1, byte for byte. Hashing that text as UTF-8 again
    # gave another digest: such a key could never authenticate.
    key = "clé-secrète"
    a = Auth(api_keys=[{"name": "carol", "digest": hash_key(key)}])
    as_received = key.encode("utf-8").decode("latin-1")
    assert a.auth.authenticate(f"Bearer {as_received}", None).name == "carol"
    assert a.auth.authenticate(None, as_received).name == "carol"


def test_credential_headers_are_authorization_and_the_key_header() -> None:
    assert Auth().auth.credential_headers == frozenset({b"authorization", b"x-api-key"})
    assert Auth(header=None).auth.credential_headers == frozenset({b"authorization"})


def test_a_hs256_token_gives_a_jwt_principal() -> None:
    a = Auth(jwt=jwt_settings(routes=["infer"], methods=["get"]))
    principal = a.auth.authenticate(f"Bearer {hs()}", None)
    assert principal == Principal(
        "jwt:svc-ranker", frozenset({"infer"}), frozenset({"GET"}), "jwt", admin=False
    )


def test_a_rs256_token_is_checked_with_the_public_key(rsa_keys: tuple[bytes, str]) -> None:
    private_pem, public_pem = rsa_keys
    a = Auth(public_pem, jwt=jwt_settings(algorithms=["HS256", "RS256"], public_key=public_pem))
    token = jwt.encode(claims(sub="svc-batch"), private_pem, algorithm="RS256")
    assert a.auth.authenticate(f"Bearer {token}", None).name == "jwt:svc-batch"
    assert a.auth.authenticate(f"Bearer {hs()}", None).name == "jwt:svc-ranker"


def test_every_rejected_token_says_why_and_asks_for_a_valid_token() -> None:
    a = Auth(jwt=jwt_settings())
    now = int(time.time())
    cases = {
        "token expired": hs(exp=now - 60),
        "token not yet valid": hs(nbf=now + 600),
        "token issuer not accepted": hs(iss="https://evil"),
        "token audience not accepted": hs(aud="other"),
        "token signature invalid": jwt.encode(claims(), SECRET + "x", algorithm="HS256"),
        "token lacks a required claim": hs(exp=None),
        "token algorithm not accepted": jwt.encode(claims(), SECRET, algorithm="HS512"),
        "token malformed or not verifiable": "abc.def.ghi",
        "token lacks the principal claim": hs(sub=None),
    }
    for reason, token in cases.items():
        refused = a.refused(f"Bearer {token}")
        assert refused.message == reason
        assert refused.headers == {
            "WWW-Authenticate": 'Bearer realm="sidecar", error="invalid_token"'
        }
    assert a.failures("invalid_token") == len(cases)


def test_the_principal_claim_must_be_a_non_empty_string() -> None:
    a = Auth(jwt=jwt_settings(principal_claim="client_id"))
    assert a.auth.authenticate(f"Bearer {hs(client_id='batch')}", None).name == "jwt:batch"
    for value in ("", 7):
        assert a.refused(f"Bearer {hs(client_id=value)}").message == (
            "token lacks the principal claim"
        )


def test_the_leeway_forgives_a_little_clock_skew() -> None:
    expired = hs(exp=int(time.time()) - 10)
    assert Auth(jwt=jwt_settings(leeway="60s")).auth.authenticate(f"Bearer {expired}", None)
    assert Auth(jwt=jwt_settings(leeway="1s")).refused(f"Bearer {expired}").message == (
        "token expired"
    )


def test_the_admin_scope_is_one_word_of_the_scope_claim() -> None:
    a = Auth(jwt=jwt_settings(admin_scope="admin"))
    assert a.auth.authenticate(f"Bearer {hs(scope='read admin')}", None).admin
    assert not a.auth.authenticate(f"Bearer {hs(scope='administrator')}", None).admin
    assert not a.auth.authenticate(f"Bearer {hs(scope=['admin'])}", None).admin
    assert not a.auth.authenticate(f"Bearer {hs()}", None).admin
    no_scope = Auth(jwt=jwt_settings())
    assert not no_scope.auth.authenticate(f"Bearer {hs(scope='admin')}", None).admin


def test_only_three_part_tokens_are_taken_for_jwts() -> None:
    a = Auth(jwt=jwt_settings())
    assert a.refused("Bearer a.b").message == "invalid credentials"
    assert a.refused("Bearer a.b.c.d").message == "invalid credentials"
    assert a.auth.authenticate(f"Bearer {ALICE}", None).name == "alice"
    assert Auth().refused(f"Bearer {hs()}").message == "invalid credentials"  # no JWT configured


def test_a_key_with_two_dots_matches_its_digest_when_jwt_is_configured() -> None:
    """``hash-key`` takes any key; one with exactly two dots was always taken for a
    JWT (refused "token malformed") and never matched, once JWT was configured."""
    dotted = "team.prod.Zk3q9"
    a = Auth(
        jwt=jwt_settings(),
        api_keys=[{"name": "dotted", "digest": hash_key(dotted), "scopes": ["admin"]}],
    )
    assert a.auth.authenticate(f"Bearer {dotted}", None).name == "dotted"
    assert a.auth.authenticate(None, dotted).kind == "key"
    assert a.auth.authenticate(f"Bearer {hs()}", None).name == "jwt:svc-ranker"  # still
    refused = a.refused("Bearer team.prod.other")  # no key: verified as a token, refused
    assert refused.message == "token malformed or not verifiable"
    assert a.failures("invalid_token") == 1


def test_admin_actions_need_an_admin_principal() -> None:
    a = Auth()
    a.auth.require_admin(Principal("root", frozenset(), frozenset(), "key", admin=True), "reload")
    with pytest.raises(errors.Forbidden) as refused:
        a.auth.require_admin(Principal("alice", frozenset(), frozenset(), "key"), "reload")
    assert refused.value.message == "principal 'alice' may not reload"
    assert refused.value.status == 403
    assert a.failures("forbidden") == 1.0


def test_a_principal_may_only_call_its_routes_and_methods() -> None:
    a = Auth()
    bob = a.auth.authenticate(None, BOB)
    a.auth.authorize(bob, "infer", "POST")
    with pytest.raises(errors.Forbidden) as refused:
        a.auth.authorize(bob, "infer", "GET")
    assert refused.value.message == "principal 'bob' may not GET route 'infer'"
    assert a.failures("forbidden") == 1.0


def test_an_authorization_of_another_scheme_is_not_taken_for_a_key() -> None:
    a = Auth()
    assert a.auth.authenticate(f"Token {BOB}", ALICE).name == "alice"
    assert a.refused(f"Digest {BOB}").message == "credentials required"
