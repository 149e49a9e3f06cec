"""TypeScript-style tool declarations (`tools_ts_str`), written out by hand from the format."""

from __future__ import annotations

import pytest

from swarmoe.text.tool_declaration import tools_to_typescript

HEAD = "# Tools\n\n## functions\nnamespace functions {\n"


def fn(name: str, parameters: dict, description: str | None = None) -> dict:
    function: dict = {"name": name, "parameters": parameters}
    if description is not None:
        function["description"] = description
    return {"type": "function", "function": function}


def test_empty_and_non_function_tools() -> None:
    assert tools_to_typescript([]) == ""
    assert tools_to_typescript([{"type": "_plugin", "_plugin": {}}]) == ""


def test_required_first_then_optional_sorted_with_comments() -> None:
    tool = fn(
        "get_weather",
        {
            "type": "object",
            "required": ["location"],
            "properties": {
                "unit": {
                    "type": "string",
                    "enum": ["celsius", "fahrenheit"],
                    "description": "Temperature unit",
                },
                "location": {"type": "string", "description": "City and state\nlike SF, CA"},
                "days": {"type": "integer", "minimum": 1, "maximum": 7, "default": 3},
            },
        },
        description="Get the current weather for a location",
    )
    assert tools_to_typescript([tool]) == HEAD + (
        "// Get the current weather for a location\n"
        "type get_weather = (_: {\n"
        "  // City and state\n"
        "  // like SF, CA\n"
        "  location: string,\n"
        "  // maximum: 7, minimum: 1\n"
        "  // Default: 3\n"
        "  days?: number,\n"
        "  // Temperature unit\n"
        '  unit?: "celsius" | "fahrenheit"\n'
        "}) => any;\n"
        "}\n"
    )


def test_nested_objects_arrays_unions() -> None:
    tool = fn(
        "search",
        {
            "type": "object",
            "required": ["filters"],
            "properties": {
                "filters": {
                    "type": "object",
                    "properties": {"tag": {"type": ["string", "null"]}},
                    "additionalProperties": False,
                },
                "ids": {"type": "array", "items": {"type": "integer"}, "maxItems": 5},
                "notes": {"type": "array", "items": {"type": "string", "description": "a note"}},
                "any": {},
                "choice": {"anyOf": [{"type": "string"}, {"type": "boolean"}]},
            },
        },
    )
    assert tools_to_typescript([tool]) == HEAD + (
        "type search = (_: {\n"
        "  filters: {\n"
        "    tag?: string | null,\n"
        "    [k: string]: never\n"
        "  },\n"
        "  any?: any,\n"
        "  choice?: string | boolean,\n"
        "  // maxItems: 5\n"
        "  ids?: Array<number>,\n"
        "  notes?: Array<\n"
        "    // a note\n"
        "    string\n"
        "  >\n"
        "}) => any;\n"
        "}\n"
    )


def test_no_parameters_and_several_tools() -> None:
    out = tools_to_typescript([fn("ping", {}), fn("pong", {"type": "object", "properties": {}})])
    assert out == HEAD + "type ping = (_: {}) => any;\ntype pong = (_: {}) => any;\n}\n"


def test_defs_and_self_reference() -> None:
    tool = fn(
        "tree",
        {
            "type": "object",
            "properties": {"child": {"$ref": "#"}, "node": {"$ref": "#/$defs/Node"}},
            "$defs": {"Node": {"type": "object", "description": "A node", "properties": {}}},
        },
    )
    assert tools_to_typescript([tool]) == HEAD + (
        "interface parameters {\n  child?: parameters,\n  node?: Node\n}\n"
        "// A node\ninterface Node {}\n"
        "type tree = (_: parameters) => any;\n}\n"
    )


@pytest.mark.parametrize(
    "schema",
    [
        {"type": "object", "properties": {"a": {"$ref": "#/$defs/Missing"}}},
        {"type": "object", "properties": {"a": {"title": "no type"}}},
        {"type": "object", "properties": {"a": {"type": ["string", "weird"]}}},
        {"type": "object", "additionalProperties": "yes"},
    ],
)
def test_unsupported_schemas_raise(schema: dict) -> None:
    with pytest.raises(ValueError):
        tools_to_typescript([fn("f", schema)])
