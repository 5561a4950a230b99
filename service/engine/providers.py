"""Upstream providers: any OpenAI-compatible endpoint, addressed as ``provider/model``.

Sources, merged in this order:

1. ``demo``: always there, the in-process demo model (model id ``demo``);
2. ``openai``: from ``SERVICE_OPENAI_BASE_URL`` / ``SERVICE_OPENAI_API_KEY``;
3. the JSON or TOML file named by ``SERVICE_PROVIDERS``::

       {"providers": {"local": {"base_url": "http://127.0.0.1:11434/v1",
                                "api_key_env": "LOCAL_KEY", "models": ["llama3"],
                                "timeout_s": 30, "max_retries": 1}}}

A provider's models (``GET /v1/models``) are its ``models`` list when the config has one; otherwise
the provider's own ``GET /v1/models``, asked through its SDK client (its auth, base URL, timeout and
retries) and kept for ``SERVICE_MODELS_CACHE_S``. Callers that arrive while a fetch is under way
share it. A fetch that fails is logged and leaves the provider out of the list for at most
``_FAILED_LIST_S`` (runs are unaffected: a provider without a ``models`` list routes any name).
``provider/*`` is no model: it is never listed, and a chat or run naming it is refused.

Keys stay inside ``AsyncOpenAI`` clients: nothing here renders them.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import time
import tomllib
import urllib.request
from pathlib import Path
from typing import Any

import httpx2
import msgspec
import openai
from httpx2._client import USE_CLIENT_DEFAULT, BoundAsyncStream, UseClientDefault
from httpx2._exceptions import request_context
from httpx2._types import AuthTypes
from openai._models import FinalRequestOptions

from service.engine.demo import DemoTransport
from service.engine.transport import UpstreamTransport
from service.engine.upstream_errors import upstream_detail
from service.settings import Settings

log = logging.getLogger("service.engine")


class UnknownModelError(LookupError):
    """A model id that names no configured provider or model."""


DEMO_MODEL = "demo"
"""The model id of the built-in demo model (provider ``demo``)."""
OTHER_LABEL = "other"
"""The metrics' label value for a provider or model name that is not configured."""
WILDCARD = "*"
"""Not a model name: what ``GET /v1/models`` once showed for a provider without a ``models`` list."""
_FAILED_LIST_S = 30.0
"""How long a provider whose model list could not be fetched stays out of the list (at most the cache time)."""


class ProviderConfigError(ValueError):
    """The providers file is unreadable or malformed; the message names the problem."""


