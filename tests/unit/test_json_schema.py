"""Client schemas: each cap fires at its value, patterns are RE2, output validation is linear-time."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.engine.json_schema import SchemaError, SchemaLimits, check_schema, output_errors

SMALL = SchemaLimits(max_bytes=400, max_depth=3, max_properties=3, max_enum_values=3, max_string_chars=20)


def nested(depth: int) -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(depth - 1):
        schema = {"type": "array", "items": schema}
    return schema


@pytest.mark.parametrize(
    ("at_limit", "over_limit", "message"),
    [
        (nested(3), nested(4), "nests deeper than 3"),
        (
            {"type": "object", "properties": {"a": {}, "b": {}, "c": {}}},
            {"type": "object", "properties": {"a": {}, "b": {}, "c": {}, "d": {}}},
            "4 object properties",
        ),
        ({"enum": ["a", "b", "c"]}, {"enum": ["a", "b", "c", "d"]}, "4 enum values"),
        ({"const": "x" * 20}, {"const": "x" * 21}, "21 characters"),
        ({"description": "x" * 360}, {"description": "x" * 400}, "at most 400"),
    ],
    ids=["depth", "properties", "enum-values", "string-chars", "bytes"],
)
def test_each_cap_fires_just_past_its_value(at_limit: dict[str, Any], over_limit: dict[str, Any], message: str) -> None:
    check_schema(at_limit, SMALL)
    with pytest.raises(SchemaError, match=message):
        check_schema(over_limit, SMALL)


def test_deep_nesting_is_refused_without_recursion() -> None:
    with pytest.raises(SchemaError, match="nests deeper"):
        check_schema(nested(5_000), SchemaLimits(max_bytes=10**7))


@pytest.mark.parametrize(
    ("schema", "message"),
    [
        ({"type": "string", "pattern": "(a)\\1"}, "not supported"),
        ({"type": "string", "pattern": "(?=a)a"}, "not supported"),
        ({"type": "object", "patternProperties": {"^a": {}}}, "patternProperties"),
        ({"type": "no-such-type"}, "not a valid JSON schema"),
    ],
)
def test_schemas_the_service_cannot_bound_are_refused(schema: dict[str, Any], message: str) -> None:
    with pytest.raises(SchemaError, match=message):
        check_schema(schema, SchemaLimits())


def test_a_catastrophic_pattern_matches_in_linear_time() -> None:
    schema = {"type": "string", "pattern": "^(a+)+$"}
    check_schema(schema, SchemaLimits())
    started = time.perf_counter()
    problem = output_errors("a" * 10_000 + "!", schema)
    assert time.perf_counter() - started < 0.5  # Python's re takes 11.6 s at 28 characters
    assert problem is not None
    assert "does not match" in problem
    assert output_errors("a" * 10_000, schema) is None


def test_output_errors_names_the_first_problem() -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    assert output_errors({"n": 3}, schema) is None
    assert output_errors({"n": "3"}, schema) == "'3' is not of type 'integer'"
    assert output_errors({}, schema) == "'n' is a required property"
