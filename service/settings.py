"""Settings: one frozen Struct, read from ``SERVICE_*`` environment variables, validated at start-up."""

from __future__ import annotations

import importlib.util
import ipaddress
import os
from collections.abc import Mapping
from typing import Literal, Self

import msgspec


class SettingsError(ValueError):
    """A setting has a bad value; the message names it."""


class Settings(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Every knob of the service. Each field is ``SERVICE_<NAME>`` in the environment."""

    host: str = "127.0.0.1"
    """Address ``python -m service`` binds to."""
    port: int = msgspec.field(default=8000)
    """Port ``python -m service`` binds to (0 picks a free one)."""
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["text", "json"] = "text"
    """``json``: every log line one JSON object (for a log collector); ``text`` is for a terminal."""

    database_url: str = "sqlite+aiosqlite:///service.db"
    """Chat store URL; a ``postgresql+asyncpg://`` URL switches to PostgreSQL."""
    redis_url: str | None = None
    """Redis URL for the run backend; unset keeps runs in this process's memory."""
    redis_prefix: str = "chat"
    """Prefix of every Redis key this service writes."""
    runs_outage_s: float = 30.0
    """How long runs and their readers wait for the run backend (Redis) to answer again before they give up."""

    default_model: str = "demo"
    """Model used when a chat or run names none."""
    openai_base_url: str | None = None
    """An OpenAI-compatible upstream, exposed as provider ``openai``."""
    openai_api_key: str | None = None
    providers: str | None = None
    """Path of a JSON or TOML file listing upstream providers."""
    upstream_timeout_s: float = 60.0
    """Read timeout for upstream requests (the SDK's ``timeout``)."""
    upstream_max_retries: int = 2
    """Retries the SDK makes before a stream starts."""
    models_cache_s: float = 300.0
    """How long a provider's own model list (its ``GET /v1/models``) is kept for ``GET /v1/models``."""
    demo_token_delay_ms: float = 15.0
    """Pause between the demo model's chunks, so the demo looks like streaming."""

    run_retention_s: float = 600.0
    """How long a finished run's events stay resumable."""
    max_events_per_run: int = 50_000
    """Events kept per run log; older ones are dropped past it."""
    max_finished_run_bytes: int = 256 * 1024 * 1024
    """Memory the memory backend's finished runs may hold; past it the oldest are dropped (410) early."""
    shutdown_grace_s: float = 10.0
    """On shutdown, how long running runs may finish before they are cancelled."""
    final_write_retry_s: float = 30.0
    """How long the end of a run retries storing its answer while the store is down (then `store_unavailable`)."""
    checkpoint_interval_s: float = 2.0
    """In-memory runs: how often running runs' partial answers are written to the store (what a crash may lose)."""

    sse_ping_s: float = 15.0
    """Heartbeat comment interval on idle SSE streams."""
    sse_retry_ms: int = 3000
    """``retry:`` sent to EventSource clients."""
    sse_send_timeout_s: float = 30.0
    """A client that accepts no data for this long is disconnected."""
    ai_sdk_resume_grace_s: float = 3.0
    """How long an AI SDK chat's run outlives its stream's disconnect (a resume within it keeps the run)."""

    ws_max_frame_bytes: int = 262_144
    """A WebSocket frame larger than this gets an ``error`` frame (the transport closes past 1 MiB)."""
    ws_frames_per_s: float = 500.0
    """Sustained client frames per second per socket."""
    ws_frame_burst: int = 1000
    """Frames a socket may send at once before the rate applies; past it the socket closes with 1008."""
    max_json_depth: int = 64
    """Levels of nested arrays and objects in a JSON body or WebSocket frame; deeper ones are refused unread."""
    allowed_origins: tuple[str, ...] = ()
    """Origins allowed to open the WebSocket, besides the service's own."""
    allowed_hosts: tuple[str, ...] = ()
    """``Host`` names the service answers for (``*.example.com``, ``*``); default: loopback names and ``host``."""

    auth: Literal["none", "jwt"] = "none"
    """``jwt`` requires a bearer JWT on every API call; ``none`` (local use) is refused off loopback."""
    allow_anonymous: bool = False
    """Let ``auth=none`` serve a non-loopback address (everyone then shares every chat)."""
    jwt_secret: str | None = None
    """Shared secret of HS256 tokens."""
    jwt_public_key: str | None = None
    """PEM public key (the text, or a file path) of RS256/ES256 tokens."""
    jwks_url: str | None = None
    """JWKS document with the token signers' public keys; fetched, cached, refetched on an unknown ``kid``."""
    jwks_cooldown_s: float = 30.0
    """Least time between two fetches of the JWKS caused by unknown ``kid`` values."""
    jwt_algorithm: Literal["HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384", "PS256"] | None = (
        None
    )
    """The one algorithm tokens must use (never read from the token); default HS256 with a secret, else RS256."""
    jwt_audience: str | None = None
    """Required ``aud`` claim (mandatory with ``auth=jwt``)."""
    jwt_issuer: str | None = None
    """Required ``iss`` claim, when set."""
    jwt_leeway_s: float = 10.0
    """Clock skew allowed on ``exp``/``nbf`` (at most 30 s)."""
    jwt_tenant_claim: str | None = None
    """Claim that names the subject's tenant; chats and runs are then owned by tenant and subject."""
    stream_token_ttl_s: float = 60.0
    """Lifetime of the tokens minted for EventSource and browser WebSockets (at most 60 s)."""
    stream_token_secret: str | None = None
    """Key that signs stream tokens; needed when several instances share runs (default: random per process)."""

    max_active_runs_per_subject: int = 16
    """Runs one subject may have running at once; one more answers 429 ``too_many_runs``."""
    rate_limit_per_minute: int = 600
    """API requests one subject (one client address with auth off) may make per minute; 0 turns it off."""
    token_budget: int = 0
    """Tokens (prompt + completion) one subject may use per ``token_budget_window_s``; 0 turns it off."""
    token_budget_window_s: float = 3600.0
    """The token budget's window."""
    max_content_parts: int = 64
    """Content parts (text and images) one user message may have."""
    max_history_chars: int = 1_000_000
    """Characters of a chat's history sent to the model each turn: older turns beyond it are left out."""
    schema_max_bytes: int = 131_072
    """Largest ``response_format`` JSON schema, encoded."""
    schema_max_depth: int = 20
    """Levels of nested subschemas in a ``response_format`` schema."""
    schema_max_properties: int = 5_000
    """Object properties in a ``response_format`` schema, in all."""
    schema_max_enum_values: int = 1_000
    """Enum values in a ``response_format`` schema, in all."""
    schema_max_string_chars: int = 120_000
    """Characters of property names, enum and const values in a ``response_format`` schema, in all."""
    demo: bool | None = None
    """Serve the offline ``demo`` model; default: only when no upstream is configured."""

    max_message_chars: int = 100_000
    """Longest user message accepted."""
    max_tool_rounds: int = 8
    """Model turns with tool calls allowed in one run."""
    tool_timeout_s: float = 30.0
    """Time limit for one tool call."""
    tool_max_output_chars: int = 20_000
    """A tool result longer than this is an error result."""
    mcp_servers: str | None = None
    """Path of a JSON file naming the MCP servers this service may use (the allow-list)."""

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Self:
        """Read ``SERVICE_*`` variables; a misspelt name or a bad value raises ``SettingsError``."""
        env = os.environ if env is None else env
        raw: dict[str, object] = {}
        for key, value in env.items():
            if not key.startswith("SERVICE_") or key.startswith("SERVICE_TEST_"):
                continue
            name = key.removeprefix("SERVICE_").lower()
            if name not in cls.__struct_fields__:
                raise SettingsError(f"unknown setting {key} (see service/settings.py for the names)")
            lists = ("allowed_origins", "allowed_hosts")
            raw[name] = [v.strip() for v in value.split(",") if v.strip()] if name in lists else value
        try:
            settings = msgspec.convert(raw, cls, strict=False)
        except msgspec.ValidationError as exc:
            raise SettingsError(f"invalid setting: {_env_name(str(exc))}") from exc
        settings.check()
        return settings

    def check(self) -> None:
        """Reject values that type-check but make no sense."""
        positive = (
            "upstream_timeout_s",
            "models_cache_s",
            "run_retention_s",
            "runs_outage_s",
            "checkpoint_interval_s",
            "max_events_per_run",
            "max_finished_run_bytes",
            "sse_ping_s",
            "sse_send_timeout_s",
            "ws_max_frame_bytes",
            "ws_frames_per_s",
            "ws_frame_burst",
            "max_json_depth",
            "max_message_chars",
            "max_tool_rounds",
            "tool_timeout_s",
            "tool_max_output_chars",
            "stream_token_ttl_s",
            "max_active_runs_per_subject",
            "token_budget_window_s",
            "max_content_parts",
            "max_history_chars",
            "schema_max_bytes",
            "schema_max_depth",
            "schema_max_properties",
            "schema_max_enum_values",
            "schema_max_string_chars",
        )
        for name in positive:
            if getattr(self, name) <= 0:
                raise SettingsError(f"invalid setting: SERVICE_{name.upper()} must be > 0")
        if not 1000 <= self.sse_retry_ms <= 60_000:
            raise SettingsError("invalid setting: SERVICE_SSE_RETRY_MS must be within 1000..60000")
        for name in ("upstream_max_retries", "demo_token_delay_ms", "shutdown_grace_s", "final_write_retry_s"):
            if getattr(self, name) < 0:
                raise SettingsError(f"invalid setting: SERVICE_{name.upper()} cannot be negative")
        if self.rate_limit_per_minute < 0 or self.token_budget < 0:
            raise SettingsError(
                "invalid setting: SERVICE_RATE_LIMIT_PER_MINUTE and SERVICE_TOKEN_BUDGET cannot be negative"
            )
        if self.default_model.endswith("/*"):
            raise SettingsError(
                f"invalid setting: SERVICE_DEFAULT_MODEL={self.default_model} is a wildcard, not a model: "
                "name one of the provider's models (provider/model)"
            )
        if not self.demo_enabled and self.default_model == "demo":
            raise SettingsError(
                "SERVICE_DEFAULT_MODEL is demo but the demo model is off (an upstream is configured): name one of "
                "the upstream's models (provider/model), or set SERVICE_DEMO=true"
            )
        self._check_auth()
        self._check_extras()

    def secrets(self) -> list[str | None]:
        """Configured values that must never reach a log line (of the URLs, their passwords)."""
        return [self.openai_api_key, self.jwt_secret, self.stream_token_secret, self.database_url, self.redis_url]

    @property
    def demo_enabled(self) -> bool:
        """Whether the ``demo`` model is served: as configured, else only without an upstream."""
        if self.demo is not None:
            return self.demo
        return not (self.openai_base_url or self.providers)

    def _check_auth(self) -> None:
        if not 0 <= self.jwt_leeway_s <= 30:
            raise SettingsError("invalid setting: SERVICE_JWT_LEEWAY_S must be within 0..30")
        if self.stream_token_ttl_s > 60:
            raise SettingsError("invalid setting: SERVICE_STREAM_TOKEN_TTL_S must be at most 60")
        if self.auth == "none":
            if not self.allow_anonymous and not is_loopback(self.host):
                raise SettingsError(
                    f"SERVICE_HOST={self.host} is not a loopback address and SERVICE_AUTH=none: anyone who can reach "
                    "it could read and delete every chat. Set SERVICE_AUTH=jwt (see the README), or "
                    "SERVICE_ALLOW_ANONYMOUS=true if that is really wanted"
                )
            return
        keys = [name for name in ("jwt_secret", "jwt_public_key", "jwks_url") if getattr(self, name)]
        if len(keys) != 1:
            raise SettingsError(
                "SERVICE_AUTH=jwt needs exactly one of SERVICE_JWT_SECRET, SERVICE_JWT_PUBLIC_KEY, SERVICE_JWKS_URL"
            )
        if not self.jwt_audience:
            raise SettingsError("SERVICE_AUTH=jwt needs SERVICE_JWT_AUDIENCE (the aud claim tokens must carry)")
        symmetric = self.algorithm.startswith("HS")
        if symmetric != bool(self.jwt_secret):
            raise SettingsError(
                "SERVICE_JWT_ALGORITHM: HS* algorithms go with SERVICE_JWT_SECRET, the others with a public key or JWKS"
            )
        if self.redis_url and not self.stream_token_secret:
            raise SettingsError(
                "SERVICE_AUTH=jwt with SERVICE_REDIS_URL needs SERVICE_STREAM_TOKEN_SECRET (shared by the instances)"
            )

    def _check_extras(self) -> None:
        """A setting that needs an optional package names the extra that installs it."""
        needs = (
            (self.redis_url, "SERVICE_REDIS_URL", "redis", "redis"),
            (self.database_url.startswith("postgresql"), "a PostgreSQL SERVICE_DATABASE_URL", "asyncpg", "postgres"),
            (self.mcp_servers, "SERVICE_MCP_SERVERS", "mcp", "mcp"),
        )
        for configured, setting, module, extra in needs:
            if configured and not _installed(module):
                raise SettingsError(
                    f"{setting} needs the {module} package, which is not installed: pip install 'chat-service[{extra}]'"
                )

    @property
    def algorithm(self) -> str:
        """The JWT algorithm in force."""
        return self.jwt_algorithm or ("HS256" if self.jwt_secret else "RS256")


def is_loopback(host: str) -> bool:
    """Whether ``host`` (a name or address) only accepts connections from this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _installed(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:
        return False


def _env_name(message: str) -> str:
    """Rewrite msgspec's ``- at `$.port``` to name the environment variable."""
    head, sep, path = message.rpartition(" - at `$.")
    if not sep:
        return message
    field = path.rstrip("`").split(".")[0].split("[")[0]
    return f"SERVICE_{field.upper()}: {head}"
