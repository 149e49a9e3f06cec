"""`spawn_subagents`: one call fans a prompt template out over items; results come back in item
order, each under its item, with the run's sub-agent cap and per-item errors."""

from __future__ import annotations

import asyncio

from swarmoe import Swarm, tool
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import reply


def _orchestrator_script(spawn_args, seen):
    def script(body):
        names = [t["function"]["name"] for t in body["tools"]]
        msgs = body["messages"]
        steps = sum(m["role"] == "assistant" for m in msgs)
        if "spawn_subagents" in names:
            if steps == 0:
                return reply(tool_calls=[("spawn_subagents", spawn_args)])
            seen.append(msgs[-1]["content"])
            return reply("done")
        prompt = msgs[1]["content"]
        if steps == 0:
            return reply(tool_calls=[("double", {"text": prompt.split(": ")[-1]})])
        if "boom" in prompt:
            return reply(tool_calls=[("double", {"text": "again"})])  # never answers
        return reply(f"{msgs[-1]['content']} ({msgs[0]['content'][:6]})")
    return script


async def test_spawn_runs_one_subagent_per_item_in_parallel_and_keeps_item_order(tmp_path):
    in_flight = peak = 0

    @tool
    async def double(text: str) -> str:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        await asyncio.sleep(0.05 if text != "b" else 0.2)  # 'b' finishes last
        in_flight -= 1
        return text * 2

    seen: list[str] = []
    items = ["a", "b", "c", "d"]
    fake = FakeModel(_orchestrator_script(
        {"prompt_template": "Double this: {{item}}", "items": items}, seen))
    result = await Swarm(fake.backend(), tools=[double], runs_dir=tmp_path).run("go")
    assert result.answer == "done"
    assert seen == ["\n\n".join(f"### {i}\n{i * 2} (You ar)" for i in items)]
    assert peak == len(items)
    assert result.stats.subagents == len(items)
    # orchestrator: spawn step (1 + the sub-agents' 2 steps) + its answer
    assert result.stats.critical_steps == 4
    assert fake.counts["script_error"] == 0


async def test_spawn_takes_a_system_prompt_and_reports_a_failing_item_in_its_block(tmp_path):
    @tool
    def double(text: str) -> str:
        return text * 2

    seen: list[str] = []
    fake = FakeModel(_orchestrator_script(
        {"prompt_template": "Double this: {{item}}", "items": ["x", "boom"],
         "system_prompt": "Doubler."}, seen))
    result = await Swarm(fake.backend(), tools=[double], runs_dir=tmp_path,
                         subagent_max_steps=3).run("go")
    assert result.answer == "done"
    first, second = seen[0].split("\n\n")
    assert first == "### x\nxx (Double)"
    assert second.startswith("### boom\nError: sub-agent") and "max_steps=3" in second


async def test_bad_spawn_calls_are_errors_the_orchestrator_hears(tmp_path):
    @tool
    def double(text: str) -> str:
        return text * 2

    cases = [
        ({"prompt_template": "no slot", "items": ["a"]}, "{{item}}"),
        ({"prompt_template": "{{item}}", "items": []}, "non-empty list"),
        ({"prompt_template": "{{item}}", "items": ["a", 3]}, "non-empty list"),
        ({"prompt_template": "{{item}}", "items": ["a", "b", "c"]}, "max_subagents=2"),
        ({"prompt_template": "{{item}}", "items": ["a"], "agent": "x"}, "unknown arguments"),
    ]
    for args, expected in cases:
        seen: list[str] = []
        fake = FakeModel(_orchestrator_script(args, seen))
        result = await Swarm(fake.backend(), tools=[double], runs_dir=tmp_path,
                             max_subagents=2).run("go")
        assert result.answer == "done"
        assert seen[0].startswith("Error:") and expected in seen[0], (args, seen)
        assert result.stats.subagents == 0
