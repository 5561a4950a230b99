"""How deep a JSON text nests, found without parsing it (so without recursion).

msgspec's decoder, jsonschema and ``==`` on nested values all recurse once per level; a 2 KB body
of 1,000 ``[`` reached the interpreter's recursion limit inside the decoder and answered 500 (a
WebSocket frame closed its socket with 4500). HTTP bodies and WebSocket frames are therefore
measured before they are decoded: strings are cut out with one regular expression (brackets inside
them do not count), the brackets left are kept with ``bytes.translate``, and their running depth is
summed with ``itertools.accumulate``: three passes in C, linear in the text.
"""

from __future__ import annotations

import re
from itertools import accumulate
from typing import Final

_STRING: Final = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS: Final = bytes(b for b in range(256) if b not in b"[]{}")
_STEP: Final = [1 if b in b"[{" else -1 if b in b"]}" else 0 for b in range(256)]


def nests_deeper(text: bytes | str, limit: int) -> bool:
    """Whether ``text``, read as JSON, has more than ``limit`` levels of arrays and objects.

    Text that is not JSON may be counted wrongly (an unterminated string, say); the decoder refuses
    it either way.
    """
    if isinstance(text, str):
        if text.count("[") + text.count("{") <= limit:
            return False
        text = text.encode()
    elif text.count(b"[") + text.count(b"{") <= limit:  # most bodies: no scan at all
        return False
    brackets = _STRING.sub(b"", text).translate(None, _NOT_BRACKETS)
    return max(accumulate(map(_STEP.__getitem__, brackets)), default=0) > limit
