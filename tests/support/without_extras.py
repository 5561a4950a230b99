"""Run a module as ``python -m`` would, with the optional extras' packages unimportable.

``python -m tests.support.without_extras MODULE [ARGS...]`` (e.g. ``uvicorn service.app:create_app
--factory``): an import of ``redis``, ``asyncpg``, ``mcp`` or ``mcp_types`` (or anything under
them) raises ``ModuleNotFoundError``, as it does where ``chat-service`` was installed without its
extras.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import runpy
import sys
from collections.abc import Sequence
from types import ModuleType

BLOCKED = ("redis", "asyncpg", "mcp", "mcp_types")


class _Blocker(importlib.abc.MetaPathFinder):
    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname.partition(".")[0] in BLOCKED:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)
        return None


def main() -> None:
    """Block the extras' packages, then run ``sys.argv[1]`` as ``__main__`` with the arguments after it."""
    sys.meta_path.insert(0, _Blocker())
    sys.argv = sys.argv[1:]
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
