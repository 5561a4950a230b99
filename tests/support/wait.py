"""Waiting for a state that no event announces, with a deadline that must not pass."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


async def until(condition: Callable[[], Awaitable[bool]], *, timeout: float, interval: float = 0.02) -> None:
    """Return as soon as ``condition()`` is true; fail the test when it is still false after ``timeout``.

    Only for states nothing signals (a Redis key's TTL, a backend's expiry sweep): where the code under
    test sets an event or answers a request, await that instead.
    """
    async with asyncio.timeout(timeout):
        while not await condition():
            await asyncio.sleep(interval)
