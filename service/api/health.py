"""``/healthz`` (the process answers) and ``/readyz`` (its store and run backend answer)."""

from __future__ import annotations

import msgspec
from litestar import Controller, Response, get
from litestar.di import NamedDependency

from service.api.auth import EXCLUDE_FROM_AUTH
from service.runs.manager import RunManager
from service.store.base import ChatStore


class Health(msgspec.Struct, frozen=True):
    """Whether the service and its dependencies answer."""

    status: str
    store: bool | None = None
    runs: bool | None = None


class HealthController(Controller):
    """Liveness and readiness."""

    tags = ["health"]
    opt = EXCLUDE_FROM_AUTH

    @get("/healthz", operation_id="Healthz")
    async def healthz(self) -> Health:
        """Answers as soon as the process serves requests."""
        return Health(status="ok")

    @get("/readyz", operation_id="Readyz")
    async def readyz(self, store: NamedDependency[ChatStore], runs: NamedDependency[RunManager]) -> Response[Health]:
        """200 when the chat store and the run backend answer, 503 otherwise (`draining` once shutting down)."""
        store_ok, runs_ok = await store.ping(), await runs.backend.ping()
        ready = store_ok and runs_ok and not runs.draining
        status = "ready" if ready else "draining" if runs.draining else "unavailable"
        body = Health(status=status, store=store_ok, runs=runs_ok)
        return Response(body, status_code=200 if ready else 503)
