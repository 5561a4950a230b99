"""Checks on what the suite collected: a plugin (``tests/conftest.py`` loads it) run by every process
that collects, so by each xdist worker.

1. Every item's node id is unique. pytest-xdist schedules and reports by node id: items that share
   one are run once, silently. Schemathesis' ``@schema.parametrize()`` items all had the node id of
   their function on pytest 9.2 (`test_api`), so under ``-n auto`` one operation of sixteen was fuzzed.
2. ``xdist_group`` marks take effect. pytest-xdist 3.8 groups by appending ``@<group>`` to the node id
   through ``item._nodeid``, which pytest 9.2 no longer reads (node ids are structured, ``item._id``):
   every group was spread over the workers as if unmarked (pytest-dev/pytest-xdist#1386, open).
   :func:`restore_xdist_groups` writes the suffix into the structured id, and only when xdist did not;
   it fails the run, naming the cause, when neither way works (a pytest or xdist upgrade changed it).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

import pytest


class CollectionCheckError(Exception):
    """The collected suite would not run as written; raised, not `pytest.exit`, so xdist shows the message."""


def duplicate_node_ids(node_ids: Iterable[str]) -> list[str]:
    """The node ids that occur more than once, sorted."""
    return sorted(node_id for node_id, count in Counter(node_ids).items() if count > 1)


def xdist_group(item: pytest.Item) -> str | None:
    """The item's group as pytest-xdist names it (its ``xdist_group`` names, sorted, joined by ``_``)."""
    names = {
        str(mark.args[0] if mark.args else mark.kwargs.get("name", "default"))
        for mark in item.iter_markers("xdist_group")
    }
    return "_".join(sorted(names)) if names else None


def restore_xdist_groups(config: pytest.Config, items: Sequence[pytest.Item]) -> None:
    """Make each grouped item's node id end in ``@<group>`` in an xdist worker under ``--dist loadgroup``."""
    if not getattr(config.option, "loadgroup", False):  # set by xdist in its workers only
        return
    for item in items:
        group = xdist_group(item)
        if group is None or item.nodeid.endswith(f"@{group}"):
            continue
        structured = getattr(item, "_id", None)
        parse = getattr(type(structured), "parse", None)
        if parse is not None:
            item._id = parse(f"{item.nodeid}@{group}")  # type: ignore[attr-defined]
        if not item.nodeid.endswith(f"@{group}"):
            raise CollectionCheckError(
                f"xdist_group({group!r}) does not take effect on {item.nodeid}: pytest-xdist's node id suffix "
                "is lost (see tests/support/collection.py); the group's tests would run on several workers"
            )


@pytest.hookimpl(trylast=True)  # after pytest-xdist's own hook, on the final node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    restore_xdist_groups(config, items)
    refuse_duplicate_node_ids(items)


def refuse_duplicate_node_ids(items: Sequence[pytest.Item]) -> None:
    """Stop the run when two collected items share a node id, naming them."""
    duplicates = duplicate_node_ids(item.nodeid for item in items)
    if duplicates:
        raise CollectionCheckError(
            "collected items share node ids, so pytest-xdist would run only one of each: " + ", ".join(duplicates)
        )
