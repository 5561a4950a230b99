"""The tool catalog: local Python tools and allow-listed MCP tools, handed to a run as a ``Toolbox``.

A local tool is a function (async, or sync: run in a worker thread) taking one ``msgspec.Struct``;
its JSON schema is ``msgspec.json.schema`` of that Struct, its description the docstring::

    class WeatherParams(msgspec.Struct, forbid_unknown_fields=True):
        city: str

    @local_tool
    async def weather(params: WeatherParams) -> dict[str, float]:
        \"\"\"Current temperature in a city.\"\"\"

A tool reports a failure meant for the model by raising ``ValueError(message)``; any other exception
is reported with its type. MCP tools are named ``<server>__<tool>`` and come from ``McpHub``
(``service/engine/mcp.py``). ``ToolCatalog.start()`` connects nothing: MCP sessions open on first use,
so an unreachable MCP server never blocks start-up.

Errors (raised while building a toolbox, never by ``Toolbox.call``)::

    ToolError
    ├── UnknownToolError        unknown_tool            a requested local tool does not exist
    ├── ServerNotAllowedError   mcp_server_not_allowed  an MCP server not in the allow-list
    └── McpUnavailableError     mcp_unavailable         an allowed MCP server could not be reached
"""

from __future__ import annotations

import ast
import asyncio
import inspect
import logging
import math
import re
import typing
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, TypeVar
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import msgspec
from jsonschema import Draft202012Validator
from jsonschema.protocols import Validator
from jsonschema.validators import validator_for

if TYPE_CHECKING:
    from service.engine.mcp import McpHub

log = logging.getLogger(__name__)
_P = TypeVar("_P", bound=msgspec.Struct)
_LOCAL_NAME = re.compile(r"^[A-Za-z0-9-]+(_[A-Za-z0-9-]+)*$")


class ToolSpec(msgspec.Struct, frozen=True):
    """A tool as shown to the model."""

    name: str
    """``[a-zA-Z0-9_-]``, at most 64 characters; MCP tools are ``<server>__<tool>``."""
    description: str
    parameters: dict[str, Any]
    """JSON schema of the arguments object."""
    source: str
    """``"local"`` or the MCP server name."""


class ToolOutcome(msgspec.Struct, frozen=True):
    """What a tool call gives back to the model."""

    output: str
    """Text for the model (JSON text for structured results)."""
    is_error: bool = False


class ToolError(Exception):
    """Base of the errors raised while choosing tools for a run."""

    code: ClassVar[str] = "tool_error"

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class UnknownToolError(ToolError):
    """A chat or run asked for a tool that does not exist."""

    code = "unknown_tool"


class ServerNotAllowedError(ToolError):
    """A chat or run asked for an MCP server that is not in the allow-list."""

    code = "mcp_server_not_allowed"


class McpUnavailableError(ToolError):
    """An allow-listed MCP server could not be reached."""

    code = "mcp_unavailable"


def mcp_tool_name(server: str, tool: str) -> str:
    """``<server>__<tool>`` with characters outside ``[a-zA-Z0-9_-]`` replaced, cut to 64 characters."""
    return f"{server}__{re.sub(r'[^A-Za-z0-9_-]', '_', tool)}"[:64]


@dataclass(frozen=True, slots=True)
class LocalTool:
    """A Python function offered to the model; build it with ``local_tool`` / ``LocalTool.from_function``."""

    spec: ToolSpec
    params_type: type[msgspec.Struct]
    fn: Callable[[Any], object]

    @classmethod
    def from_function(cls, fn: Callable[[_P], object], *, name: str | None = None) -> LocalTool:
        """Derive name, description and JSON schema from ``fn``; raise ``TypeError`` if it does not fit."""
        name = name or fn.__name__
        if not _LOCAL_NAME.fullmatch(name) or len(name) > 64:
            raise TypeError(f"tool name {name!r}: use letters, digits, '-' and single '_', at most 64 characters")
        parameters = list(inspect.signature(fn).parameters)
        hints = typing.get_type_hints(fn)
        params_type = hints.get(parameters[0]) if len(parameters) == 1 else None
        if not (isinstance(params_type, type) and issubclass(params_type, msgspec.Struct)):
            raise TypeError(f"tool {name!r} must take exactly one parameter annotated with a msgspec.Struct")
        description = inspect.getdoc(fn)
        if not description:
            raise TypeError(f"tool {name!r} needs a docstring: it is the description the model sees")
        schema = _self_contained_schema(params_type)
        return cls(ToolSpec(name, description, schema, "local"), params_type, fn)

    def parse(self, arguments: Mapping[str, Any]) -> msgspec.Struct:
        """Validate ``arguments``; raises ``msgspec.ValidationError``."""
        return msgspec.convert(arguments, self.params_type)

    async def run(self, arguments: Mapping[str, Any]) -> ToolOutcome:
        """Validate and call; invalid arguments are an error outcome, exceptions propagate."""
        try:
            params = self.parse(arguments)
        except msgspec.ValidationError as exc:
            return ToolOutcome(f"invalid arguments for {self.spec.name}: {exc}", is_error=True)
        if inspect.iscoroutinefunction(self.fn):
            result = await self.fn(params)
        else:
            result = await asyncio.to_thread(self.fn, params)
            if inspect.isawaitable(result):
                result = await result
        return ToolOutcome(result if isinstance(result, str) else msgspec.json.encode(result).decode())


