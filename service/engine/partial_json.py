"""Partial JSON parsing in amortised linear time.

Re-parsing the whole buffer on every fragment is quadratic in its length. A
``PartialJson`` re-parses only when the buffer is small (under 1 KiB) or has
grown by at least an eighth since the last parse, so the total parsing work
stays within a small multiple of the final length; ``final()`` always parses.
"""

from __future__ import annotations

from typing import Any

import jiter

_SMALL = 1024


class PartialJson:
    """Accumulates JSON text fragments and parses the partial value when worth it."""

    __slots__ = ("_last_parsed_len", "_parts", "_size", "value")

    def __init__(self) -> None:
        self._parts: list[str] = []
        self._size = 0
        self._last_parsed_len = 0
        self.value: Any = None

    @property
    def text(self) -> str:
        """Everything received so far."""
        if len(self._parts) > 1:
            self._parts = ["".join(self._parts)]
        return self._parts[0] if self._parts else ""

    def feed(self, fragment: str) -> bool:
        """Add a fragment; returns True when ``value`` was re-parsed and changed."""
        self._parts.append(fragment)
        self._size += len(fragment)
        if self._size > _SMALL and self._size - self._last_parsed_len < self._last_parsed_len // 8:
            return False
        self._last_parsed_len = self._size
        try:
            value = jiter.from_json(self.text.encode(), partial_mode="trailing-strings")
        except ValueError:
            return False
        if value == self.value:
            return False
        self.value = value
        return True

    def final(self) -> Any:
        """Parse the complete text strictly. Raises ``ValueError`` when it is not valid JSON."""
        return jiter.from_json(self.text.encode()) if self.text else None
