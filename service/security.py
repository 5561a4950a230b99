"""Who is calling: bearer JWTs, the short-lived stream tokens, and the principal that owns chats and runs.

Two kinds of token, told apart by key and audience, never by what a token says of itself:

- **Bearer JWTs** come from the deployment's identity provider. They are checked with PyJWT against
  one configured key (an HS secret, a PEM public key, or the keys of a JWKS document), with the
  algorithm pinned by configuration, and must carry ``exp``, ``sub`` and the configured ``aud``
  (and ``iss`` when one is configured). ``exp`` and ``nbf`` allow ``jwt_leeway_s`` of clock skew.
- **Stream tokens** are minted by the service itself (``POST /v1/runs/{id}/stream-token``,
  ``POST /v1/ws-token``) for browsers, whose ``EventSource`` and ``WebSocket`` cannot send headers.
  They are HS256 JWTs under the service's own key and audience, live at most 60 s, name the
  principal and one scope (``run:<id>`` or ``ws``), and are accepted only in ``?token=`` of the
  endpoint of that scope. A bearer JWT fails as a stream token (other key, no scope) and a stream
  token fails as a bearer JWT (other key and audience).

With auth off every caller is :data:`ANONYMOUS`, which owns what nobody else can see either.
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final, Literal
from urllib.parse import quote

import jwt
import msgspec

from service.settings import Settings

STREAM_AUDIENCE: Final = "chat-service/stream"
StreamScope = Literal["run", "ws"]
_JWKS_KEY_TTL_S: Final = 300.0
_JWKS_KEYS_KEPT: Final = 64


class AuthError(Exception):
    """A token that does not prove who the caller is; the message says why (never echoing the token)."""


class Principal(msgspec.Struct, frozen=True):
    """The caller: ``subject`` (the ``sub`` claim), and the tenant when the deployment names one."""

    subject: str
    tenant: str | None = None

    @property
    def owner(self) -> str | None:
        """The key chats and runs are owned by (``None``: auth is off, everything is shared)."""
        if not self.subject:
            return None
        return self.subject if self.tenant is None else f"{quote(self.tenant, safe='')}/{self.subject}"


ANONYMOUS: Final = Principal(subject="")


class StreamToken(msgspec.Struct, frozen=True):
    """A minted stream token and when it stops working (Unix seconds)."""

    token: str
    expires_at: float


class Authenticator:
    """Checks bearer JWTs and mints and checks stream tokens. See the module docstring."""

    def __init__(self, settings: Settings) -> None:
        self.enabled = settings.auth == "jwt"
        self._algorithm = settings.algorithm
        self._audience = settings.jwt_audience
        self._issuer = settings.jwt_issuer
        self._leeway = settings.jwt_leeway_s
        self._tenant_claim = settings.jwt_tenant_claim
        self._ttl = settings.stream_token_ttl_s
        self._stream_key = (settings.stream_token_secret or secrets.token_hex(32)).encode()
        self._key: Any = settings.jwt_secret or _pem(settings.jwt_public_key)
        # PyJWT's client caches the JWKS (5 min) and refetches it on an unknown kid, at most once per
        # cooldown; the keys it found are kept here as long, so a known kid costs no thread hop.
        self._jwks = (
            jwt.PyJWKClient(settings.jwks_url, timeout=5, cooldown_duration=settings.jwks_cooldown_s)
            if settings.jwks_url
            else None
        )
        self._jwks_keys: dict[str, tuple[float, Any]] = {}  # kid -> (found at, key)
        required = ["exp", "sub", "aud"] + (["iss"] if self._issuer else [])
        self._options: Any = {"require": required}

    async def principal(self, token: str) -> Principal:
        """The principal a bearer JWT proves. Raises ``AuthError``."""
        key = await self._verification_key(token)
        try:
            claims = jwt.decode(
                token,
                key,
                algorithms=[self._algorithm],
                audience=self._audience,
                issuer=self._issuer,
                leeway=self._leeway,
                options=self._options,
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid bearer token: {exc}") from None
        return self._principal_of(claims)

    def _principal_of(self, claims: Mapping[str, Any]) -> Principal:
        subject = claims.get("sub")
        if not isinstance(subject, str) or not subject:
            raise AuthError("invalid bearer token: sub must be a non-empty string")
        tenant = claims.get(self._tenant_claim) if self._tenant_claim else None
        if self._tenant_claim is not None and (not isinstance(tenant, str) or not tenant):
            raise AuthError(f"invalid bearer token: the {self._tenant_claim!r} claim must be a non-empty string")
        return Principal(subject=subject, tenant=tenant)

    async def _verification_key(self, token: str) -> Any:
        if self._jwks is None:
            return self._key
        try:
            kid = jwt.get_unverified_header(token).get("kid")
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid bearer token: {exc}") from None
        if not isinstance(kid, str):
            raise AuthError("invalid bearer token: no kid in its header")
        cached = self._jwks_keys.get(kid)
        if cached is not None and time.monotonic() - cached[0] < _JWKS_KEY_TTL_S:
            return cached[1]
        try:
            # The client's HTTP fetch blocks: off the event loop.
            signing = await asyncio.to_thread(self._jwks.get_signing_key, kid)
        except jwt.PyJWKClientError as exc:
            raise AuthError(f"invalid bearer token: {exc}") from None
        if len(self._jwks_keys) >= _JWKS_KEYS_KEPT:
            self._jwks_keys.clear()
        self._jwks_keys[kid] = (time.monotonic(), signing.key)
        return signing.key

    def mint(self, principal: Principal, scope: StreamScope, run_id: str | None = None) -> StreamToken:
        """A stream token for ``scope`` (``run`` needs ``run_id``)."""
        # JWT `exp` is whole seconds: rounded up, so a token lives its full TTL (rounded down, a 1 s
        # token minted at .9 lived 0.1 s and a reconnect under load got 401).
        expires_at = math.ceil(time.time() + self._ttl)
        claims = {
            "sub": principal.subject,
            "tenant": principal.tenant,
            "scope": f"run:{run_id}" if scope == "run" else "ws",
            "aud": STREAM_AUDIENCE,
            "exp": expires_at,
        }
        return StreamToken(jwt.encode(claims, self._stream_key, algorithm="HS256"), float(expires_at))

    def stream_principal(self, token: str, scope: StreamScope, run_id: str | None = None) -> Principal:
        """The principal of a stream token minted for ``scope`` (and ``run_id``). Raises ``AuthError``."""
        try:
            claims = jwt.decode(
                token,
                self._stream_key,
                algorithms=["HS256"],
                audience=STREAM_AUDIENCE,
                options={"require": ["exp", "sub", "aud", "scope"]},
            )
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid stream token: {exc}") from None
        expected = f"run:{run_id}" if scope == "run" else "ws"
        if claims.get("scope") != expected:
            raise AuthError("this stream token was minted for another stream")
        tenant = claims.get("tenant")
        return Principal(subject=str(claims["sub"]), tenant=tenant if isinstance(tenant, str) else None)


def _pem(value: str | None) -> str | None:
    """A PEM key given as its text or as the path of a file holding it."""
    if value is None or value.lstrip().startswith("-----BEGIN"):
        return value
    return Path(value).read_text()


def dev_token(settings: Settings, subject: str, ttl_s: float = 3600.0) -> str:
    """A bearer JWT for local testing, signed with ``SERVICE_JWT_SECRET`` (HS* deployments only)."""
    if not settings.jwt_secret:
        raise AuthError(
            "minting a token needs SERVICE_JWT_SECRET (with a public key or JWKS, ask the identity provider)"
        )
    claims: dict[str, Any] = {"sub": subject, "aud": settings.jwt_audience, "exp": int(time.time() + ttl_s)}
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    return jwt.encode(claims, settings.jwt_secret, algorithm=settings.algorithm)
