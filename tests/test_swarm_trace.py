"""Observability: OpenTelemetry spans form the agent tree; `swarmoe trace` prints a timeline and
writes a Gantt chart; finished sub-agents are recorded at once (no barrier)."""

from __future__ import annotations

import asyncio
import re

from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from swarmoe import Swarm, tool
from swarmoe.cli import app
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import WideLookup, reply


async def test_spans_follow_genai_conventions_and_the_agent_tree(tmp_path):
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    work = WideLookup(groups=3, rounds=1, per_round=2, tool_latency=0.0)
    swarm = Swarm(FakeModel(work.script).backend(), tools=[tool(work.lookup)],
                  tracer_provider=provider, runs_dir=tmp_path)
    result = await swarm.run(work.task)
    spans = exporter.get_finished_spans()
    by_id = {s.context.span_id: s for s in spans}

    def parent(s):
        return by_id.get(s.parent.span_id) if s.parent else None

    agents = [s for s in spans if s.attributes["gen_ai.operation.name"] == "invoke_agent"]
    assert sorted(s.name for s in agents) == ["invoke_agent main", "invoke_agent w0",
                                              "invoke_agent w1", "invoke_agent w2"]
    root = next(s for s in agents if s.name == "invoke_agent main")
    assert root.parent is None
    for sub in (s for s in agents if s is not root):
        assign = parent(sub)
        assert assign.name == "execute_tool assign_task" and parent(assign) is root
    lookups = [s for s in spans if s.name == "execute_tool lookup"]
    assert len(lookups) == 6
    assert all(parent(s).name.startswith("invoke_agent w") for s in lookups)
    assert all(s.attributes["gen_ai.tool.call.id"] for s in lookups)
    chats = [s for s in spans if s.attributes["gen_ai.operation.name"] == "chat"]
    assert len(chats) == result.stats.total_steps
    assert sum(s.attributes["gen_ai.usage.input_tokens"] for s in chats) == \
        result.stats.prompt_tokens


async def test_finished_subagents_are_recorded_without_waiting_for_slow_ones(tmp_path):
    finished: dict[str, float] = {}

    @tool
    async def work(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "ok"

    def script(body):
        names = {t["function"]["name"] for t in body["tools"]}
        msgs = body["messages"]
        if "create_subagent" in names:
            steps = sum(m["role"] == "assistant" for m in msgs)
            if steps == 0:
                return reply(tool_calls=[
                    call for i in range(5) for call in (
                        ("create_subagent", {"name": f"w{i}", "system_prompt": "worker"}),
                        ("assign_task", {"agent": f"w{i}", "prompt": "1.0" if i == 0 else "0.05"}))])
            return reply("all done")
        if msgs[-1]["role"] == "user":
            return reply(tool_calls=[("work", {"seconds": float(msgs[-1]["content"])})])
        return reply("finished")

    def on_event(event):
        if event.kind == "agent_finish":
            finished[event.data["name"]] = event.t

    swarm = Swarm(FakeModel(script).backend(), tools=[work], on_event=on_event, runs_dir=tmp_path)
    await swarm.run("t")
    for fast in ("w1", "w2", "w3", "w4"):
        assert finished["w0"] - finished[fast] > 0.7


def test_trace_command_prints_timeline_and_writes_gantt(tmp_path):
    work = WideLookup(groups=4, rounds=2, per_round=3, tool_latency=0.01)
    swarm = Swarm(FakeModel(work.script, latency=0.01).backend(), tools=[tool(work.lookup)],
                  runs_dir=tmp_path)
    result = swarm.run_sync(work.task, run_id="traced")
    out = CliRunner().invoke(app, ["trace", "traced", "--runs-dir", str(tmp_path)],
                             terminal_width=200)
    assert out.exit_code == 0, out.output
    assert "finished" in out.output
    for name in ("main", "w0", "w3"):
        assert re.search(rf"\b{name}\b", out.output)
    page = (tmp_path / "traced.html").read_text()
    assert page.count('class="row"') == 5  # the orchestrator and 4 sub-agents
    assert page.count('class="tool"') == result.stats.tool_calls
    assert page.count('class="llm"') == result.stats.total_steps
    missing = CliRunner().invoke(app, ["trace", "nope", "--runs-dir", str(tmp_path)])
    assert missing.exit_code == 2 and "no journal" in missing.output
