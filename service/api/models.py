"""``/v1/models`` and ``/v1/tools``: what a chat can use."""

from __future__ import annotations

from litestar import Controller, get
from litestar.di import NamedDependency

from service.api.auth import BEARER
from service.api.schemas import ModelList, ModelOut
from service.engine.providers import ProviderRegistry
from service.engine.tools import ToolCatalog, ToolSpec


class CatalogController(Controller):
    """Models and tools."""

    path = "/v1"
    tags = ["catalog"]
    security = BEARER

    @get("/models", operation_id="ListModels")
    async def list_models(self, providers: NamedDependency[ProviderRegistry]) -> ModelList:
        """Model ids usable in `model` fields: `demo` and `provider/model` for each configured upstream.

        A provider's models are the list it is configured with, else the provider's own model list
        (kept for a few minutes). A provider whose list cannot be fetched is left out (and logged); a
        provider without a configured list still accepts any model name in `model` fields.
        """
        return ModelList(data=[ModelOut(id=m, provider=p) for m, p in await providers.list_models()])

    @get("/tools", operation_id="ListTools")
    async def list_tools(self, tool_catalog: NamedDependency[ToolCatalog]) -> list[ToolSpec]:
        """Local tools and the tools of every allowed MCP server, with their JSON schemas.

        MCP tools are named `<server>__<tool>`; a server that cannot be reached is left out.
        """
        return await tool_catalog.list_specs()
