"""The suite's collection checks (tests/support/collection.py), in an inner pytest run of their own."""

from __future__ import annotations

import re

import pytest

from tests.support.collection import duplicate_node_ids
from tests.support.live_server import REPO_ROOT

# Two items with one node id, the way schemathesis makes them on pytest 9.2: the node id is built from
# `originalname`, the `[...]` of the name is not part of it.
TWINS = """
import pytest

def _check():
    pass

def pytest_pycollect_makeitem(collector, name, obj):
    if name == "test_twins":
        return [
            pytest.Function.from_parent(collector, name=f"test_twins[{n}]", originalname="test_twins", callobj=_check)
            for n in ("a", "b")
        ]
"""


@pytest.fixture
def inner(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> pytest.Pytester:
    monkeypatch.setenv("PYTHONPATH", str(REPO_ROOT))  # xdist's workers import the plugin too
    plugins = "-p tests.support.collection -p no:cacheprovider -p no:schemathesis -p no:faker -p no:anyio -p no:asyncio"
    pytester.makeini(f"[pytest]\naddopts = {plugins}\n")
    return pytester


def test_duplicate_node_ids_names_each_repeated_id_once() -> None:
    assert duplicate_node_ids(["a::x", "b::y", "a::x", "c::z", "a::x", "b::y"]) == ["a::x", "b::y"]
    assert duplicate_node_ids(["a::x", "a::x[1]", "a::x[2]"]) == []


@pytest.mark.parametrize("workers", ["0", "2"])
def test_items_sharing_a_node_id_fail_the_run_naming_it(inner: pytest.Pytester, workers: str) -> None:
    inner.makeconftest(TWINS)
    inner.makepyfile(test_twins="def test_twins(): pass\ndef test_single(): pass\n")
    result = inner.runpytest_subprocess("-n", workers)
    assert result.ret != pytest.ExitCode.OK
    assert re.search(r"share node ids, .*test_twins\.py::test_twins\b", result.stdout.str() + result.stderr.str())
    result.assert_outcomes()  # nothing ran


def test_an_xdist_group_runs_on_one_worker(inner: pytest.Pytester) -> None:
    grouped = "import pytest\n\npytestmark = pytest.mark.xdist_group('g')\n\n" + "".join(
        f"def test_{i}(): pass\n" for i in range(4)
    )
    inner.makepyfile(test_a=grouped, test_b=grouped)
    result = inner.runpytest_subprocess("-n", "2", "--dist", "loadgroup", "-v")
    result.assert_outcomes(passed=8)
    lines = re.findall(r"^\[(gw\d)\] .* PASSED (\S+)", result.stdout.str(), flags=re.MULTILINE)
    assert len(lines) == 8
    assert all(node_id.endswith("@g") for _, node_id in lines), lines
    assert len({worker for worker, _ in lines}) == 1, lines
