"""Ids for chats, runs and messages: 128 random bits in 32 hex digits, like ``uuid.uuid4().hex``.

The bits come from the operating system's random source (``os.urandom``), as uuid4's do, but
from a 4 KiB buffer refilled every 256 ids rather than one ``getrandom`` system call per id: on
a core busy with network traffic that call took 30-40 µs each (strace, bench scenario (iii)),
and a run needs three ids. A forked child starts with an empty buffer, so it never repeats its
parent's ids.
"""

from __future__ import annotations

import os
import threading

_ID_BYTES = 16
_BUFFER_BYTES = 4096

_lock = threading.Lock()
_buffer = b""
_offset = 0


def new_id() -> str:
    """A fresh random id (32 lowercase hex digits)."""
    global _buffer, _offset
    with _lock:
        if _offset + _ID_BYTES > len(_buffer):
            _buffer, _offset = os.urandom(_BUFFER_BYTES), 0
        start, _offset = _offset, _offset + _ID_BYTES
        return _buffer[start:_offset].hex()


def _forget_buffer() -> None:
    global _lock, _buffer, _offset
    _lock, _buffer, _offset = threading.Lock(), b"", 0


os.register_at_fork(after_in_child=_forget_buffer)
