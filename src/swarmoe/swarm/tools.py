"""Tools: `@tool` turns a typed function (sync or async) into something a model can call.

The JSON schema comes from the signature (pydantic) and the docstring (first paragraph is the
description, an `Args:` section describes parameters). Arguments are validated before the
function runs, so a model that sends bad arguments gets a precise error back instead of a
crash. A `str` return value is the tool message verbatim; anything else is sent as JSON.
"""

from __future__ import annotations

import asyncio
import inspect
import re
import sys
from collections.abc import Callable, Mapping
from concurrent.futures import Executor
from dataclasses import dataclass, field
from typing import Any, overload

import pydantic
import pydantic_core


class ToolError(Exception):
    """A problem the model should hear about as the tool's result, not a crash."""


@dataclass
class Tool:
    """A callable the model can use. `fn` receives validated keyword arguments."""

    name: str
    description: str
    parameters: dict[str, Any]
    fn: Callable[..., Any]
    timeout: float | None = None
    """Seconds before the call becomes an error result; None uses the swarm's default."""
    validator: type[pydantic.BaseModel] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z0-9_-]{1,64}", self.name):
            raise ValueError(f"tool name {self.name!r} must be 1-64 letters, digits, '_' or '-'")
        self._is_async = inspect.iscoroutinefunction(self.fn)

    @property
    def schema(self) -> dict[str, Any]:
        """The OpenAI `tools` entry."""
        return {"type": "function", "function": {
            "name": self.name, "description": self.description, "parameters": self.parameters}}

    @property
    def ref(self) -> str | None:
        """`module:qualname` of a plain function, so a resumed run can import it again."""
        module, qualname = getattr(self.fn, "__module__", None), getattr(self.fn, "__qualname__", "")
        if not module or "<" in qualname:
            return None
        if module == "__main__":
            module = getattr(sys.modules["__main__"], "__file__", None)
        return f"{module}:{qualname}" if module else None

    async def invoke(self, arguments: Mapping[str, Any], executor: Executor | None = None) -> str:
        """Validate, run, and render the result as tool-message text."""
        if self.validator is not None:
            try:
                parsed = self.validator.model_validate(arguments)
            except pydantic.ValidationError as e:
                problems = "; ".join(
                    f"{'.'.join(map(str, err['loc'])) or 'arguments'}: {err['msg']}"
                    for err in e.errors())
                raise ToolError(f"invalid arguments for {self.name!r}: {problems}") from None
            kwargs = dict(parsed)  # top-level fields only, values as validated
        else:
            kwargs = dict(arguments)
        if self._is_async:
            result = await self.fn(**kwargs)
        else:
            loop = asyncio.get_running_loop()
            result = await loop.run_in_executor(executor, lambda: self.fn(**kwargs))
            if inspect.isawaitable(result):
                result = await result
        if isinstance(result, str):
            return result
        return pydantic_core.to_json(result, fallback=str).decode()


def _doc_parts(doc: str | None) -> tuple[str, dict[str, str]]:
    """Description and per-parameter help from a Google-style docstring."""
    text = inspect.cleandoc(doc or "")
    head, _, rest = text.partition("\nArgs:")
    if not rest and text.startswith("Args:"):
        head, rest = "", text[len("Args:"):]
    params: dict[str, str] = {}
    current = None
    for line in rest.splitlines():
        if line.strip() and not line.startswith((" ", "\t")):
            break  # the next section (Returns:, Raises:, ...)
        m = re.match(r"\s+(\w+)(?:\s*\([^)]*\))?\s*:\s*(.*)", line)
        if m and (current is None or len(line) - len(line.lstrip()) <= 4):
            current = m.group(1)
            params[current] = m.group(2).strip()
        elif current and line.strip():
            params[current] += " " + line.strip()
    description = head.strip().split("\n\n")[0].replace("\n", " ")
    return description, params


def _from_function(fn: Callable[..., Any], name: str | None, description: str | None,
                   timeout: float | None) -> Tool:
    doc, param_docs = _doc_parts(fn.__doc__)
    fields: dict[str, Any] = {}
    hints = _type_hints(fn)
    for p in inspect.signature(fn).parameters.values():
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
            raise TypeError(f"tool {fn.__name__!r}: parameter {p.name!r} must be a plain "
                            f"keyword-capable parameter (no *args, **kwargs or positional-only)")
        default = ... if p.default is p.empty else p.default
        fields[p.name] = (hints.get(p.name, Any),
                          pydantic.Field(default, description=param_docs.get(p.name)))
    tool_name = name or fn.__name__
    model = pydantic.create_model(f"{tool_name}_arguments",
                                  __config__=pydantic.ConfigDict(extra="forbid"), **fields)
    schema = model.model_json_schema()
    schema.pop("title", None)
    for prop in schema.get("properties", {}).values():
        prop.pop("title", None)
    return Tool(name=tool_name, description=description or doc or tool_name, parameters=schema,
                fn=fn, timeout=timeout, validator=model)


def _type_hints(fn: Callable[..., Any]) -> dict[str, Any]:
    import typing

    try:
        return typing.get_type_hints(fn, include_extras=True)
    except NameError as e:
        raise TypeError(f"tool {fn.__name__!r}: cannot resolve a type annotation: {e}") from e


@overload
def tool(fn: Callable[..., Any], /) -> Tool: ...
@overload
def tool(*, name: str | None = None, description: str | None = None,
         timeout: float | None = None) -> Callable[[Callable[..., Any]], Tool]: ...


def tool(fn: Callable[..., Any] | None = None, /, *, name: str | None = None,
         description: str | None = None, timeout: float | None = None
         ) -> Tool | Callable[[Callable[..., Any]], Tool]:
    """Make a tool from a typed function: `@tool` or `@tool(name=..., timeout=...)`."""
    if fn is not None:
        return _from_function(fn, name, description, timeout)
    return lambda f: _from_function(f, name, description, timeout)


def as_tool(obj: Tool | Callable[..., Any]) -> Tool:
    """Accept a `Tool` or a plain function in `Swarm(tools=[...])`."""
    if isinstance(obj, Tool):
        return obj
    if callable(obj):
        return _from_function(obj, None, None, None)
    raise TypeError(f"tools must be functions or Tool objects, got {type(obj).__name__}")



def import_tool(ref: str) -> Tool:
    """The tool at `module:qualname` or `/path/to/file.py:qualname` (see `Tool.ref`)."""
    import importlib
    import importlib.util

    module_name, sep, qualname = ref.rpartition(":")
    if not sep or not module_name or not qualname:
        raise ValueError(f"tool reference {ref!r} must look like 'module:function'")
    if module_name.endswith(".py"):
        spec = importlib.util.spec_from_file_location(f"_swarmoe_tools_{abs(hash(module_name))}",
                                                      module_name)
        if spec is None or spec.loader is None:
            raise ValueError(f"cannot load tool module file {module_name!r}")
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
    else:
        module = importlib.import_module(module_name)
    obj: Any = module
    for part in qualname.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            raise ValueError(f"tool reference {ref!r}: {module_name} has no {qualname!r}")
    return as_tool(obj)
