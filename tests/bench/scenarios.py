"""The scenarios and the targets the bench compares.

Scenarios (full / ``--quick``):

- ``i``: one stream of 2,000 tokens at full speed (0 delay), repeated one after the other
  (``rounds``) so that the CPU window is long enough for 10 ms clock ticks;
- ``ii``: 100 concurrent streams of 200 tokens at 20 ms;
- ``iii``: 1,000 concurrent streams of 50 tokens at 50 ms.

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

    @property
    def total_tokens(self) -> int:
        """Tokens the upstream sends over the whole scenario."""
        return self.streams * self.tokens * self.rounds

    def describe(self) -> str:
        """One line for the report."""
        rounds = f" x{self.rounds} in sequence" if self.rounds > 1 else ""
        return (
            f"{self.streams} stream(s) x {self.tokens} tokens @ {self.delay_ms:g} ms, ttft {self.ttft_ms:g} ms{rounds}"
        )


FULL = {
    "i": Scenario("i", streams=1, tokens=2000, delay_ms=0, ttft_ms=0, rounds=5),
    "ii": Scenario("ii", streams=100, tokens=200, delay_ms=20, ttft_ms=20),
    "iii": Scenario("iii", streams=1000, tokens=50, delay_ms=50, ttft_ms=50),
}
QUICK = {
    "i": Scenario("i", streams=1, tokens=1000, delay_ms=0, ttft_ms=0, rounds=2),
    "ii": Scenario("ii", streams=20, tokens=50, delay_ms=20, ttft_ms=20),
    "iii": Scenario("iii", streams=100, tokens=20, delay_ms=50, ttft_ms=50),
}
ALIASES = {"1": "i", "2": "ii", "3": "iii"}


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


def targets(upstream_url: str) -> dict[str, Target]:
    """The three targets, wired to the fake upstream at ``upstream_url`` (ending in ``/v1``)."""
    service_env = {
        "SERVICE_OPENAI_BASE_URL": upstream_url,
        "SERVICE_OPENAI_API_KEY": "bench",
        "SERVICE_DATABASE_URL": "",  # the runner gives each start a fresh temp file
        "SERVICE_LOG_LEVEL": "warning",
    }
    return {
        "floor": Target(
            "floor", "(a) bare ASGI", "events", "tests.bench.floor:app", False, "/chat?{query}", "/ws?{query}"
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
