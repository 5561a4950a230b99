"""``PartialJson``: JSON text fed in fragments, its partial value kept, re-parsed in amortised linear time."""

from __future__ import annotations

import itertools
import json
import math
from typing import Any

import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from service.engine.partial_json import PartialJson

SMALL = 1024
"""Under this many characters every fragment re-parses (the module's threshold)."""

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=20,
)


def fed(*fragments: str) -> PartialJson:
    buffer = PartialJson()
    for fragment in fragments:
        buffer.feed(fragment)
    return buffer


def test_feed_reports_a_change_of_the_parsed_value_only() -> None:
    buffer = PartialJson()
    assert buffer.feed('{"city": "Par') is True
    assert buffer.value == {"city": "Par"}  # an open string counts as far as it goes
    assert buffer.feed("is") is True
    assert buffer.value == {"city": "Paris"}
    assert buffer.feed('"') is False  # closing the string adds nothing to the value
    assert buffer.feed(" }") is False
    assert buffer.text == '{"city": "Paris" }'


def test_a_prefix_that_cannot_become_json_keeps_the_last_value() -> None:
    buffer = fed('{"a": 1')
    assert buffer.feed("}}") is False
    assert buffer.value == {"a": 1}


def test_final_parses_strictly() -> None:
    assert fed('{"a": [1, 2]', "}").final() == {"a": [1, 2]}
    with pytest.raises(ValueError, match=r"."):
        fed('{"a": "cut').final()
    assert PartialJson().final() is None  # nothing received


@given(value=json_values, cuts=st.lists(st.integers(min_value=0, max_value=1000), max_size=10))
def test_any_split_of_a_small_document_ends_at_its_value(value: Any, cuts: list[int]) -> None:
    text = json.dumps(value, ensure_ascii=False)
    assume(len(text) < SMALL)  # small documents re-parse on every fragment
    bounds = sorted({min(c, len(text)) for c in cuts} | {0, len(text)})
    buffer = fed(*(text[a:b] for a, b in itertools.pairwise(bounds)))
    assert buffer.text == text
    assert buffer.final() == value
    if value is not None:  # None is also "nothing parsed yet"
        assert buffer.value == value


def test_past_1_kib_it_reparses_only_after_growing_by_an_eighth() -> None:
    buffer = fed('{"k": "' + "x" * 2000)
    parsed = buffer.value["k"]
    assert len(parsed) == 2000
    assert buffer.feed("y") is False  # 1 new character: not worth a parse, the value lags
    assert buffer.value["k"] == parsed
    assert buffer.feed("y" * 300) is True  # past 2007 // 8 new characters since the last parse
    assert buffer.value["k"] == parsed + "y" * 301


def test_one_character_at_a_time_parses_a_long_document_a_logarithmic_number_of_times_past_1_kib() -> None:
    """Decision 3: the work is amortised linear. Every parse here changes the value (the string grows),
    so ``feed`` returning True counts the parses: one per character up to 1 KiB, then one per growth
    by an eighth, about log(n / 1 KiB) / log(9/8) of them (39 for 100,000 characters), where one
    per character would be 100,000."""
    length = 100_000
    buffer = PartialJson()
    parses = sum(buffer.feed(c) for c in '["' + "x" * length)
    assert SMALL < parses <= SMALL + math.ceil(math.log(length / SMALL) / math.log(9 / 8)) + 2
    (lagging,) = buffer.value
    assert set(lagging) == {"x"}
    assert len(lagging) + 2 > (length + 2) * 8 / 9  # the value lags by less than an eighth