def local_tool(fn: Callable[[_P], object]) -> LocalTool:
    """Decorator: turn ``fn`` into a ``LocalTool`` (see ``LocalTool.from_function``)."""
    return LocalTool.from_function(fn)


def _self_contained_schema(params_type: type[msgspec.Struct]) -> dict[str, Any]:
    """``msgspec.json.schema`` with every ``$ref`` inlined (models handle ``$defs`` poorly)."""
    (root,), defs = msgspec.json.schema_components([params_type], ref_template="#/$defs/{name}")

    def inline(node: object, seen: tuple[str, ...]) -> object:
        if isinstance(node, list):
            return [inline(item, seen) for item in typing.cast(list[object], node)]
        if not isinstance(node, dict):
            return node
        node = typing.cast(dict[str, object], node)
        ref = node.get("$ref")
        if isinstance(ref, str):
            target = ref.rsplit("/", 1)[-1]
            if target in seen:
                raise TypeError(f"tool parameters {params_type.__name__}: recursive type {target} is not supported")
            rest = {k: v for k, v in node.items() if k != "$ref"}
            return inline({**defs[target], **rest}, (*seen, target))
        return {key: inline(value, seen) for key, value in node.items()}

    schema = typing.cast(dict[str, Any], inline(root, ()))
    schema.pop("title", None)
    schema.pop("description", None)  # the function docstring is the description the model sees
    return schema


# --- built-in tools ----------------------------------------------------------------------------


class ClockParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of ``clock``."""

    timezone: Annotated[str, msgspec.Meta(description="IANA time zone, e.g. Europe/Paris", max_length=64)] = "UTC"


def clock(params: ClockParams) -> dict[str, str]:
    """Current date and time in a time zone (IANA name such as Europe/Paris; default UTC)."""
    try:
        zone = ZoneInfo(params.timezone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise ValueError(f"unknown time zone {params.timezone!r}; use an IANA name such as Europe/Paris") from exc
    now = datetime.now(zone)
    return {"datetime": now.isoformat(timespec="seconds"), "timezone": params.timezone, "weekday": now.strftime("%A")}


class CalculatorParams(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Arguments of ``calculator``."""

    expression: Annotated[
        str, msgspec.Meta(description="Arithmetic, e.g. (2 + 3) * 4 ** 2 / 7", min_length=1, max_length=1000)
    ]


_MAX_BITS = 4096
"""Largest integer (in bits) the calculator computes, so ``9**9**9`` is refused instead of run."""
_Number = int | float
_BINARY: dict[type[ast.operator], Callable[[_Number, _Number], object]] = {
    ast.Add: lambda a, b: a + b,
    ast.Sub: lambda a, b: a - b,
    ast.Mult: lambda a, b: a * b,
    ast.Div: lambda a, b: a / b,
    ast.FloorDiv: lambda a, b: a // b,
    ast.Mod: lambda a, b: a % b,
    ast.Pow: lambda a, b: a**b,
}


def calculator(params: CalculatorParams) -> int | float:
    """Evaluate an arithmetic expression: numbers, + - * / // % **, unary minus and parentheses."""
    try:
        tree = ast.parse(params.expression.strip(), mode="eval")
    except SyntaxError as exc:
        raise ValueError(f"not an arithmetic expression: {exc.msg}") from exc
    try:
        result = _evaluate(tree.body)
    except ZeroDivisionError as exc:
        raise ValueError("division by zero") from exc
    except OverflowError as exc:
        raise ValueError("the result is too large") from exc
    if isinstance(result, float) and not math.isfinite(result):
        raise ValueError("the result is not a finite number")
    return result