class ProviderConfig(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """One upstream, as written in the providers file."""

    base_url: str
    api_key: str | None = None
    api_key_env: str | None = None
    models: list[str] = msgspec.field(default_factory=list[str])
    """Model names served; empty accepts any name (``provider/anything``)."""
    timeout_s: float | None = None
    max_retries: int | None = None


class _ProvidersFile(msgspec.Struct, forbid_unknown_fields=True):
    providers: dict[str, ProviderConfig]


_MAX_TEMPLATES = 64
"""Request templates kept per client (one per URL, retry count and timeout in practice)."""


class UpstreamClient(openai.AsyncOpenAI):
    """``AsyncOpenAI`` that builds each streamed completion's request options and HTTP request from templates.

    Per request the SDK builds its options (``post`` runs ``FinalRequestOptions.construct``, which
    deep-copies every field's default: ~35 µs) and then the HTTP request (``_build_request`` merges
    headers, base URL, query and timeout and parses the URL twice: ~300 µs), the same every time
    for a given client, since only the body changes from one run's request to the next. Here
    ``stream_post`` copies a template of the options (~4 µs) and hands them to the SDK's own
    ``request``; the first HTTP request of a kind is built by the SDK, and the next ones reuse its
    method, URL, headers (without ``Content-Length``) and extensions with a new body, as a
    ``stream=`` request (~7 µs: ``content=`` would re-derive and re-normalize every header).
    Everything else is the SDK's: its retry loop (a retry is its own kind, for its
    ``x-stainless-retry-count``), auth hooks, typed errors, timeouts. A request the cache does not
    describe fully (custom headers, query, JSON or files instead of bytes, an idempotency header,
    cookies the upstream set) is built by the SDK as usual.
    """

    _templates: dict[tuple[object, ...], tuple[str, httpx2.URL, httpx2.Headers, dict[str, object]]]

    @property
    def user_agent(self) -> str:
        """The SDK's own (it names the client's class): upstreams see the same client as before."""
        return f"AsyncOpenAI/Python {self._version}"

    async def stream_post(self, path: str, content: bytes, idempotency_key: str) -> httpx2.Response:
        """``post(path, cast_to=httpx2.Response, content=..., stream=True)``, its options copied from a template."""
        options = _POST_OPTIONS.model_copy(update={"url": path, "content": content, "idempotency_key": idempotency_key})
        return await self.request(httpx2.Response, options, stream=True)

    def _build_request(self, options: FinalRequestOptions, *, retries_taken: int = 0) -> httpx2.Request:
        content = options.content
        if not isinstance(content, bytes) or (key := self._template_key(options, retries_taken)) is None:
            return super()._build_request(options, retries_taken=retries_taken)
        templates = self.__dict__.setdefault("_templates", {})  # (AsyncOpenAI's __init__ is left as it is)
        template = templates.get(key)
        if template is None:
            if len(templates) >= _MAX_TEMPLATES:  # e.g. a key provider that hands out a new key every time
                templates.clear()
            request = super()._build_request(options, retries_taken=retries_taken)
            headers = httpx2.Headers([(k, v) for k, v in request.headers.raw if k.lower() != b"content-length"])
            templates[key] = (request.method, request.url, headers, dict(request.extensions))
            return request
        method, url, template_headers, extensions = template
        headers = httpx2.Headers(template_headers)  # a copy of the list, nothing re-normalized
        headers["Content-Length"] = str(len(content))  # last, where the SDK's request has it
        request = httpx2.Request(method, url, headers=headers, stream=httpx2.ByteStream(content), extensions=extensions)
        request.read()
        return request

    def _template_key(self, options: FinalRequestOptions, retries_taken: int) -> tuple[object, ...] | None:
        """What the SDK's request depends on besides the body; None when a template cannot stand for it."""
        if (
            options.headers
            or options.params
            or options.json_data is not None
            or options.extra_json is not None
            or options.files is not None
            or self._idempotency_header
            or self._client.cookies
        ):
            return None
        security = tuple(sorted(options.security.items())) if options.security else ()
        return (
            options.method,
            options.url,
            retries_taken,
            repr(options.timeout),
            repr(self.timeout),
            security,
            self.api_key,
            self.base_url,
        )


_POST_OPTIONS = FinalRequestOptions.construct(method="post", url="/", json_data=None, content=b"", files=None)
"""What ``post(path, content=...)`` constructs; ``model_copy`` makes each request's (the SDK copies its options
shallowly too, once per request and once per try, so it never mutates them in place)."""


class UpstreamHttpClient(openai.DefaultAsyncHttpxClient):
    """The SDK's HTTP client (its defaults), handing a request straight to its transport when nothing is in between.

    ``AsyncClient.send`` goes through auth, redirect and hook handling before the transport:
    ~20 µs per request, for nothing when the client has no auth, no hooks and no mounts. That
    case is done here as ``_send_single_request`` does it (the response bound to its request and
    start time, cookies kept, the default encoding, the INFO line); a redirect is followed by
    ``send`` from its next request, and a client with auth, hooks or mounts sends everything
    through ``send``. (httpx2 private names used: ``BoundAsyncStream``, ``request_context``,
    ``_build_redirect_request``; ``tests/unit/test_upstream_client.py`` compares both sends.)
    """

    async def send(  # noqa: D102
        self,
        request: httpx2.Request,
        *,
        stream: bool = False,
        auth: AuthTypes | UseClientDefault | None = USE_CLIENT_DEFAULT,
        follow_redirects: bool | UseClientDefault = USE_CLIENT_DEFAULT,
    ) -> httpx2.Response:
        if auth is not USE_CLIENT_DEFAULT or not self._direct():
            return await super().send(request, stream=stream, auth=auth, follow_redirects=follow_redirects)
        start = time.perf_counter()
        with request_context(request=request):
            response = await self._transport.handle_async_request(request)
        response.request = request
        response.stream = BoundAsyncStream(response.stream, start=start)  # pyright: ignore[reportArgumentType]
        if "set-cookie" in response.headers:
            self.cookies.extract_cookies(response)
        response.default_encoding = self._default_encoding
        if _HTTP_LOG.isEnabledFor(logging.INFO):
            _HTTP_LOG.info(
                'HTTP Request: %s %s "%s %d %s"',
                request.method,
                request.url,
                response.http_version,
                response.status_code,
                response.reason_phrase,
            )
        if response.has_redirect_location:
            follow = self.follow_redirects if isinstance(follow_redirects, UseClientDefault) else follow_redirects
            try:
                redirect = self._build_redirect_request(request, response)
                if not follow:
                    response.next_request = redirect
                    return response
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
            followed = await super().send(redirect, stream=stream, auth=auth, follow_redirects=follow_redirects)
            followed.history = [response, *followed.history]
            return followed
        if not stream:
            try:
                await response.aread()
            except BaseException:
                await response.aclose()
                raise
        return response

    def _direct(self) -> bool:
        return not (self.is_closed or self._auth or self._mounts or any(self._event_hooks.values()))


_HTTP_LOG = logging.getLogger("httpx2")


class Provider:
    """A configured upstream, its SDK client, and its model list (see the module docstring)."""

    def __init__(self, name: str, config: ProviderConfig, client: UpstreamClient, *, cache_s: float) -> None:
        self.name = name
        self.config = config
        self.client = client
        self._cache_s = cache_s
        self._listed: list[str] = []
        self._listed_until = -math.inf
        self._listing: asyncio.Task[None] | None = None

    def accepts(self, model: str) -> bool:
        """Whether this provider serves ``model``."""
        return not self.config.models or model in self.config.models

    async def models(self) -> list[str]:
        """The models this provider serves: its configured list, else its own (cached) answer."""
        if self.config.models:
            return self.config.models
        if time.monotonic() >= self._listed_until:
            if self._listing is None:
                self._listing = asyncio.create_task(self._fetch_models(), name=f"list-models-{self.name}")
            await asyncio.shield(self._listing)  # a caller that goes away does not cancel the others' fetch
        return self._listed

    async def _fetch_models(self) -> None:
        try:
            listed = [model.id async for model in self.client.models.list()]
            self._listed = [m for m in dict.fromkeys(listed) if m and m != WILDCARD]
            self._listed_until = time.monotonic() + self._cache_s
        except Exception as exc:  # whatever the upstream did, the list goes on without it
            wait = min(_FAILED_LIST_S, self._cache_s)
            log.warning(
                "provider %s: could not list its models (%s); left out of GET /v1/models for %g s",
                self.name,
                upstream_detail(exc),
                wait,
            )
            self._listed, self._listed_until = [], time.monotonic() + wait
        finally:
            self._listing = None


class ProviderRegistry:
    """Resolves model ids to an SDK client and the upstream's model name."""

    def __init__(self, settings: Settings) -> None:
        self.default_model = settings.default_model
        self._providers: dict[str, Provider] = {}
        if settings.demo_enabled:  # by default, off once a real upstream is configured
            demo = UpstreamClient(
                base_url="http://demo.invalid/v1",
                api_key="demo",
                max_retries=0,
                http_client=httpx2.AsyncClient(transport=DemoTransport(settings.demo_token_delay_ms / 1000)),
            )
            demo_config = ProviderConfig(base_url="demo", models=[DEMO_MODEL])
            self._providers["demo"] = Provider("demo", demo_config, demo, cache_s=settings.models_cache_s)
        configs: dict[str, ProviderConfig] = {}
        if settings.openai_base_url:
            configs["openai"] = ProviderConfig(base_url=settings.openai_base_url, api_key=settings.openai_api_key)
        if settings.providers:
            configs.update(load_providers_file(settings.providers))
        for name, config in configs.items():
            if name == "demo" or "/" in name:
                raise ProviderConfigError(f"provider name {name!r} is reserved or contains '/'")
            client = UpstreamClient(
                base_url=config.base_url,
                api_key=_api_key(name, config),
                timeout=config.timeout_s if config.timeout_s is not None else settings.upstream_timeout_s,
                max_retries=config.max_retries if config.max_retries is not None else settings.upstream_max_retries,
                http_client=_http_client(),
            )
            self._providers[name] = Provider(name, config, client, cache_s=settings.models_cache_s)

    def resolve(self, model_id: str | None) -> tuple[str, UpstreamClient, str]:
        """``(model id, client, upstream model name)`` for a model id; raises ``UnknownModelError``."""
        model_id = model_id or self.default_model
        if model_id == "demo" and "demo" in self._providers:
            return model_id, self._providers["demo"].client, "demo"
        name, _, model = model_id.partition("/")
        if model == WILDCARD:
            raise UnknownModelError(
                f"{model_id!r} is a wildcard, not a model: name one of the models GET /v1/models lists"
            )
        provider = self._providers.get(name)
        if provider is None or name == "demo" or not model or not provider.accepts(model):
            raise UnknownModelError(f"unknown model {model_id!r}; GET /v1/models lists the available ones")
        return model_id, provider.client, model

    def metric_labels(self, model_id: str | None) -> tuple[str, str]:
        """``(provider, model)`` labels of a model id: configured names only, anything else ``other``.

        Bounds the metrics' label values: a provider that accepts any model name (no ``models``
        list) counts them all as ``provider/other``, and an unknown provider as ``other/other``.
        """
        model_id = model_id or self.default_model
        if model_id == DEMO_MODEL:
            return DEMO_MODEL, DEMO_MODEL
        name, _, model = model_id.partition("/")
        provider = self._providers.get(name)
        if provider is None or name == DEMO_MODEL:
            return OTHER_LABEL, OTHER_LABEL
        return name, model if model in provider.config.models else OTHER_LABEL

    async def list_models(self) -> list[tuple[str, str]]:
        """``(model id, provider)`` pairs for ``GET /v1/models``, each provider's fetched concurrently."""
        providers = list(self._providers.values())
        lists = await asyncio.gather(*(provider.models() for provider in providers))
        return [
            (model if provider.name == DEMO_MODEL else f"{provider.name}/{model}", provider.name)
            for provider, models in zip(providers, lists, strict=True)
            for model in models
        ]

    def secrets(self) -> list[str]:
        """The upstreams' API keys and base URLs (for their passwords), to be kept out of log lines."""
        return [value for p in self._providers.values() for value in (p.client.api_key, p.config.base_url)]

    async def close(self) -> None:
        """Close every client's connection pool."""
        for provider in self._providers.values():
            await provider.client.close()


def load_providers_file(path: str) -> dict[str, ProviderConfig]:
    """Read a providers file (``.toml`` or JSON)."""
    try:
        raw = Path(path).read_bytes()
        data: Any = tomllib.loads(raw.decode()) if path.endswith(".toml") else msgspec.json.decode(raw)
        return msgspec.convert(data, _ProvidersFile).providers
    except (OSError, tomllib.TOMLDecodeError, msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise ProviderConfigError(f"SERVICE_PROVIDERS file {path}: {exc}") from exc


def _http_client() -> httpx2.AsyncClient | None:
    """The SDK's HTTP client on ``UpstreamTransport`` (far less CPU per streamed read, see its module).

    None (the SDK's own client) when a proxy is configured in the environment, which that transport
    does not speak.
    """
    if urllib.request.getproxies():
        return None
    return UpstreamHttpClient(transport=UpstreamTransport())


def _api_key(name: str, config: ProviderConfig) -> str:
    if config.api_key_env:
        key = os.environ.get(config.api_key_env)
        if key is None:
            raise ProviderConfigError(f"provider {name!r}: environment variable {config.api_key_env} is not set")
        return key
    return config.api_key or "unused"
