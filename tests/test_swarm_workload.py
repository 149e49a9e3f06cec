"""The issue's headline workload: 100 sub-agents x 15 lookups in 3 parallel rounds of 5, over
real HTTP against a scripted OpenAI-compatible model with 0.5 s calls and 0.5 s tools."""

from __future__ import annotations

import time

import pytest

from swarmoe import Swarm, tool
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import WideLookup

LATENCY = 0.5
# Orchestrator: create (1) + assign (1 + 4 sub-agent steps) + answer (1).
CRITICAL_STEPS = 7
TOTAL_STEPS = 3 + 100 * 4
# The critical path in time: 7 model calls and 3 tool rounds on it.
CRITICAL_PATH_S = CRITICAL_STEPS * LATENCY + 3 * LATENCY


def check_exact(work: WideLookup, result) -> None:
    assert result.answer == work.expected_answer()
    assert sorted(work.executed) == sorted(k for g in range(work.groups) for k in work.keys(g))
    assert set(work.executed.values()) == {1}, "a tool call ran twice"
    assert result.stats.tool_calls == 1500
    assert result.stats.subagents == 100
    assert result.stats.critical_steps == CRITICAL_STEPS
    assert result.stats.total_steps == TOTAL_STEPS


async def test_hundred_subagents_over_http_run_in_parallel(tmp_path):
    work = WideLookup(groups=100, tool_latency=LATENCY)
    fake = FakeModel(work.script, latency=LATENCY)
    with fake.serve() as url:
        swarm = Swarm("fake", base_url=url, api_key="test", tools=[tool(work.lookup)],
                      max_subagents=100, runs_dir=tmp_path)
        started = time.monotonic()
        result = await swarm.run(work.task)
        wall = time.monotonic() - started
    check_exact(work, result)
    assert fake.counts["ok"] == TOTAL_STEPS
    # Serial execution would take minutes; parallel must stay near the critical path.
    assert wall <= 1.5 * CRITICAL_PATH_S, f"wall {wall:.2f} s vs critical path {CRITICAL_PATH_S} s"


@pytest.mark.parametrize("transport", ["http", "in-process"])
async def test_rate_limits_and_server_errors_change_nothing(tmp_path, transport):
    work = WideLookup(groups=100, tool_latency=LATENCY)
    fake = FakeModel(work.script, latency=LATENCY, rate_429=0.20, rate_500=0.05,
                     retry_after=0.2, seed=7)
    lookup = tool(work.lookup)
    if transport == "http":
        with fake.serve() as url:
            swarm = Swarm("fake", base_url=url, api_key="test", tools=[lookup], runs_dir=tmp_path)
            result = await swarm.run(work.task)
    else:
        result = await Swarm(fake.backend(), tools=[lookup], runs_dir=tmp_path).run(work.task)
    check_exact(work, result)
    assert fake.counts["429"] > 0 and fake.counts["500"] > 0
    assert result.stats.retries == fake.counts["429"] + fake.counts["500"]
