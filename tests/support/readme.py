"""The README's examples, as written there: the fenced block after ``<!-- example: NAME -->``."""

from __future__ import annotations

from tests.support.live_server import REPO_ROOT

README = REPO_ROOT / "README.md"


def readme_block(name: str) -> str:
    """The text of the fenced block that follows ``<!-- example: NAME -->`` in the README."""
    text = README.read_text(encoding="utf-8")
    marker = f"<!-- example: {name} -->\n```"
    start = text.index("\n", text.index(marker) + len(marker)) + 1
    return text[start : text.index("\n```\n", start) + 1]
