"""Dependency providers: the app's long-lived objects (kept on ``app.state`` by ``create_app``), by name."""

from __future__ import annotations

from typing import Any

from litestar.datastructures import State
from litestar.di import Provide

from service.api.auth import PRINCIPAL


def _from_state(attribute: str) -> Provide:
    def provide(state: State) -> Any:
        return state[attribute]

    return Provide(provide, sync_to_thread=False)


DEPENDENCIES: dict[str, Any] = {
    "runs": _from_state("runs"),  # RunManager
    "store": _from_state("store"),  # ChatStore
    "settings": _from_state("settings"),  # Settings
    "providers": _from_state("providers"),  # ProviderRegistry
    "tool_catalog": _from_state("tools"),  # ToolCatalog
    "auth": _from_state("auth"),  # Authenticator
    "principal": PRINCIPAL,  # Principal: the caller
}
"""Handlers declare them as ``runs: NamedDependency[RunManager]`` and so on."""
