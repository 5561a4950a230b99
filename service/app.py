"""``create_app(settings)``: the only place the service is wired together.

Run it with ``python -m service`` or ``uvicorn service.app:create_app --factory``
(settings then come from ``SERVICE_*`` environment variables).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import AsyncGenerator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from litestar import Litestar, Request, Response
from litestar.config.cors import CORSConfig
from litestar.datastructures import State
from litestar.logging import LoggingConfig
from litestar.middleware import DefineMiddleware
from litestar.middleware.rate_limit import RateLimitConfig
from litestar.openapi import OpenAPIConfig
from litestar.openapi.plugins import ScalarRenderPlugin
from litestar.openapi.spec import Components
from litestar.plugins.prometheus import PrometheusConfig, PrometheusController
from litestar.static_files import create_static_files_router  # pyright: ignore[reportUnknownVariableType]

from service.api.ai_sdk import AiSdkChatController
from service.api.auth import AUTH_MIDDLEWARE, EXCLUDE_FROM_AUTH, SECURITY_SCHEMES, quiet_refused_handshakes
from service.api.chats import ChatController
from service.api.deps import DEPENDENCIES
from service.api.drain import DrainMiddleware, drain_on_exit_signal
from service.api.error_map import EXCEPTION_HANDLERS
from service.api.health import HealthController
from service.api.hosts import HostMiddleware, allowed_hosts, require_json_body
from service.api.http_metrics import StreamAwarePrometheusMiddleware
from service.api.models import CatalogController
from service.api.runs import RunController
from service.api.ws import chat_socket, create_ws_token
from service.engine.engine import ChatEngine
from service.engine.providers import ProviderRegistry
from service.engine.tools import ToolCatalog
from service.log_format import logging_plugins
from service.logs import add_secrets, install_redaction, quiet_dropped_streams
from service.metrics import SKIP_HTTP_METRICS, forget_dead_workers
from service.openapi import OpenAPIJsonPlugin
from service.runs.base import RunBackend
from service.runs.journal import RunJournal
from service.runs.manager import RunLimits, RunManager
from service.runs.memory import MemoryRunBackend
from service.runs.solo import SharedDatabaseError, SoloLock
from service.security import ANONYMOUS, Authenticator, Principal
from service.settings import Settings
from service.store.sql import SqlChatStore

if TYPE_CHECKING:
    from service.engine.mcp import McpHub

WEB_DIR = Path(__file__).parent / "web"
API_DESCRIPTION = """One chat engine behind two transports: request-bound SSE (`POST /v1/chats/{chat_id}/runs/stream`,
or `POST /v1/chats/{chat_id}/runs` with `Accept: text/event-stream`), resumable SSE (`GET /v1/runs/{run_id}/stream`;
`GET /v1/runs/{run_id}/events` for `EventSource`, which a finished run answers `204`), and a multiplexed
WebSocket at `/v1/ws` (described in `openapi/asyncapi.yaml`); the Vercel AI SDK's chat protocol
(`DefaultChatTransport`) at `/v1/ai-sdk/chat` runs on the same runs. Every error has the shape
`{"error": {"code", "message", "detail"}}`. Clients must ignore event types they do not know."""


# redis and mcp are imported only when configured: each costs about 14 MB of resident memory.


def _run_backend(settings: Settings) -> RunBackend:
    if settings.redis_url:
        from service.runs.redis import RedisRunBackend

        return RedisRunBackend(
            settings.redis_url,
            prefix=settings.redis_prefix,
            retention_s=settings.run_retention_s,
            max_events_per_run=settings.max_events_per_run,
            outage_s=settings.runs_outage_s,
        )
    return MemoryRunBackend(
        retention_s=settings.run_retention_s,
        max_events_per_run=settings.max_events_per_run,
        max_finished_bytes=settings.max_finished_run_bytes,
    )


def _mcp_hub(settings: Settings) -> McpHub | None:
    if not settings.mcp_servers:
        return None
    from service.engine.mcp import McpHub, load_mcp_config

    return McpHub(load_mcp_config(settings.mcp_servers))


def _rate_limit(settings: Settings) -> list[Any]:
    """Litestar's rate limit, keyed by the caller's subject: with auth on only (with it off, all share one)."""
    if settings.auth != "jwt" or not settings.rate_limit_per_minute:
        return []
    config = RateLimitConfig(
        rate_limit=("minute", settings.rate_limit_per_minute),
        identifier_for_request=_subject_of,
        exclude=["^/healthz$", "^/readyz$", "^/metrics", "^/schema"],
    )
    return [config.middleware]


def _subject_of(request: Request[Any, Any, Any]) -> str:
    return cast("Principal", cast("dict[str, Any]", request.scope).get("user", ANONYMOUS)).owner or "anonymous"


GC_THRESHOLDS = (50_000, 20, 100)
"""Young collections every 50k allocations (CPython's default: 700); full ones a hundredth as often."""


def tune_gc() -> None:
    """Freeze what start-up loaded out of the cyclic GC and collect young objects less often.

    A streaming service allocates a few tracked objects per event and holds thousands of live
    streams; with CPython's default thresholds, collections took 11-15 % of the CPU in the bench's
    scenario (iii) and each full one paused the loop 80-150 ms (the inter-event gap p99 was
    150-230 ms; with these thresholds 65-70 ms). Most garbage here is freed by reference counting;
    the cycles left (tasks, exceptions with tracebacks) wait a little longer.
    """
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


PAGE_HEADERS = {
    # Scripts, styles and connections from this origin only (no inline script, no other host);
    # 'self' covers the page's own ws:/wss: URL.
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; connect-src 'self'; "
        "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
}
"""Headers of the demo page's files."""


def _page_headers(response: Response[Any]) -> Response[Any]:
    response.headers.update(PAGE_HEADERS)
    return response


def create_app(settings: Settings | None = None) -> Litestar:
    """Build the service from ``settings`` (default: read from the environment)."""
    settings = settings or Settings.from_env()
    install_redaction()
    quiet_dropped_streams()
    providers = ProviderRegistry(settings)
    store = SqlChatStore(settings.database_url)
    hub = _mcp_hub(settings)
    add_secrets(settings.secrets())
    add_secrets(providers.secrets())
    if hub is not None:
        add_secrets(hub.secrets())
    tools = ToolCatalog(timeout_s=settings.tool_timeout_s, max_output_chars=settings.tool_max_output_chars, mcp=hub)
    engine = ChatEngine(providers, max_tool_rounds=settings.max_tool_rounds)
    runs = RunManager(
        engine=engine,
        backend=_run_backend(settings),
        store=store,
        tools=tools,
        shutdown_grace_s=settings.shutdown_grace_s,
        final_write_retry_s=settings.final_write_retry_s,
        outage_s=settings.runs_outage_s,
        limits=RunLimits(
            max_active_runs=settings.max_active_runs_per_subject,
            token_budget=settings.token_budget,
            budget_window_s=settings.token_budget_window_s,
            max_history_chars=settings.max_history_chars,
        ),
        # in-memory runs keep their records in the store, so a restart answers for them (decision 67)
        journal=None if settings.redis_url else RunJournal(store, interval_s=settings.checkpoint_interval_s),
    )
    auth = Authenticator(settings)
    quiet_refused_handshakes()

    solo = None if settings.redis_url else SoloLock(settings.database_url)

    @asynccontextmanager
    async def lifespan(_: Litestar) -> AsyncGenerator[None]:
        forget_dead_workers()
        await store.start()
        if solo is not None:  # in-memory runs: no other process may serve this database
            try:
                await solo.acquire()
            except SharedDatabaseError:
                await store.close()
                raise
        await tools.start()
        await runs.start()
        exit_signal = asyncio.create_task(drain_on_exit_signal(runs.begin_drain))
        tune_gc()
        try:
            yield
        finally:
            exit_signal.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await exit_signal
            await runs.close()
            await tools.close()
            await store.close()
            if solo is not None:
                await solo.release()
            await providers.close()

    route_handlers: list[object] = [
        HealthController,
        ChatController,
        RunController,
        AiSdkChatController,
        CatalogController,
        chat_socket,
        create_ws_token,
        PrometheusController,
    ]
    if (WEB_DIR / "index.html").exists():
        route_handlers.append(
            create_static_files_router(
                path="/",
                directories=[WEB_DIR],
                html_mode=True,
                name="web",
                opt=EXCLUDE_FROM_AUTH,
                after_request=_page_headers,
            )
        )
    return Litestar(
        route_handlers=route_handlers,  # type: ignore[arg-type]
        dependencies=DEPENDENCIES,
        exception_handlers=EXCEPTION_HANDLERS,
        lifespan=[lifespan],
        state=State(
            {"settings": settings, "providers": providers, "store": store, "tools": tools, "runs": runs, "auth": auth}
        ),
        middleware=[
            DefineMiddleware(HostMiddleware, hosts=allowed_hosts(settings)),
            DefineMiddleware(DrainMiddleware, begin_drain=runs.begin_drain),
            PrometheusConfig(
                app_name="chat_service",
                group_path=True,
                exclude_opt_key=SKIP_HTTP_METRICS,
                middleware_class=StreamAwarePrometheusMiddleware,
            ).middleware,
            AUTH_MIDDLEWARE,
            *_rate_limit(settings),
        ],
        cors_config=CORSConfig(allow_origins=list(settings.allowed_origins)) if settings.allowed_origins else None,
        openapi_config=OpenAPIConfig(
            title="Chat service",
            version="0.1.0",
            description=API_DESCRIPTION,
            path="/schema",
            # The UI loads its scripts from a CDN: off when auth is on (the page's CSP allows no other host).
            render_plugins=[OpenAPIJsonPlugin()]
            if settings.auth == "jwt"
            else [ScalarRenderPlugin(), OpenAPIJsonPlugin()],
            use_handler_docstrings=True,
            components=Components(security_schemes=SECURITY_SCHEMES),
        ),
        logging_config=LoggingConfig(root={"level": settings.log_level.upper(), "handlers": ["queue_listener"]}),
        plugins=logging_plugins(settings.log_format, settings.log_level),
        request_max_body_size=2 * 1024 * 1024,
        before_request=require_json_body,
    )
