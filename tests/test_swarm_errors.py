"""Bad model output and failing tools become tool errors the model sees and recovers from;
none of them ends the run."""

from __future__ import annotations

import asyncio

import pytest

from swarmoe import Swarm, tool
from swarmoe.swarm import RunStopped
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply


@tool
async def lookup(key: str) -> str:
    """Look a key up."""
    return key.upper()


@tool
def boom(x: int) -> str:
    """Always fails."""
    raise ValueError(f"no good: {x}")


@tool(timeout=0.2)
async def slow() -> str:
    """Never finishes in time."""
    await asyncio.sleep(30)
    return "late"


def tool_results(body) -> dict[str, str]:
    """tool_call_id -> content of the tool messages answering the last assistant message."""
    msgs = body["messages"]
    last = max(i for i, m in enumerate(msgs) if m["role"] == "assistant")
    return {m["tool_call_id"]: m["content"] for m in msgs[last + 1:] if m["role"] == "tool"}


def orchestrator_script(body):
    names = {t["function"]["name"] for t in body["tools"]}
    steps = sum(m["role"] == "assistant" for m in body["messages"])
    if "create_subagent" not in names:  # the sub-agent: one bad call, then an answer
        if steps == 0:
            return reply(tool_calls=[("no_such_tool", {}), ("lookup", {"key": "abc"})])
        return reply(" | ".join(tool_results(body).values()))
    if steps == 0:
        return reply(tool_calls=[
            ("no_such_tool", {"q": 1}),
            ("lookup", "{not json"),
            ("lookup", {}),
            ("lookup", {"key": "k", "extra": 1}),
            ("assign_task", {"agent": "ghost", "prompt": "hi"}),
            ("boom", {"x": 3}),
            ("slow", {}),
            ("create_subagent", {"name": "w", "system_prompt": "helper"}),
            ("create_subagent", {"name": "w", "system_prompt": "again"}),
        ])
    if steps == 1:
        return reply(tool_calls=[("assign_task", {"agent": "w", "prompt": "go"})])
    return reply("recovered: " + next(iter(tool_results(body).values())))


async def test_bad_calls_come_back_as_errors_and_the_run_goes_on(tmp_path):
    fake = FakeModel(orchestrator_script)
    swarm = Swarm(fake.backend(), tools=[lookup, boom, slow], runs_dir=tmp_path)
    result = await swarm.run("exercise every failure")
    # What the model was told after its first message, in call order:
    errors = list(tool_results(fake.requests[1]).values())
    assert errors[0].startswith("Error: unknown tool 'no_such_tool'")
    assert "available tools:" in errors[0] and "lookup" in errors[0]
    assert "not valid JSON" in errors[1] and "{not json" in errors[1]
    assert "invalid arguments for 'lookup'" in errors[2] and "key" in errors[2]
    assert "extra" in errors[3]
    assert "unknown sub-agent 'ghost'" in errors[4]
    assert "raised ValueError: no good: 3" in errors[5]
    assert "timed out after 0.2 s" in errors[6]
    assert errors[7] == "Created sub-agent 'w'."
    assert "already exists" in errors[8]
    # The sub-agent's own bad call was reported to it, and it still answered.
    assert result.answer.startswith("recovered: Error: unknown tool 'no_such_tool'")
    assert result.answer.endswith("| ABC")
    assert result.stats.subagents == 1
    # User-tool calls: 3 lookups + boom + slow from the orchestrator, 1 lookup from the worker;
    # unknown tools and swarm tools are not counted.
    assert result.stats.tool_calls == 6
    assert result.stats.tool_errors == 5


async def test_a_failing_subagent_model_call_is_an_error_result(tmp_path):
    def script(body):
        names = {t["function"]["name"] for t in body["tools"]}
        if "create_subagent" not in names:
            raise RuntimeError("this sub-agent's model is broken")  # -> HTTP 400, not retried
        steps = sum(m["role"] == "assistant" for m in body["messages"])
        if steps == 0:
            return reply(tool_calls=[("create_subagent", {"name": "w", "system_prompt": "x"}),
                                     ("assign_task", {"agent": "w", "prompt": "y"})])
        return reply("saw: " + list(tool_results(body).values())[1])

    result = await Swarm(FakeModel(script).backend(), runs_dir=tmp_path).run("t")
    assert result.answer.startswith("saw: Error: sub-agent 'w' failed")
    assert "broken" in result.answer


async def test_orchestrator_step_limit_stops_the_run_with_partial_stats(tmp_path):
    loop_forever = FakeModel(lambda body: reply(tool_calls=[("lookup", {"key": "a"})]))
    swarm = Swarm(loop_forever.backend(), tools=[lookup], orchestrator_max_steps=3,
                  runs_dir=tmp_path)
    with pytest.raises(RunStopped, match="max_steps=3") as stopped:
        await swarm.run("never ends")
    assert stopped.value.result.stats.total_steps == 3
    assert stopped.value.result.stats.tool_calls == 3


def test_unknown_config_keys_and_bad_values_are_named():
    with pytest.raises(TypeError, match="max_subagent"):
        Swarm(FakeModel(str).backend(), max_subagent=3)
    with pytest.raises(ValueError, match="max_subagents"):
        Swarm(FakeModel(str).backend(), max_subagents=-1)
    with pytest.raises(ValueError, match="reserved"):
        Swarm(FakeModel(str).backend(), tools=[tool(name="assign_task")(lambda: "x")])
    with pytest.raises(ValueError, match="two tools"):
        Swarm(FakeModel(str).backend(), tools=[lookup, lookup])
    with pytest.raises(ValueError, match="prices"):
        Swarm(FakeModel(str).backend(), max_cost=1.0)
    with pytest.raises(TypeError, match="model must be"):
        Swarm(42)
    with pytest.raises(TypeError, match="result_schema"):
        Swarm(FakeModel(str).backend(), result_schema=42)


async def test_runs_leave_the_garbage_collector_as_they_found_it(tmp_path):
    """Objects older than a run are frozen out of GC scans only while runs go, also when a run
    is stopped, so nothing stays alive after it."""
    import gc

    frozen_during = []

    @tool
    async def probe() -> str:
        """Report."""
        frozen_during.append(gc.get_freeze_count())
        return "ok"

    assert gc.get_freeze_count() == 0
    once = FakeModel(lambda body: reply(tool_calls=[("probe", {})])
                     if sum(m["role"] == "assistant" for m in body["messages"]) == 0 else reply("done"))
    assert (await Swarm(once.backend(), tools=[probe], runs_dir=tmp_path).run("t")).answer == "done"
    assert frozen_during and frozen_during[0] > 0
    assert gc.get_freeze_count() == 0
    forever = FakeModel(lambda body: reply(tool_calls=[("probe", {})]))
    with pytest.raises(RunStopped):
        await Swarm(forever.backend(), tools=[probe], orchestrator_max_steps=2, runs_dir=tmp_path).run("t")
    assert gc.get_freeze_count() == 0
