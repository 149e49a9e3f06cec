"""Tool schemas as the TypeScript-style declaration K2.5 was trained on (`tools_ts_str`).

The K2.5 release's tokenizer turns OpenAI tool definitions into a `namespace functions { ... }`
block and hands it to the chat template, which prefers it over raw JSON. This module produces
that text from JSON Schema: required fields first, then optional ones (`name?:`), each sorted by
name; descriptions, a few constraints and defaults as `//` comments; `integer` printed as
`number`; `$defs` as interfaces. A schema it cannot express raises `ValueError`, and callers
fall back to the JSON declaration.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from typing import Any

_INDENT = "  "
_FIELD_SEP = ",\n"
_CONSTRAINT_KEYS = {
    "string": ("maxLength", "minLength", "pattern"),
    "number": ("maximum", "minimum"),
    "integer": ("maximum", "minimum"),
    "array": ("minItems", "maxItems"),
}
_UNION_NAMES = {
    "string": "string",
    "number": "number",
    "integer": "number",
    "boolean": "boolean",
    "null": "null",
    "object": "{}",
    "array": "Array<any>",
}


class _Defs:
    """`$defs` seen while walking one function's parameters, and whether `#` was referenced."""

    def __init__(self) -> None:
        self.schemas: dict[str, Any] = {}
        self.self_ref = False


def _comment(text: str, indent: str = "") -> str:
    return "\n".join(f"{indent}// {line}" if line else "" for line in text.split("\n"))


def _kind(schema: Any) -> str:
    """Which rendering rule applies, in the precedence the release uses."""
    if isinstance(schema, bool):
        return "any" if schema else "null"
    if not isinstance(schema, Mapping):
        raise ValueError(f"not a JSON schema: {schema!r}")
    if "$ref" in schema:
        return "ref"
    if "anyOf" in schema:
        return "anyOf"
    if "enum" in schema:
        return "enum"
    if "type" in schema:
        kind = schema["type"]
        if isinstance(kind, list):
            return "union"
        if not isinstance(kind, str):
            raise ValueError(f"schema type must be a string or list: {kind!r}")
        return kind
    if not schema:
        return "any"
    raise ValueError(f"cannot declare schema {schema!r}")


def _doc(schema: Any, indent: str) -> str:
    """Comment lines (each ending in a newline) above a field or array item."""
    if not isinstance(schema, Mapping):
        return ""
    lines = []
    if schema.get("description"):
        lines.append(_comment(schema["description"], indent))
    keys = _CONSTRAINT_KEYS.get(_kind(schema), ())
    constraints = sorted((k, schema[k]) for k in keys if k in schema)
    if constraints:
        lines.append(f"{indent}// " + ", ".join(f"{k}: {v}" for k, v in constraints))
    return "".join(line + "\n" for line in lines)


def _register(schema: Any, defs: _Defs) -> None:
    if isinstance(schema, Mapping) and isinstance(schema.get("$defs"), Mapping):
        defs.schemas.update(schema["$defs"])


def _field(name: str, schema: Any, optional: bool, indent: str, defs: _Defs) -> str:
    text = _doc(schema, indent)
    default = schema.get("default") if isinstance(schema, Mapping) else None
    if default is not None:
        shown = (
            repr(default)
            if isinstance(default, int | float | bool)
            else json.dumps(default, ensure_ascii=False)
        )
        text += f"{indent}// Default: {shown}\n"
    return text + f"{indent}{name}{'?' if optional else ''}: {_type(schema, indent, defs)}"


def _object(schema: Mapping[str, Any], indent: str, defs: _Defs) -> str:
    _register(schema, defs)
    properties = schema.get("properties") or {}
    required = set(schema.get("required") or ())
    names = sorted(n for n in properties if n in required)
    names += sorted(n for n in properties if n not in required)
    inner = indent + _INDENT
    fields = [_field(n, properties[n], n not in required, inner, defs) for n in names]
    extra = schema.get("additionalProperties")
    if extra is not None:
        if extra is True:
            extra_type = "any"
        elif extra is False:
            extra_type = "never"
        elif isinstance(extra, Mapping):
            extra_type = _type(extra, inner, defs)
        else:
            raise ValueError(f"unsupported additionalProperties: {extra!r}")
        fields.append(f"{inner}[k: string]: {extra_type}")
    if not fields:
        return "{}"
    return "{\n" + _FIELD_SEP.join(fields) + "\n" + indent + "}"


def _type(schema: Any, indent: str, defs: _Defs) -> str:
    """The TypeScript type of `schema`, laid out for a field at `indent`."""
    kind = _kind(schema)
    if kind == "ref":
        ref = schema["$ref"]
        if ref == "#":
            defs.self_ref = True
            return "parameters"
        if ref.startswith("#/$defs/") and ref.rsplit("/", 1)[-1] in defs.schemas:
            return ref.rsplit("/", 1)[-1]
        raise ValueError(f"unresolvable $ref {ref!r}")
    if kind == "anyOf":
        return " | ".join(_type(s, indent, defs) for s in schema["anyOf"])
    if kind == "enum":
        return " | ".join(f'"{v}"' if isinstance(v, str) else str(v) for v in schema["enum"])
    if kind == "union":
        try:
            return " | ".join(_UNION_NAMES[t] for t in schema["type"])
        except (KeyError, TypeError):
            raise ValueError(f"unsupported type list {schema['type']!r}") from None
    if kind == "object":
        return _object(schema, indent, defs)
    if kind == "array":
        items = schema.get("items") or {}
        item_doc = _doc(items, indent + _INDENT)
        if item_doc:
            inner = indent + _INDENT
            return f"Array<\n{item_doc}{inner}{_type(items, inner, defs)}\n{indent}>"
        return f"Array<{_type(items, indent, defs)}>"
    return "number" if kind == "integer" else kind


def _function(function: Mapping[str, Any]) -> str:
    defs = _Defs()
    params = function.get("parameters") or {}
    if not isinstance(params, Mapping):
        raise ValueError("function parameters must be a JSON schema object")
    params_type = _object(params, "", defs)
    name = function.get("name", "function")
    interfaces = []
    if defs.self_ref:
        properties = params.get("properties") or {}
        required = set(params.get("required") or ())
        fields = [_field(n, s, n not in required, _INDENT, defs) for n, s in properties.items()]
        body = "\n" + _FIELD_SEP.join(fields) + "\n" if fields else ""
        interfaces.append(f"interface parameters {{{body}}}")
        signature = f"type {name} = (_: parameters) => any;"
    else:
        signature = f"type {name} = (_: {params_type}) => any;"
    for def_name, def_schema in list(defs.schemas.items()):
        described = def_schema.get("description") if isinstance(def_schema, Mapping) else None
        prefix = _comment(described) + "\n" if described else ""
        interfaces.append(f"{prefix}interface {def_name} {_type(def_schema, '', defs)}")
    description = function.get("description")
    parts = ["\n".join(interfaces), _comment(description) if description else "", signature]
    return "\n".join(p for p in parts if p)


def tools_to_typescript(tools: Sequence[Mapping[str, Any]]) -> str:
    """The `tools_ts_str` for OpenAI-style tools; "" when none is a function."""
    functions = [
        _function(tool["function"])
        for tool in tools
        if tool.get("type") == "function" and tool.get("function")
    ]
    if not functions:
        return ""
    return "# Tools\n\n## functions\nnamespace functions {\n" + "\n".join(functions) + "\n}\n"
