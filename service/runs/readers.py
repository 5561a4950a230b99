"""The open readers of runs on this instance, so that a shutdown can end them cleanly (decision 46).

A reader is one ``RunManager.open_events`` iteration (an SSE response or a WebSocket follower). When
the instance drains, a reader of a run that goes on elsewhere (another instance owns it) is *stopped*:
its iteration ends as if the log had ended, so an SSE body is completed and a WebSocket follower
returns, and the client resumes on another instance. Stopping never cuts a send: a reader waiting
for the next events is cancelled out of that wait (the cancel is taken back and the iteration ends),
one handing out a batch of events ends right after it.
"""

from __future__ import annotations

import asyncio


class Reader:
    """One iteration of a run's events; see the module docstring."""

    __slots__ = ("cancelled", "run_id", "stopping", "task", "waiting")

    def __init__(self, run_id: str, task: asyncio.Task[object] | None) -> None:
        self.run_id = run_id
        self.task = task
        self.waiting = False
        self.stopping = False
        self.cancelled = False

    def stop(self) -> None:
        """End the iteration: at once if it waits for events, else after the batch it hands out."""
        self.stopping = True
        if self.waiting and self.task is not None and not self.cancelled:
            self.cancelled = True
            self.task.cancel()

    def stopped_by_cancel(self) -> bool:
        """Whether a ``CancelledError`` just raised is this reader's own stop (then it is taken back)."""
        return self.cancelled and self.task is not None and self.task.uncancel() == 0