def _evaluate(node: ast.expr) -> int | float:
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return typing.cast(int | float, node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        left, right = _evaluate(node.left), _evaluate(node.right)
        if isinstance(node.op, ast.Pow):
            _check_power(left, right)
        result = _BINARY[type(node.op)](left, right)
        if not isinstance(result, int | float):  # (-8) ** 0.5 is complex
            raise ValueError("the result is not a real number")
        if isinstance(result, int) and result.bit_length() > _MAX_BITS:
            raise ValueError("the result is too large")
        return result
    raise ValueError(f"unsupported syntax: {ast.unparse(node)!r} (only numbers and + - * / // % ** ( ))")


def _check_power(base: int | float, exponent: int | float) -> None:
    if abs(exponent) > _MAX_BITS:
        raise ValueError(f"exponent {exponent} is too large (limit {_MAX_BITS})")
    if (
        isinstance(base, int)
        and isinstance(exponent, int)
        and abs(base) > 1
        and base.bit_length() * exponent > _MAX_BITS
    ):
        raise ValueError("the result is too large")


DEFAULT_TOOLS: tuple[LocalTool, ...] = (LocalTool.from_function(clock), LocalTool.from_function(calculator))
"""The local tools every app offers unless ``ToolCatalog(local=...)`` says otherwise."""


@dataclass(frozen=True, slots=True)
class _Binding:
    spec: ToolSpec
    local: LocalTool | None = None
    mcp_tool: str = ""
    """For an MCP tool: the server's own name of the tool."""


class Toolbox:
    """The tools one run may use. ``call`` never raises for a tool failure: it returns an error outcome."""

    def __init__(
        self, bindings: Sequence[_Binding], *, timeout_s: float, max_output_chars: int, hub: McpHub | None
    ) -> None:
        self._bindings = {b.spec.name: b for b in bindings}
        self._timeout_s, self._max_output_chars, self._hub = timeout_s, max_output_chars, hub
        self._validators: dict[str, Validator] = {}

    def specs(self) -> list[ToolSpec]:
        """The tools, in catalog order (local first, then MCP servers in request order)."""
        return [b.spec for b in self._bindings.values()]

    def openai_tools(self) -> list[dict[str, Any]]:
        """The ``tools`` parameter of a chat completions request."""
        return [
            {"type": "function", "function": {"name": s.name, "description": s.description, "parameters": s.parameters}}
            for s in self.specs()
        ]

    def validate(self, name: str, arguments: dict[str, Any]) -> str | None:
        """``None`` if ``name`` exists and ``arguments`` match its schema, else a message saying what is wrong."""
        binding = self._bindings.get(name)
        if binding is None:
            return f"unknown tool {name!r} (available: {', '.join(self._bindings) or 'none'})"
        if binding.local is not None:
            try:
                binding.local.parse(arguments)
            except msgspec.ValidationError as exc:
                return f"invalid arguments for {name}: {exc}"
            return None
        try:
            error = next(iter(self._validator(binding.spec).iter_errors(arguments)), None)
        except Exception:  # a schema jsonschema cannot use: leave the checking to the MCP server
            log.warning("tool %s: unusable input schema, arguments not checked", name, exc_info=True)
            return None
        return None if error is None else f"invalid arguments for {name}: {error.message} at {error.json_path}"

    async def call(self, name: str, arguments: dict[str, Any]) -> ToolOutcome:
        """Run a tool within the time limit; failures, timeouts and oversized output are error outcomes."""
        binding = self._bindings.get(name)
        if binding is None or (binding.local is None and self._hub is None):
            return ToolOutcome(self.validate(name, arguments) or f"tool {name!r} is unavailable", is_error=True)
        deadline = asyncio.timeout(self._timeout_s)
        try:
            async with deadline:
                outcome = await self._run(binding, arguments)
        except Exception as exc:
            if deadline.expired():
                return ToolOutcome(f"tool {name} timed out after {self._timeout_s:g}s", is_error=True)
            if isinstance(exc, ToolError):
                return ToolOutcome(f"tool {name} failed: {exc.message}", is_error=True)
            log.warning("tool %s raised", name, exc_info=True)
            detail = str(exc) if isinstance(exc, ValueError) else f"{type(exc).__name__}: {exc}"
            return ToolOutcome(f"tool {name} failed: {detail}", is_error=True)
        if len(outcome.output) > self._max_output_chars:
            return ToolOutcome(
                f"tool {name} returned {len(outcome.output)} characters, more than the limit of "
                f"{self._max_output_chars}; ask for less",
                is_error=True,
            )
        return outcome

    async def _run(self, binding: _Binding, arguments: dict[str, Any]) -> ToolOutcome:
        if binding.local is not None:
            return await binding.local.run(arguments)
        problem = self.validate(binding.spec.name, arguments)
        if problem is not None:
            return ToolOutcome(problem, is_error=True)
        assert self._hub is not None  # noqa: S101 - checked by call()
        return await self._hub.call_tool(binding.spec.source, binding.mcp_tool, arguments)

    def _validator(self, spec: ToolSpec) -> Validator:
        validator = self._validators.get(spec.name)
        if validator is None:
            cls = validator_for(spec.parameters, default=Draft202012Validator)
            validator = self._validators[spec.name] = cls(spec.parameters)
        return validator


class ToolCatalog:
    """Every tool the service offers; built once per app, it makes one ``Toolbox`` per run."""

    def __init__(
        self,
        *,
        timeout_s: float,
        max_output_chars: int,
        mcp: McpHub | None = None,
        local: Sequence[LocalTool] = DEFAULT_TOOLS,
    ) -> None:
        self._local = {t.spec.name: t for t in local}
        self._timeout_s, self._max_output_chars, self._hub = timeout_s, max_output_chars, mcp

    async def start(self) -> None:
        """Nothing to do: MCP sessions open lazily on first use (an unreachable server never blocks start-up)."""

    async def close(self) -> None:
        """Close the MCP sessions (the catalog owns the hub it was given)."""
        if self._hub is not None:
            await self._hub.close()

    async def list_specs(self, mcp_servers: Sequence[str] | None = None) -> list[ToolSpec]:
        """Local tools plus the tools of ``mcp_servers`` (default: every allowed one); unreachable ones skipped."""
        specs = [t.spec for t in self._local.values()]
        names = (self._hub.server_names if self._hub else []) if mcp_servers is None else list(mcp_servers)
        for server in dict.fromkeys(names):
            hub = self._require_hub(server)
            try:
                specs.extend(spec for spec, _ in await hub.list_tool_bindings(server))
            except McpUnavailableError as exc:
                log.warning("tool listing skips MCP server %r: %s", server, exc.message)
        return specs

    def check(self, tools: Sequence[str] | None, mcp_servers: Sequence[str] | None) -> None:
        """Raise ``UnknownToolError`` / ``ServerNotAllowedError`` for a selection, without connecting to anything."""
        for name in self._local_names(tools):
            self._local_tool(name)
        for server in mcp_servers or ():
            self._require_hub(server)

    async def toolbox(self, tools: Sequence[str] | None, mcp_servers: Sequence[str] | None) -> Toolbox:
        """The tools for one run: local ``tools`` (``None``: all, ``[]``: none) and the tools of ``mcp_servers``."""
        local = [self._local_tool(name) for name in self._local_names(tools)]
        bindings = [_Binding(tool.spec, tool) for tool in local]
        servers = list(dict.fromkeys(mcp_servers or ()))
        for server in servers:
            self._require_hub(server)
        for server in servers:
            pairs = await self._require_hub(server).list_tool_bindings(server)
            bindings.extend(_Binding(spec, mcp_tool=tool) for spec, tool in pairs)
        return Toolbox(bindings, timeout_s=self._timeout_s, max_output_chars=self._max_output_chars, hub=self._hub)

    def _local_names(self, tools: Sequence[str] | None) -> list[str]:
        return list(self._local) if tools is None else list(dict.fromkeys(tools))

    def _local_tool(self, name: str) -> LocalTool:
        tool = self._local.get(name)
        if tool is None:
            hint = "; MCP tools are chosen with mcp_servers" if "__" in name else ""
            available = ", ".join(self._local) or "none"
            raise UnknownToolError(f"unknown tool {name!r} (available tools: {available}){hint}")
        return tool

    def _require_hub(self, server: str) -> McpHub:
        if self._hub is None:
            raise ServerNotAllowedError(f"MCP server {server!r} is not allowed: no MCP servers are configured")
        self._hub.check_allowed(server)
        return self._hub
