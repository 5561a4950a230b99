"""Requests must name this service: the ``Host`` allow-list and JSON-only bodies (DNS rebinding, CSRF).

"It only listens on 127.0.0.1" does not stop a page on another site: DNS rebinding points a name
the attacker controls at 127.0.0.1, and the browser then sends ``Host: rebind.evil`` to the service;
a cross-site ``<form enctype="text/plain">`` can POST a body that parses as JSON without a CORS
preflight. So:

- :class:`HostMiddleware` answers 400 ``invalid_host`` (HTTP and WebSocket handshakes alike) unless
  the ``Host`` header, without its port, is on the allow-list: Litestar's allowed-hosts patterns
  (``*.example.com`` for subdomains, ``*`` for any), matched without the port, answered in the
  service's error shape;
- :func:`require_json_body` answers 415 ``unsupported_media_type`` to any request to a handler that
  takes a JSON body unless its ``Content-Type`` is ``application/json`` (or ``application/*+json``):
  the types a form can send are never accepted; a JSON body that nests deeper than
  ``SERVICE_MAX_JSON_DEPTH`` levels is refused with 400 before it is decoded
  (:mod:`service.api.nesting`).
"""

from __future__ import annotations

import re
from typing import Any, cast

import msgspec
from litestar import Request
from litestar.config.allowed_hosts import AllowedHostsConfig
from litestar.exceptions import HTTPException
from litestar.middleware.allowed_hosts import AllowedHostsMiddleware
from litestar.types import ASGIApp, Receive, Scope, Send

from service import errors
from service.api.auth import refuse_handshake
from service.api.nesting import nests_deeper
from service.errors import ErrorBody, ErrorEnvelope
from service.settings import Settings, is_loopback

LOOPBACK_NAMES = ("127.0.0.1", "localhost", "[::1]")


def allowed_hosts(settings: Settings) -> list[str]:
    """The configured allow-list, or by default the loopback names (and the bound name, if specific)."""
    if settings.allowed_hosts:
        return list(settings.allowed_hosts)
    if settings.host in ("0.0.0.0", "::", ""):  # noqa: S104 - a wildcard bind: nothing to infer
        return ["*"]
    bound = f"[{settings.host}]" if ":" in settings.host else settings.host
    return [*LOOPBACK_NAMES, *([] if is_loopback(settings.host) else [bound])]


class HostMiddleware(AllowedHostsMiddleware):
    """Litestar's allowed hosts, matched on the host without its port, refused in the service's error shape."""

    def __init__(self, app: ASGIApp, hosts: list[str]) -> None:
        super().__init__(app, AllowedHostsConfig(allowed_hosts=hosts, www_redirect=False))

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:  # noqa: D102
        pattern = cast("re.Pattern[str] | None", self.allowed_hosts_regex)  # pyright: ignore[reportUnknownMemberType]
        if pattern is None or pattern.fullmatch(_host_of(scope)):
            await self.app(scope, receive, send)
            return
        refusal = errors.InvalidRequestError(
            "the Host header names no host this service answers for", code="invalid_host"
        )
        if scope["type"] == "websocket":
            await refuse_handshake(scope, send, refusal)
            return
        body = msgspec.json.encode(ErrorEnvelope(ErrorBody(refusal.code, refusal.message, {})))
        headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
        await send(cast("Any", {"type": "http.response.start", "status": 400, "headers": headers}))
        await send(cast("Any", {"type": "http.response.body", "body": body}))


def _host_of(scope: Scope) -> str:
    """The one ``Host`` header without its port; "" when there is none or more than one (RFC 9112: 400)."""
    hosts = [value for name, value in scope["headers"] if name == b"host"]
    if len(hosts) != 1:
        return ""
    host = hosts[0].decode("latin-1")
    if host.startswith("["):  # [::1]:8000
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


async def require_json_body(request: Request[Any, Any, Any]) -> None:
    """``before_request`` of handlers that take a JSON body: 415 unless it says it is JSON, 400 if it nests too deep.

    The depth is measured before the handler's decode, which recurses once per level.
    """
    if "data" not in request.route_handler.parsed_fn_signature.parameters:
        return
    media_type = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    if media_type != "application/json" and not (
        media_type.startswith("application/") and media_type.endswith("+json")
    ):
        raise HTTPException(
            status_code=415,
            detail=f"the body must be JSON (Content-Type: application/json), not {media_type or 'unlabelled'}",
        )
    limit = cast("Settings", request.app.state.settings).max_json_depth
    if nests_deeper(await request.body(), limit):  # the body is kept: the handler's decode reads it again
        raise errors.InvalidRequestError(
            f"the body nests arrays and objects deeper than {limit} levels", detail={"field": None, "max_depth": limit}
        )
