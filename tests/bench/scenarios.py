"""The scenarios and the targets the bench compares.

Scenarios (full / ``--quick``):

- ``i``: one stream of 2,000 tokens at full speed (0 delay), repeated one after the other
  (``rounds``) so that the CPU window is long enough for 10 ms clock ticks;
- ``ii``: 100 concurrent streams of 200 tokens at 20 ms;
- ``iii``: 1,000 concurrent streams of 50 tokens at 50 ms;
- ``iv``: steady arrivals: 3,000 streams of 50 tokens at 50 ms, one starting every 1/300 s over
  10 s (about 750 open at once);
- ``v``: the cost of a run: 1,000 runs of 1 token (10 rounds of 100 at once), so that CPU per run
  is mostly starting and ending runs.

The upstream's time to first token is the scenario's ``ttft_ms``; "added TTFT" is what a target
adds on top of it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from tests.bench.wire import Kind


@dataclass(frozen=True)
class Scenario:
    """One load shape."""

    name: str
    streams: int
    tokens: int
    delay_ms: float
    ttft_ms: float
    rounds: int = 1
    timeout_s: float = 120.0
    arrivals_per_s: float = 0.0
    """0: each round's streams start at once; else they arrive one every ``1 / arrivals_per_s`` s."""

    @property
    def concurrent(self) -> int:
        """Streams open at once (for memory per stream): all of a round's, or arrival rate x duration."""
        if self.arrivals_per_s <= 0:
            return self.streams
        duration_s = (self.ttft_ms + max(0, self.tokens - 1) * self.delay_ms) / 1000
        return max(1, min(self.streams, round(self.arrivals_per_s * duration_s)))

    @property
    def total_tokens(self) -> int:
        """Tokens the upstream sends over the whole scenario."""
        return self.streams * self.tokens * self.rounds

    def describe(self) -> str:
        """One line for the report."""
        rounds = f" x{self.rounds} in sequence" if self.rounds > 1 else ""
        arrivals = (
            f", arriving at {self.arrivals_per_s:g}/s (~{self.concurrent} open)" if self.arrivals_per_s > 0 else ""
        )
        return (
            f"{self.streams} stream(s) x {self.tokens} tokens @ {self.delay_ms:g} ms, ttft {self.ttft_ms:g} ms"
            f"{rounds}{arrivals}"
        )


FULL = {
    "i": Scenario("i", streams=1, tokens=2000, delay_ms=0, ttft_ms=0, rounds=5),
    "ii": Scenario("ii", streams=100, tokens=200, delay_ms=20, ttft_ms=20),
    "iii": Scenario("iii", streams=1000, tokens=50, delay_ms=50, ttft_ms=50),
    "iv": Scenario("iv", streams=3000, tokens=50, delay_ms=50, ttft_ms=50, arrivals_per_s=300),
    "v": Scenario("v", streams=100, tokens=1, delay_ms=0, ttft_ms=0, rounds=10),
}
QUICK = {
    "i": Scenario("i", streams=1, tokens=1000, delay_ms=0, ttft_ms=0, rounds=2),
    "ii": Scenario("ii", streams=20, tokens=50, delay_ms=20, ttft_ms=20),
    "iii": Scenario("iii", streams=100, tokens=20, delay_ms=50, ttft_ms=50),
    "iv": Scenario("iv", streams=300, tokens=20, delay_ms=50, ttft_ms=50, arrivals_per_s=100),
    "v": Scenario("v", streams=50, tokens=1, delay_ms=0, ttft_ms=0, rounds=4),
}
ALIASES = {"1": "i", "2": "ii", "3": "iii", "4": "iv", "5": "v"}


@dataclass(frozen=True)
class Target:
    """A server under test and how the client talks to it."""

    name: str
    label: str
    kind: Kind
    app: str
    factory: bool
    sse_path: str
    ws_path: str
    needs_chats: bool = False
    env: dict[str, str] = field(default_factory=dict)
    uvicorn_args: tuple[str, ...] = ()
    """Options added to the shared uvicorn command line."""


def targets(upstream_url: str) -> dict[str, Target]:
    """The four targets, wired to the fake upstream at ``upstream_url`` (ending in ``/v1``)."""
    service_env = {
        "SERVICE_OPENAI_BASE_URL": upstream_url,
        "SERVICE_OPENAI_API_KEY": "bench",
        "SERVICE_DEFAULT_MODEL": "openai/fake",  # the demo model is off once an upstream is configured
        "SERVICE_DATABASE_URL": "",  # the runner gives each start a fresh temp file
        "SERVICE_LOG_LEVEL": "warning",
    }
    return {
        "floor": Target(
            "floor", "(a) bare ASGI", "events", "tests.bench.floor:app", False, "/chat?{query}", "/ws?{query}"
        ),
        "floor_sdk": Target(
            "floor_sdk",
            "(a+) bare ASGI + SDK request",
            "events",
            "tests.bench.floor_sdk:create_app",
            True,
            "/chat?{query}",
            "/ws?{query}",
            env={"BENCH_UPSTREAM_URL": upstream_url},
        ),
        "relay": Target(
            "relay",
            "(b) FastAPI+openai relay",
            "openai",
            "tests.bench.relay:create_app",
            True,
            "/chat",
            "/ws",
            env={"BENCH_UPSTREAM_URL": upstream_url},
        ),
        "service": Target(
            "service",
            "(c) this service",
            "events",
            "service.app:create_app",
            True,
            "/v1/chats/{chat_id}/runs",
            "/v1/ws",
            needs_chats=True,
            env=service_env,
            # the README's production command: the service's own HTTP and WebSocket protocol classes
            uvicorn_args=(
                *("--http", "service.api.http_protocol:HttpProtocol"),
                *("--ws", "service.api.ws_protocol:WebSocketProtocol"),
            ),
        ),
    }


def service_available(root: Path) -> str | None:
    """None when ``service/app.py`` defines ``create_app``, else why target (c) is skipped."""
    app = root / "service" / "app.py"
    if not app.exists():
        return "service/app.py does not exist yet"
    if "def create_app" not in app.read_text():
        return "service/app.py does not define create_app yet"
    return None
