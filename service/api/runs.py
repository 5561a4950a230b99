"""``/v1/runs``: a run's status, its resumable event stream, and cancel."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from litestar import Controller, Response, get, post
from litestar.di import NamedDependency
from litestar.openapi.datastructures import ResponseSpec
from litestar.params import FromPath, HeaderParameter, QueryParameter
from litestar.types import ASGIApp

from service import errors
from service.api.auth import BEARER, BEARER_OR_STREAM_TOKEN, STREAM_TOKEN_OPT
from service.api.deps import RunCaller
from service.api.schemas import RunOut, run_out
from service.api.streaming import SSE_DESCRIPTION, as_asgi, sse_response
from service.errors import ErrorEnvelope
from service.events import AnyEvent
from service.runs.manager import RunManager
from service.security import Authenticator, Principal, StreamToken

NOT_FOUND = ResponseSpec(ErrorEnvelope, description="No such run")
EXPIRED = ResponseSpec(ErrorEnvelope, description="The run's events are past retention (`run_expired`)")
EVENTS = ResponseSpec(AnyEvent, media_type="text/event-stream", description=SSE_DESCRIPTION, generate_examples=False)
STREAM_ERRORS = {
    400: ResponseSpec(ErrorEnvelope, description="A cursor that names no position of the run (`invalid_cursor`)"),
    404: NOT_FOUND,
    410: EXPIRED,
}
After = Annotated[int, QueryParameter(ge=0, description="Replay events after this seq")]
Snapshot = Annotated[
    bool, QueryParameter(description="Start with one `run.snapshot` of the run so far instead of its events")
]
LastEventId = Annotated[
    str | None, HeaderParameter(name="Last-Event-ID", description="Set by EventSource on reconnect; wins over `after`")
]


class RunController(Controller):
    """Runs: status, events, cancel."""

    path = "/v1/runs"
    tags = ["runs"]
    security = BEARER

    @get("/{run_id:str}", operation_id="GetRun", responses={404: NOT_FOUND, 410: EXPIRED})
    async def get_run(
        self, run_id: FromPath[str], runs: NamedDependency[RunManager], principal: NamedDependency[Principal]
    ) -> RunOut:
        """The run's status and the seq of its last event."""
        return run_out(await runs.get_run(run_id, principal.owner))

    @get(
        "/{run_id:str}/events",
        operation_id="StreamRunEvents",
        responses={
            200: EVENTS,
            204: ResponseSpec(None, description="The run has finished and every event was delivered"),
            **STREAM_ERRORS,
        },
        opt={STREAM_TOKEN_OPT: "run"},
        security=BEARER_OR_STREAM_TOKEN,
    )
    async def stream_events(
        self,
        run_id: FromPath[str],
        caller: NamedDependency[RunCaller],
        after: After = 0,
        snapshot: Snapshot = False,
        last_event_id: LastEventId = None,
    ) -> ASGIApp:
        """Replay the run's events after `Last-Event-ID` (or `?after=`), then follow it live.

        A browser `EventSource` can open it with no custom header and resumes by itself. A finished run
        with nothing left to send answers `204`, which stops EventSource from reconnecting. With auth on,
        a browser passes a stream token from `POST /v1/runs/{run_id}/stream-token` as `?token=`.

        A cursor older than the events the service still keeps (more than `SERVICE_MAX_EVENTS_PER_RUN`)
        gets one `run.snapshot` (the run's accumulated state at its `seq`) and then the events after it;
        `?snapshot=true` asks for the same, which saves a late joiner the replay of every delta.
        Generated clients call `StreamRun` (`GET /v1/runs/{run_id}/stream`), whose only answer is the stream.
        """
        events = await _open_events(caller, run_id, after, snapshot, last_event_id)
        if events is None:
            return as_asgi(Response(None, status_code=204))
        return sse_response(events, caller.settings)

    @get(
        "/{run_id:str}/stream",
        operation_id="StreamRun",
        responses={200: EVENTS, **STREAM_ERRORS},
        opt={STREAM_TOKEN_OPT: "run"},
        security=BEARER_OR_STREAM_TOKEN,
    )
    async def stream_run(
        self,
        run_id: FromPath[str],
        caller: NamedDependency[RunCaller],
        after: After = 0,
        snapshot: Snapshot = False,
        last_event_id: LastEventId = None,
    ) -> ASGIApp:
        """The run's events after `Last-Event-ID` (or `?after=`), then live ones, as `StreamRunEvents` sends them.

        The one difference: a finished run with nothing left to send answers `200` with a stream of no
        event (`StreamRunEvents` answers `204`), so this operation's only answer is the event stream.
        The same `?snapshot=` and, with auth on, `?token=` (a stream token of this run).
        """
        events = await _open_events(caller, run_id, after, snapshot, last_event_id)
        return sse_response(events, caller.settings)

    @post("/{run_id:str}/cancel", operation_id="CancelRun", status_code=200, responses={404: NOT_FOUND, 410: EXPIRED})
    async def cancel_run(
        self, run_id: FromPath[str], runs: NamedDependency[RunManager], principal: NamedDependency[Principal]
    ) -> RunOut:
        """Stop the run.

        The upstream request is closed, the partial answer stored, and the stream ends with
        `run.cancelled`. Idempotent: cancelling a finished run returns it unchanged.
        """
        return run_out(await runs.cancel(run_id, principal.owner))

    @post(
        "/{run_id:str}/stream-token",
        operation_id="CreateStreamToken",
        status_code=201,
        responses={404: NOT_FOUND, 410: EXPIRED},
    )
    async def create_stream_token(
        self,
        run_id: FromPath[str],
        runs: NamedDependency[RunManager],
        auth: NamedDependency[Authenticator],
        principal: NamedDependency[Principal],
    ) -> StreamToken:
        """A short-lived token that opens this run's event stream as `?token=` (for `EventSource`).

        It works only on `GET /v1/runs/{run_id}/events` and `GET /v1/runs/{run_id}/stream` of this run, for
        at most 60 s (a setting); a stream opened with it keeps flowing after that. Mint a new one to
        reconnect later (resume with `?after=`).
        """
        await runs.get_run(run_id, principal.owner)
        return auth.mint(principal, "run", run_id)


async def _open_events(
    caller: RunCaller, run_id: str, after: int, snapshot: bool, last_event_id: str | None
) -> AsyncIterator[list[AnyEvent]] | None:
    start = after if last_event_id is None else _cursor(last_event_id)
    return await caller.runs.open_events(run_id, start, caller.principal.owner, snapshot=snapshot)


def _cursor(value: str) -> int:
    if not value.isdigit() or len(value) > 18:
        raise errors.InvalidCursorError(
            f"Last-Event-ID {value[:40]!r} is not an event seq", detail={"field": "Last-Event-ID"}
        )
    return int(value)
