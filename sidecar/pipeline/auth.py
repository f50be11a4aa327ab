"""Who is calling: API keys (stored as digests) and JWTs, each giving a principal.

A key arrives as ``Authorization: Bearer <key>`` or in the configured header. The
config holds only ``sha256:<hex>`` digests (``sidecar hash-key``); a presented key
is hashed and compared with every digest in constant time. When JWT is configured,
a credential shaped like a JWT (three dot-separated parts) that matches no key is
verified as a token: an API key may hold two dots (``hash-key`` takes any key).

The principal's name (the key's name, or the JWT claim) is logged and labels
metrics; the credential itself is never logged, never echoed and never forwarded.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass
from typing import Final

import structlog

from sidecar.config.schema import ApiKey, AuthSettings, JwtSettings
from sidecar.http import errors
from sidecar.telemetry.metrics import Metrics

# Bound once: a compiled module reads a Final from a C static, where each
# ``hashlib.sha256`` would be an attribute lookup per request.
_SHA256: Final = hashlib.sha256
_SAME_DIGEST: Final = hmac.compare_digest

log: Final = structlog.get_logger("sidecar.pipeline.auth")


def hash_key(key: str) -> str:
    """The digest stored in config for an API key."""
    return "sha256:" + hashlib.sha256(key.encode("utf-8")).hexdigest()


def new_key() -> str:
    return "sk_" + secrets.token_urlsafe(32)


def _as_sent(credential: str) -> bytes:
    """The credential's bytes as the client sent them. Header fields arrive decoded
    latin-1, byte for byte, so a key of UTF-8 characters comes back as the bytes
    ``hash_key`` hashed (encoding the text as UTF-8 again gave another digest)."""
    try:
        return credential.encode("latin-1")
    except UnicodeEncodeError:  # not from a header field: as UTF-8
        return credential.encode("utf-8", "surrogatepass")


@dataclass(frozen=True, slots=True)
class Principal:
    name: str
    routes: frozenset[str]  # empty: every route
    methods: frozenset[str]  # empty: every method
    kind: str  # "key" or "jwt": the metric label (JWT subjects are unbounded)
    admin: bool = False  # may use the operator's endpoints

    def allows(self, route: str, method: str) -> bool:
        return (not self.routes or route in self.routes) and (
            not self.methods or method in self.methods
        )


class _JwtVerifier:
    def __init__(self, settings: JwtSettings, public_key: str | None) -> None:
        self._settings = settings
        self._algorithms = list(settings.algorithms)
        self._secret = settings.secret.get_secret_value() if settings.secret else None
        self._public_key = public_key  # PEM text, read from its file by the plan
        self._routes = frozenset(settings.routes)
        self._methods = frozenset(m.upper() for m in settings.methods)

    def verify(self, token: str) -> Principal:
        # Imported where used: pyjwt loads cryptography (9 MB) that key-only configs
        # never need.
        import jwt

        try:
            header = jwt.get_unverified_header(token)
            algorithm = header.get("alg")
            if algorithm not in self._algorithms:
                raise errors.Unauthorized("token algorithm not accepted")
            key = self._secret if algorithm == "HS256" else self._public_key
            assert key is not None  # the config requires a key per algorithm
            claims = jwt.decode(
                token,
                key,
                algorithms=[algorithm],
                audience=self._settings.audience,
                issuer=self._settings.issuer,
                leeway=self._settings.leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise errors.Unauthorized("token expired") from None
        except jwt.ImmatureSignatureError:
            raise errors.Unauthorized("token not yet valid") from None
        except jwt.InvalidAudienceError:
            raise errors.Unauthorized("token audience not accepted") from None
        except jwt.InvalidIssuerError:
            raise errors.Unauthorized("token issuer not accepted") from None
        except jwt.MissingRequiredClaimError:
            raise errors.Unauthorized("token lacks a required claim") from None
        except jwt.InvalidSignatureError:
            raise errors.Unauthorized("token signature invalid") from None
        except jwt.PyJWTError:
            raise errors.Unauthorized("token malformed or not verifiable") from None
        subject = claims.get(self._settings.principal_claim)
        if not isinstance(subject, str) or not subject:
            raise errors.Unauthorized("token lacks the principal claim")
        admin_scope = self._settings.admin_scope
        scopes = claims.get("scope")
        admin = (
            admin_scope is not None and isinstance(scopes, str) and admin_scope in scopes.split()
        )
        # "jwt:" keeps a token's subject apart from an API key of the same name: a
        # token for "ranking-service" is not that key's principal, nor its bucket.
        return Principal(f"jwt:{subject}", self._routes, self._methods, "jwt", admin=admin)


class Authenticator:
    def __init__(
        self, settings: AuthSettings, jwt_public_key: str | None, metrics: Metrics
    ) -> None:
        self.settings = settings
        self._keys: tuple[tuple[bytes, Principal], ...] = tuple(
            (self._digest_bytes(key), self._principal(key)) for key in settings.api_keys
        )
        self._jwt = _JwtVerifier(settings.jwt, jwt_public_key) if settings.jwt is not None else None
        self._header = settings.header
        self._challenge = f'Bearer realm="{settings.realm}"'
        self._failures = metrics.auth_failures
        # Credentials the client gave the sidecar; they are not the model's business.
        self.credential_headers = frozenset(
            h.lower().encode("latin-1", "replace")
            for h in ("Authorization", settings.header or "")
            if h
        )

    @staticmethod
    def _digest_bytes(key: ApiKey) -> bytes:
        return bytes.fromhex(key.digest.removeprefix("sha256:"))

    @staticmethod
    def _principal(key: ApiKey) -> Principal:
        return Principal(
            key.name,
            frozenset(key.routes),
            frozenset(m.upper() for m in key.methods),
            "key",
            admin="admin" in key.scopes,
        )

    def _credential(self, authorization: str | None, header_value: str | None) -> str | None:
        if authorization:
            scheme, _, value = authorization.partition(" ")
            if scheme.lower() == "bearer" and value.strip():
                return value.strip()
        if header_value:
            return header_value.strip() or None
        return None

    def authenticate(self, authorization: str | None, header_value: str | None) -> Principal:
        """The caller's principal, or ``Unauthorized`` (401) with a reason that leaks nothing."""
        credential = self._credential(authorization, header_value)
        if credential is None:
            self._failures.labels("missing").inc()
            raise errors.Unauthorized(
                "credentials required", headers={"WWW-Authenticate": self._challenge}
            )
        presented = _SHA256(_as_sent(credential)).digest()
        match: Principal | None = None
        for digest, principal in self._keys:  # every digest is compared: constant time
            if _SAME_DIGEST(presented, digest):
                match = principal
        if match is None and self._jwt is not None and credential.count(".") == 2:
            # Keys first: a key with two dots was taken for a JWT and never matched.
            # Only a client holding a configured key can match one (its digest), and
            # every key is compared whatever the shape, so no timing tells them apart.
            try:
                return self._jwt.verify(credential)
            except errors.Unauthorized as exc:
                self._failures.labels("invalid_token").inc()
                exc.headers["WWW-Authenticate"] = f'{self._challenge}, error="invalid_token"'
                raise
        if match is None:
            self._failures.labels("invalid_key").inc()
            raise errors.Unauthorized(
                "invalid credentials", headers={"WWW-Authenticate": self._challenge}
            )
        return match

    def require_admin(self, principal: Principal, action: str) -> None:
        if not principal.admin:
            self._failures.labels("forbidden").inc()
            raise errors.Forbidden(f"principal {principal.name!r} may not {action}")

    def authorize(self, principal: Principal, route: str, method: str) -> None:
        if not principal.allows(route, method):
            self._failures.labels("forbidden").inc()
            raise errors.Forbidden(f"principal {principal.name!r} may not {method} route {route!r}")
