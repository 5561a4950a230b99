"""Authentication of every API request and WebSocket handshake, as Litestar middleware.

Each request gets a :class:`~service.security.Principal` in ``scope["user"]`` (handlers take it as the
``principal`` dependency):

- auth off: :data:`~service.security.ANONYMOUS`, on a loopback address only (unless anonymous access
  was allowed explicitly);
- auth on: the subject of ``Authorization: Bearer <JWT>``, or, on the handlers marked with
  ``opt={STREAM_TOKEN_OPT: "run" | "ws"}`` only, of a stream token in ``?token=``.

Refusals are 401 ``unauthorized`` in the service's error shape. A refused WebSocket handshake gets
the same 401 response instead of an upgrade (ASGI's ``websocket.http.response`` extension; a server
without it closes the handshake, which clients see as 403). Handlers marked
``opt={"exclude_from_auth": True}`` (health, metrics, the demo page's files) are open.
"""

from __future__ import annotations

import ipaddress
import logging
from typing import Any, Final, cast

import msgspec
from litestar.connection import ASGIConnection
from litestar.di import Provide
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.middleware._utils import (  # pyright: ignore[reportPrivateUsage]
    should_bypass_middleware,  # pyright: ignore[reportUnknownVariableType]
)
from litestar.openapi.spec import Reference, SecurityScheme
from litestar.types import Receive, Scope, Send

from service import errors
from service.errors import ErrorBody, ErrorEnvelope
from service.security import ANONYMOUS, Authenticator, AuthError, Principal
from service.settings import Settings

STREAM_TOKEN_OPT: Final = "stream_token"  # noqa: S105 - an opt key, not a secret
"""Handler ``opt`` key: the stream-token scope (``run`` or ``ws``) whose ``?token=`` the handler accepts."""
EXCLUDE_FROM_AUTH: Final = {"exclude_from_auth": True}
"""Handler ``opt`` of the endpoints that need no credentials."""
BEARER: Final[list[dict[str, list[str]]]] = [{"bearer": []}]
"""OpenAPI security of the API's operations."""
BEARER_OR_STREAM_TOKEN: Final[list[dict[str, list[str]]]] = [{"bearer": []}, {"streamToken": []}]
"""OpenAPI security of the operations that also take a stream token in ``?token=``."""
SECURITY_SCHEMES: Final[dict[str, SecurityScheme | Reference]] = {
    "bearer": SecurityScheme(
        type="http",
        scheme="bearer",
        bearer_format="JWT",
        description="A JWT from the deployment's identity provider (when the service runs with `SERVICE_AUTH=jwt`).",
    ),
    "streamToken": SecurityScheme(
        type="apiKey",
        name="token",
        security_scheme_in="query",
        description="A stream token from `POST /v1/runs/{run_id}/stream-token`, for `EventSource` (at most 60 s).",
    ),
}


class AuthMiddleware(AbstractAuthenticationMiddleware):
    """Sets ``scope["user"]`` to the caller's principal, or refuses the connection (see the module docstring)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        if should_bypass_middleware(
            exclude_http_methods=self.exclude_http_methods,
            exclude_opt_key=self.exclude_opt_key,
            exclude_path_pattern=self.exclude,  # pyright: ignore[reportUnknownMemberType]
            scope=scope,
            scopes=self.scopes,
        ):
            await self.app(scope, receive, send)
            return
        try:
            result = await self.authenticate_request(ASGIConnection(scope))
        except errors.ServiceError as exc:
            if scope["type"] != "websocket":
                raise
            await refuse_handshake(scope, send, exc)
            return
        scope["user"] = result.user
        scope["auth"] = result.auth
        await self.app(scope, receive, send)

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:  # noqa: D102
        auth: Authenticator = connection.app.state.auth
        if not auth.enabled:
            _require_loopback(connection)
            return AuthenticationResult(user=ANONYMOUS, auth=None)
        try:
            return AuthenticationResult(user=await _principal(connection, auth), auth=None)
        except AuthError as exc:
            raise errors.UnauthorizedError(str(exc)) from None


async def _principal(connection: ASGIConnection[Any, Any, Any, Any], auth: Authenticator) -> Principal:
    query_token = connection.query_params.get("token")
    header = connection.headers.get("authorization")
    if query_token is not None:
        scope = connection.route_handler.opt.get(STREAM_TOKEN_OPT)
        if scope is None:
            raise AuthError("?token= is accepted only by the streaming endpoints; send Authorization: Bearer <JWT>")
        return auth.stream_principal(query_token, scope, connection.path_params.get("run_id"))
    if header is None:
        raise AuthError("this endpoint needs Authorization: Bearer <JWT>")
    kind, _, token = header.partition(" ")
    if kind.lower() != "bearer" or not token.strip():
        raise AuthError("the Authorization header must be 'Bearer <JWT>'")
    return await auth.principal(token.strip())


def _require_loopback(connection: ASGIConnection[Any, Any, Any, Any]) -> None:
    settings: Settings = connection.app.state.settings
    server = connection.scope["server"]
    if settings.allow_anonymous or server is None:
        return
    try:
        loopback = ipaddress.ip_address(server[0]).is_loopback
    except ValueError:
        loopback = server[0] == "localhost"
    if not loopback:
        raise errors.UnauthorizedError(
            "authentication is off (SERVICE_AUTH=none), so the service answers only on loopback addresses"
        )


async def refuse_handshake(scope: Scope, send: Send, exc: errors.ServiceError) -> None:
    """Answer a WebSocket handshake with the error response instead of an upgrade."""
    if "websocket.http.response" not in (scope["extensions"] or {}):
        await send({"type": "websocket.close", "code": 1008, "reason": exc.message[:120]})
        return
    body = msgspec.json.encode(ErrorEnvelope(ErrorBody(exc.code, exc.message, exc.detail)))
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    if exc.status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send(cast("Any", {"type": "websocket.http.response.start", "status": exc.status, "headers": headers}))
    await send(cast("Any", {"type": "websocket.http.response.body", "body": body}))


class RefusedHandshakeFilter(logging.Filter):
    """Drop uvicorn's error line for a handshake refused with an HTTP response.

    uvicorn 0.54 (websockets-sansio) logs "ASGI callable returned without completing handshake" at
    ERROR after a ``websocket.http.response``, although that response is a complete answer (uvicorn
    logs the 401 itself at INFO). The service ends a handshake without accepting it in two ways only,
    both complete: this middleware's HTTP response and Litestar's ``websocket.close`` (which uvicorn
    counts as done), so the line says nothing here.
    """

    def filter(self, record: logging.LogRecord) -> bool:  # noqa: D102
        return record.getMessage() != "ASGI callable returned without completing handshake."


def quiet_refused_handshakes() -> None:
    """Install :class:`RefusedHandshakeFilter` on uvicorn's error logger (once)."""
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, RefusedHandshakeFilter) for f in logger.filters):
        logger.addFilter(RefusedHandshakeFilter())


def provide_principal(scope: Scope) -> Principal:
    """The caller (set by :class:`AuthMiddleware`)."""
    return cast("Principal", cast("dict[str, Any]", scope).get("user", ANONYMOUS))


AUTH_MIDDLEWARE = DefineMiddleware(AuthMiddleware, exclude=["^/schema", "^/metrics"])
PRINCIPAL = Provide(provide_principal, sync_to_thread=False)
