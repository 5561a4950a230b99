"""``python -m service``: start the service on its settings and print the demo page URL.

``python -m service token --sub alice`` prints a bearer JWT for local testing instead (it needs
``SERVICE_JWT_SECRET``; a real deployment's tokens come from its identity provider).
"""

from __future__ import annotations

import argparse
import sys

import uvicorn

from service.security import AuthError, dev_token
from service.settings import Settings, SettingsError


def main(argv: list[str] | None = None) -> None:
    """Validate settings, then serve (printing where the demo page is) or mint a development token."""
    parser = argparse.ArgumentParser(prog="python -m service", description="The chat service.")
    commands = parser.add_subparsers(dest="command")
    commands.add_parser("serve", help="start the service (the default)")
    token = commands.add_parser("token", help="print a bearer JWT for local testing (needs SERVICE_JWT_SECRET)")
    token.add_argument("--sub", required=True, help="the subject (the user the token speaks for)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    args = parser.parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "token":
            print(dev_token(settings, args.sub, args.ttl))
            return
    except (SettingsError, AuthError) as exc:
        sys.exit(f"error: {exc}")
    print(f"Chat service: demo page at http://{settings.host}:{settings.port}/  (API docs at /schema)", flush=True)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        http="service.api.http_protocol:HttpProtocol",
        ws="service.api.ws_protocol:WebSocketProtocol",
        ws_max_size=1024 * 1024,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


if __name__ == "__main__":
    main()
