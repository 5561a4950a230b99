"""Client JSON schemas (``response_format``), bounded before any work and matched in linear time.

A schema comes from a client and is used on the event loop twice: checked when the chat or run is
created, and matched against the model's final output. Unbounded, one small request froze the
service: ``{"pattern": "^(a+)+$"}`` took 11.6 s on a 28-character value (four times longer per two
characters: Python's ``re`` backtracks), a 1.5 MB schema took 8 s to check, and deep nesting reached
the interpreter's recursion limit. So, as OpenAI's structured outputs do:

1. **Caps first** (:class:`SchemaLimits`, each a setting): the encoded size, the depth of nested
   subschemas, the object properties in all, the enum values in all, and the characters of all
   property names, enum and const values. The walk is iterative, so depth costs no recursion.
2. **Patterns run on RE2** (``google-re2``: linear time, no backtracking): every ``pattern`` must
   compile with RE2 (no backreferences or lookaround), and output is validated by jsonschema's
   2020-12 validator with its ``pattern`` keyword swapped for an RE2 match. ``patternProperties``
   is refused (jsonschema matches its keys with ``re`` in several keywords; OpenAI's structured
   outputs do not support it either).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, cast

import jsonschema
import msgspec
import re2 as _re2_module  # pyright: ignore[reportMissingTypeStubs]
from jsonschema import exceptions as _exceptions
from jsonschema import validators
from jsonschema.exceptions import ValidationError

re2: Any = _re2_module  # (no type stubs)
_best_match: Any = cast("Any", _exceptions).best_match

_SUBSCHEMA_MAPS = ("properties", "$defs", "definitions", "dependentSchemas")
_SUBSCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames",
               "unevaluatedItems", "unevaluatedProperties")  # fmt: skip


class SchemaError(ValueError):
    """A schema the service does not accept; the message says which limit or rule it breaks."""


@dataclass(frozen=True, kw_only=True)
class SchemaLimits:
    """How large a client schema may be (defaults after OpenAI's structured-output limits)."""

    max_bytes: int = 131_072
    max_depth: int = 20
    max_properties: int = 5_000
    max_enum_values: int = 1_000
    max_string_chars: int = 120_000
    """Characters of all property names, enum values and const values together."""


def check_schema(schema: Mapping[str, Any], limits: SchemaLimits) -> None:
    """Raise :class:`SchemaError` unless ``schema`` is a valid, bounded JSON schema with RE2 patterns."""
    try:
        size = len(msgspec.json.encode(schema))
    except RecursionError:  # msgspec's own depth limit, far above any cap
        raise SchemaError(f"the schema nests deeper than {limits.max_depth} levels") from None
    if size > limits.max_bytes:
        raise SchemaError(f"the schema is {size} bytes; at most {limits.max_bytes} are accepted")
    _check_shape(schema, limits)
    try:
        OutputValidator.check_schema(schema)
    except jsonschema.SchemaError as exc:
        raise SchemaError(f"not a valid JSON schema: {exc.message}") from None


def _check_shape(schema: Mapping[str, Any], limits: SchemaLimits) -> None:
    properties = enum_values = chars = 0
    pending: list[tuple[object, int]] = [(schema, 1)]
    while pending:
        node, depth = pending.pop()
        if not isinstance(node, dict):
            continue  # booleans are schemas too; anything else is the metaschema check's to refuse
        if depth > limits.max_depth:
            raise SchemaError(f"the schema nests deeper than {limits.max_depth} levels")
        subschema = cast("dict[str, Any]", node)
        if "patternProperties" in subschema:
            raise SchemaError("patternProperties is not supported")
        if isinstance(pattern := subschema.get("pattern"), str):
            _compile(pattern)
        names = subschema.get("properties")
        if isinstance(names, dict):
            properties += len(cast("dict[str, Any]", names))
            chars += sum(len(name) for name in cast("dict[str, Any]", names))
        enum = subschema.get("enum")
        if isinstance(enum, list):
            enum_values += len(cast("list[Any]", enum))
            chars += sum(len(v) for v in cast("list[Any]", enum) if isinstance(v, str))
        if isinstance(const := subschema.get("const"), str):
            chars += len(const)
        pending.extend((child, depth + 1) for child in _children(subschema))
    for value, limit, what in [
        (properties, limits.max_properties, "object properties"),
        (enum_values, limits.max_enum_values, "enum values"),
        (chars, limits.max_string_chars, "characters of property names, enum and const values"),
    ]:
        if value > limit:
            raise SchemaError(f"the schema has {value} {what}; at most {limit} are accepted")


def _children(schema: dict[str, Any]) -> Iterator[object]:
    for key in _SUBSCHEMA_MAPS:
        if isinstance(mapping := schema.get(key), dict):
            yield from cast("dict[str, Any]", mapping).values()
    for key in _SUBSCHEMA_LISTS:
        if isinstance(items := schema.get(key), list):
            yield from cast("list[Any]", items)
    for key in _SUBSCHEMAS:
        if key in schema:
            yield schema[key]


_RE2_OPTIONS: Any = re2.Options()
_RE2_OPTIONS.log_errors = False  # a client's bad pattern is its 400, not a line on stderr


@lru_cache(maxsize=1024)
def _compile(pattern: str) -> Any:
    try:
        return re2.compile(pattern, _RE2_OPTIONS)
    except re2.error as exc:
        reason: object = exc.args[0] if exc.args else exc
        problem = reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)
        raise SchemaError(
            f"pattern {pattern[:60]!r} is not supported (RE2 syntax: no backreferences or lookaround): {problem}"
        ) from None


def _re2_pattern(validator: Any, pattern: str, instance: object, schema: object) -> Iterator[ValidationError]:
    if validator.is_type(instance, "string") and not _compile(pattern).search(instance):
        yield ValidationError(f"{cast('str', instance)[:80]!r} does not match {pattern!r}")


OutputValidator: Any = cast("Any", validators).extend(jsonschema.Draft202012Validator, {"pattern": _re2_pattern})
"""jsonschema's 2020-12 validator, matching ``pattern`` with RE2."""


def output_errors(value: object, schema: Mapping[str, Any]) -> str | None:
    """The first reason ``value`` does not match ``schema`` (a schema :func:`check_schema` accepted), or None."""
    error: ValidationError | None = _best_match(OutputValidator(schema).iter_errors(value))
    return None if error is None else str(error.message)
