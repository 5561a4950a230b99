"""Signing keys, JWTs made with PyJWT, and a JWKS document served on loopback, for auth tests.

Usage::

    keys = SigningKeys()                             # an RSA key pair (kid "k1"), made in the test
    token = keys.token("alice")                      # RS256, aud/iss/exp set like the service expects
    async with jwks_server(keys) as url:             # GET {url} -> {"keys": [...]}
        ...                                          # keys.rotate() adds a key "k2" served from then on
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import hmac
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from tests.support.live_server import serve

AUDIENCE = "chat-service-tests"
ISSUER = "https://issuer.test"
SECRET = "test-signing-secret-of-at-least-32-bytes!"


def _rsa() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


class SigningKeys:
    """RSA signing keys by kid; ``current`` signs new tokens."""

    def __init__(self) -> None:
        self.private: dict[str, rsa.RSAPrivateKey] = {"k1": _rsa()}
        self.current = "k1"
        self.jwks_fetches = 0

    def rotate(self) -> str:
        """Add a new key (served by the JWKS from now on) and sign with it."""
        kid = f"k{len(self.private) + 1}"
        self.private[kid] = _rsa()
        self.current = kid
        return kid

    def public_pem(self, kid: str = "k1") -> str:
        public = self.private[kid].public_key()
        return public.public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo).decode()

    def jwks(self) -> dict[str, Any]:
        keys = []
        for kid, key in self.private.items():
            jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
            keys.append({**jwk, "kid": kid, "use": "sig", "alg": "RS256"})
        return {"keys": keys}

    def token(self, sub: str = "alice", *, kid: str | None = None, **claims: Any) -> str:
        """An RS256 token; ``claims`` override the defaults (a value of None drops the claim)."""
        kid = kid or self.current
        key = self.private.get(kid) or _rsa()  # an unknown kid is signed by a key nobody knows
        return jwt.encode(claims_for(sub, **claims), key, algorithm="RS256", headers={"kid": kid})


def claims_for(sub: str | None, **claims: Any) -> dict[str, Any]:
    """Claims the service accepts, with ``claims`` merged over them (None removes one)."""
    now = int(time.time())
    # An hour: tokens made when a module is collected must outlive the suite (under load a module's
    # tests ran more than the 300 s this used to be after their token was made: 401 "Signature has expired").
    values: dict[str, Any] = {"sub": sub, "aud": AUDIENCE, "iss": ISSUER, "iat": now, "exp": now + 3600, **claims}
    return {name: value for name, value in values.items() if value is not None}


def hs256(sub: str = "alice", *, secret: str = SECRET, **claims: Any) -> str:
    """An HS256 token under ``secret``."""
    return jwt.encode(claims_for(sub, **claims), secret, algorithm="HS256")


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def forged(claims: dict[str, Any], *, alg: str, key: bytes = b"", kid: str | None = None) -> str:
    """A token PyJWT refuses to make: ``alg: none``, or HS256 keyed with a public key's PEM bytes."""
    header = {"alg": alg, "typ": "JWT", **({"kid": kid} if kid else {})}
    signing_input = f"{_b64(json.dumps(header).encode())}.{_b64(json.dumps(claims).encode())}"
    if alg == "none":
        return signing_input + "."
    signature = hmac.new(key, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(signature)}"


@contextlib.asynccontextmanager
async def jwks_server(keys: SigningKeys) -> AsyncIterator[str]:
    """Serve ``keys.jwks()`` at ``GET /jwks.json`` on 127.0.0.1; yields its URL (fetches are counted)."""

    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        keys.jwks_fetches += 1
        body = json.dumps(keys.jwks()).encode()
        await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
        await send({"type": "http.response.body", "body": body})

    async with serve(app) as url:
        yield f"{url}/jwks.json"
