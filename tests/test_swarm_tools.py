"""`@tool`: schemas from signatures and docstrings, validation, sync and async functions,
result rendering; and the context a sub-agent is given."""

from __future__ import annotations

import asyncio
import threading
from typing import Annotated, Literal

import pydantic
import pytest

from swarmoe import Swarm, tool
from swarmoe.swarm import Tool, ToolError, import_tool
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply


def test_schema_comes_from_signature_and_docstring():
    @tool
    def search(query: str, k: int = 5, mode: Literal["fast", "exact"] = "fast",
               tags: list[str] | None = None,
               year: Annotated[int, pydantic.Field(ge=1900)] = 2024) -> list[str]:
        """Search the corpus.

        Longer text that is not part of the description.

        Args:
            query: what to look for,
                over two lines
            k: how many hits
        Returns:
            hits
        """
        return []

    fn = search.schema["function"]
    assert fn["name"] == "search" and fn["description"] == "Search the corpus."
    params = fn["parameters"]
    assert params["required"] == ["query"]
    assert params["additionalProperties"] is False
    assert params["properties"]["query"] == {"type": "string",
                                             "description": "what to look for, over two lines"}
    assert params["properties"]["k"]["default"] == 5
    assert params["properties"]["mode"]["enum"] == ["fast", "exact"]
    assert params["properties"]["year"]["minimum"] == 1900


async def test_arguments_are_validated_and_results_rendered():
    @tool(name="add", description="Add two numbers.", timeout=3)
    async def add_numbers(a: int, b: float = 0.5) -> dict:
        return {"sum": a + b}

    assert add_numbers.name == "add" and add_numbers.timeout == 3
    assert await add_numbers.invoke({"a": 2}) == '{"sum":2.5}'
    assert await add_numbers.invoke({"a": "3", "b": 1}) == '{"sum":4.0}'  # coerced: "3" -> 3, 1 -> 1.0
    with pytest.raises(ToolError, match="invalid arguments for 'add': a: "):
        await add_numbers.invoke({"a": "three"})
    with pytest.raises(ToolError, match="c: Extra inputs"):
        await add_numbers.invoke({"a": 1, "c": 2})


async def test_sync_tools_run_off_the_event_loop():
    loop_thread = threading.get_ident()

    @tool
    def where() -> str:
        return "loop" if threading.get_ident() == loop_thread else "worker"

    assert await where.invoke({}) == "worker"


def test_bad_tool_definitions_fail_at_decoration():
    with pytest.raises(TypeError, match="args"):
        tool(lambda *args: None)
    with pytest.raises(ValueError, match="tool name"):
        tool(name="has space")(lambda: None)


def test_tools_are_found_again_by_reference():
    found = import_tool("swarm_helpers:lookup")
    assert isinstance(found, Tool) and found.name == "lookup"
    assert found.ref == "swarm_helpers:lookup"
    with pytest.raises(ValueError, match="module:function"):
        import_tool("nocolon")


async def test_subagent_context_is_its_prompt_plus_tools_and_keeps_reasoning(tmp_path):
    @tool
    async def echo(text: str) -> str:
        await asyncio.sleep(0)
        return text

    def script(body):
        names = [t["function"]["name"] for t in body["tools"]]
        msgs = body["messages"]
        steps = sum(m["role"] == "assistant" for m in msgs)
        if "create_subagent" in names:
            if steps == 0:
                return reply(tool_calls=[("create_subagent", {"name": "w", "system_prompt": "SYS"})])
            if steps == 1:
                return reply(tool_calls=[("assign_task", {"agent": "w", "prompt": "TASK"})])
            return reply(msgs[-1]["content"])
        assert names == ["echo"]
        if steps == 0:
            assert msgs == [{"role": "system", "content": "SYS"},
                            {"role": "user", "content": "TASK"}]
            return reply(reasoning_content="think first", tool_calls=[("echo", {"text": "a"}),
                                                                      ("echo", {"text": "b"})])
        assert msgs[2]["reasoning_content"] == "think first"
        assert [m["content"] for m in msgs[3:]] == ["a", "b"]
        assert [m["tool_call_id"] for m in msgs[3:]] == [c["id"] for c in msgs[2]["tool_calls"]]
        return reply("sub-agent done")

    fake = FakeModel(script)
    result = await Swarm(fake.backend(), tools=[echo], runs_dir=tmp_path).run("go")
    assert result.answer == "sub-agent done"
    assert fake.counts["script_error"] == 0


async def test_subagent_answers_are_checked_against_a_schema(tmp_path):
    class Finding(pydantic.BaseModel):
        value: int

    def script(body):
        names = [t["function"]["name"] for t in body["tools"]]
        msgs = body["messages"]
        steps = sum(m["role"] == "assistant" for m in msgs)
        if "create_subagent" in names:
            if steps == 0:
                return reply(tool_calls=[("create_subagent", {"name": "w", "system_prompt": "S"}),
                                         ("assign_task", {"agent": "w", "prompt": "P"})])
            return reply(msgs[-1]["content"])
        assert '"value"' in msgs[0]["content"]  # the schema is in the system prompt
        if steps == 0:
            return reply("forty-two")
        assert "not valid" in msgs[-1]["content"]
        return reply('{"value": 42}')

    fake = FakeModel(script)
    result = await Swarm(fake.backend(), result_schema=Finding, runs_dir=tmp_path).run("go")
    assert result.answer == '{"value": 42}'
    assert result.stats.total_steps == 4  # 2 orchestrator + the rejected and the valid answer
