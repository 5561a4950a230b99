"""``python -m service`` (or ``chat-service``): the service's command line.

``serve`` (the default) starts the service on its settings and prints the demo page URL; ``migrate``
brings the database to the current schema; ``check-config`` validates the environment and exits;
``token --sub alice`` prints a bearer JWT for local testing (it needs ``SERVICE_JWT_SECRET``; a real
deployment's tokens come from its identity provider). Settings come from ``SERVICE_*`` environment
variables only; ``--help`` lists them, each with its default.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import sys
import textwrap
from typing import cast

import msgspec
import uvicorn
from sqlalchemy.engine import make_url

from service.security import AuthError, dev_token
from service.settings import Settings, SettingsError


def settings_help() -> str:
    """Every setting as its environment variable, its default and its docstring (read from ``Settings``' source)."""
    described: dict[str, str] = {}
    body = ast.parse(textwrap.dedent(inspect.getsource(Settings))).body[0]
    assert isinstance(body, ast.ClassDef)  # noqa: S101 - the source of a class
    for field, after in zip(body.body, body.body[1:], strict=False):
        docstring = after.value.value if isinstance(after, ast.Expr) and isinstance(after.value, ast.Constant) else None
        if isinstance(docstring, str) and isinstance(field, ast.AnnAssign) and isinstance(field.target, ast.Name):
            described[field.target.id] = " ".join(docstring.split())
    defaults = msgspec.structs.asdict(Settings())
    lines = ["settings (environment variables):"]
    for name in Settings.__struct_fields__:
        default = defaults[name]
        if isinstance(default, tuple):
            shown = ",".join(str(item) for item in cast("tuple[object, ...]", default))
        else:
            shown = "" if default is None else str(default)
        lines.append(f"  SERVICE_{name.upper()}={shown}")
        if name in described:
            lines += textwrap.wrap(described[name], width=96, initial_indent="      ", subsequent_indent="      ")
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    """The command line: ``serve`` (default), ``migrate``, ``check-config``, ``token``."""
    root = argparse.ArgumentParser(
        prog="python -m service",
        description="The chat service. Settings are read from the environment only.",
        epilog=settings_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    commands = root.add_subparsers(dest="command")
    commands.add_parser("serve", help="start the service (the default)")
    commands.add_parser("migrate", help="bring SERVICE_DATABASE_URL to the current schema and exit")
    commands.add_parser("check-config", help="validate the SERVICE_* environment and exit (status 1 if it is wrong)")
    token = commands.add_parser("token", help="print a bearer JWT for local testing (needs SERVICE_JWT_SECRET)")
    token.add_argument("--sub", required=True, help="the subject (the user the token speaks for)")
    token.add_argument("--ttl", type=float, default=3600.0, help="lifetime in seconds (default 3600)")
    return root


def main(argv: list[str] | None = None) -> None:
    """Validate the settings, then run the command."""
    args = parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        if args.command == "token":
            print(dev_token(settings, args.sub, args.ttl))
            return
    except (SettingsError, AuthError) as exc:
        sys.exit(f"error: {exc}")
    if args.command == "check-config":
        runs = "redis" if settings.redis_url else "in memory"
        print(f"settings are valid: database {_masked(settings.database_url)}, runs {runs}, auth {settings.auth}")
        return
    if args.command == "migrate":
        from service.store.sql import migrate

        migrate(settings.database_url)
        print(f"migrated {_masked(settings.database_url)}")
        return
    serve(settings)


def _masked(url: str) -> str:
    return make_url(url).render_as_string(hide_password=True)


def serve(settings: Settings) -> None:
    """Start uvicorn with the service's protocol classes (printing where the demo page is, in the text format)."""
    if settings.log_format == "text":  # a JSON log is read by a collector: no line but JSON objects
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
