"""``python -m service``: start the service on its settings and print the demo page URL."""

from __future__ import annotations

import sys

import uvicorn

from service.settings import Settings, SettingsError


def main() -> None:
    """Validate settings, print where the demo page is, and serve."""
    try:
        settings = Settings.from_env()
    except SettingsError as exc:
        sys.exit(f"error: {exc}")
    print(f"Chat service: demo page at http://{settings.host}:{settings.port}/  (API docs at /schema)", flush=True)
    uvicorn.run(
        "service.app:create_app",
        factory=True,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        ws_max_size=1024 * 1024,
        ws_per_message_deflate=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s) + 5,
    )


if __name__ == "__main__":
    main()
