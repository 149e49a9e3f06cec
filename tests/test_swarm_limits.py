"""Limits shared by all agents of a run: retries with Retry-After, request concurrency and
rate buckets, sub-agent and step caps, token budget, deadline (which cancels work in flight)."""

from __future__ import annotations

import asyncio
import time

import pytest

from swarmoe import Swarm, tool
from swarmoe.swarm import AssistantMessage, BackendError, OpenAIBackend, RunStopped
from swarmoe.swarm.backends import parse_retry_after
from swarmoe.swarm.limits import RetryPolicy, TokenBucket
from swarmoe.testing import FakeModel
from swarmoe.testing.fake_model import WideLookup, reply


class Flaky:
    """A ChatBackend that fails the first `failures` calls with a Retry-After, then answers."""

    def __init__(self, failures: int, retry_after: float | None) -> None:
        self.failures, self.retry_after = failures, retry_after
        self.times: list[float] = []

    async def chat(self, messages, tools, sampling):
        self.times.append(time.monotonic())
        if len(self.times) <= self.failures:
            raise BackendError("429", retryable=True, retry_after=self.retry_after, status=429)
        return AssistantMessage(content="done")

    async def aclose(self):
        pass


async def test_retry_after_is_honoured(tmp_path):
    flaky = Flaky(failures=2, retry_after=0.3)
    result = await Swarm(flaky, runs_dir=tmp_path).run("t")
    assert result.answer == "done" and result.stats.retries == 2
    gaps = [b - a for a, b in zip(flaky.times, flaky.times[1:], strict=False)]
    assert all(g >= 0.3 for g in gaps), gaps


async def test_retries_give_up_with_a_clear_reason(tmp_path):
    swarm = Swarm(Flaky(failures=100, retry_after=0.0), retry=RetryPolicy(max_attempts=3),
                  runs_dir=tmp_path)
    with pytest.raises(RunStopped, match="orchestrator model call failed: 429"):
        await swarm.run("t")


def test_retry_after_header_forms():
    assert parse_retry_after({"retry-after": "2"}) == 2.0
    assert parse_retry_after({"retry-after-ms": "250"}) == 0.25
    assert parse_retry_after({"retry-after": "Wed, 21 Oct 2015 07:28:00 GMT"}) == 0.0
    assert parse_retry_after({}) is None


async def test_openai_backend_classifies_http_failures():
    messages = [{"role": "user", "content": "hi"}]
    for fake, status, retryable in [
        (FakeModel(str, rate_429=1.0, retry_after=0.25), 429, True),
        (FakeModel(str, rate_500=1.0), 500, True),
        (FakeModel(lambda body: 1 / 0), 400, False),  # a broken script is a 400
    ]:
        with fake.serve() as url:
            backend = OpenAIBackend("fake", base_url=url, api_key="k")
            with pytest.raises(BackendError) as err:
                await backend.chat(messages, [], {})
            await backend.aclose()
        assert err.value.status == status and err.value.retryable is retryable
        if status == 429:
            assert err.value.retry_after == 0.25
    hung = FakeModel(str, rate_timeout=1.0, hang=5)
    with hung.serve() as url:
        backend = OpenAIBackend("fake", base_url=url, api_key="k", timeout=0.3)
        with pytest.raises(BackendError, match="Timeout") as err:
            await backend.chat(messages, [], {})
        await backend.aclose()
    assert err.value.retryable


async def test_hung_calls_time_out_and_are_retried(tmp_path):
    fake = FakeModel(lambda body: "fine", rate_timeout=0.5, hang=30, seed=3)
    result = await Swarm(fake.backend(timeout=0.2), runs_dir=tmp_path).run("t")
    assert result.answer == "fine"
    assert result.stats.retries == fake.counts["timeout"] > 0


async def test_one_request_at_a_time_still_runs_every_agent(tmp_path):
    work = WideLookup(groups=6, rounds=1, per_round=2, tool_latency=0.0)
    fake = FakeModel(work.script, latency=0.01)
    inner = fake.backend()
    in_flight = peak = 0

    class Counting:
        async def chat(self, *args):
            nonlocal in_flight, peak
            in_flight += 1
            peak = max(peak, in_flight)
            try:
                return await inner.chat(*args)
            finally:
                in_flight -= 1

        async def aclose(self):
            pass

    swarm = Swarm(Counting(), tools=[tool(work.lookup)], max_concurrent_requests=1,
                  runs_dir=tmp_path)
    result = await swarm.run(work.task)
    assert result.answer == work.expected_answer()
    assert peak == 1 and result.stats.total_steps == 3 + 6 * 2


async def test_rate_bucket_spaces_requests():
    bucket = TokenBucket(per_minute=600)  # 10 a second, bursting to 600
    for _ in range(600):
        await bucket.take(1)
    started = time.monotonic()
    for _ in range(5):
        await bucket.take(1)
    assert time.monotonic() - started >= 0.4


async def test_subagent_cap_and_subagent_step_limit_are_errors_for_the_model(tmp_path):
    def script(body):
        names = {t["function"]["name"] for t in body["tools"]}
        steps = sum(m["role"] == "assistant" for m in body["messages"])
        if "create_subagent" not in names:
            return reply(tool_calls=[("lookup", {"key": "x"})])  # never answers
        if steps == 0:
            return reply(tool_calls=[("create_subagent", {"name": f"w{i}", "system_prompt": "s"})
                                     for i in range(5)])
        if steps == 1:
            return reply(tool_calls=[("assign_task", {"agent": "w0", "prompt": "p"})])
        return reply(body["messages"][-1]["content"])

    @tool
    def lookup(key: str) -> str:
        return key

    fake = FakeModel(script)
    result = await Swarm(fake.backend(), tools=[lookup], max_subagents=3, subagent_max_steps=2,
                         runs_dir=tmp_path).run("t")
    created = [m["content"] for m in fake.requests[1]["messages"] if m["role"] == "tool"]
    assert created[:3] == ["Created sub-agent 'w0'.", "Created sub-agent 'w1'.",
                           "Created sub-agent 'w2'."]
    assert all("limit of 3 sub-agents" in c for c in created[3:])
    assert result.answer == "Error: sub-agent 'w0' reached max_steps=2 without a final answer"
    assert result.stats.subagents == 3
    # Orchestrator steps 1, 1 + 2 (the capped sub-agent), 1.
    assert result.stats.critical_steps == 5


async def test_token_budget_stops_the_run_with_partial_results(tmp_path):
    work = WideLookup(groups=10, tool_latency=0.01)
    fake = FakeModel(work.script, latency=0.01)
    swarm = Swarm(fake.backend(), tools=[tool(work.lookup)], max_tokens=5000, runs_dir=tmp_path)
    with pytest.raises(RunStopped, match="token budget") as stopped:
        await swarm.run(work.task)
    stats = stopped.value.result.stats
    assert stats.prompt_tokens + stats.completion_tokens > 5000
    assert 0 < stats.total_steps < 43


async def test_deadline_cancels_calls_in_flight(tmp_path):
    cancelled = 0

    @tool
    async def wait_long() -> str:
        nonlocal cancelled
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return "never"

    fake = FakeModel(lambda body: reply(tool_calls=[("wait_long", {})] * 50))
    swarm = Swarm(fake.backend(), tools=[wait_long], deadline=0.3, runs_dir=tmp_path)
    started = time.monotonic()
    with pytest.raises(RunStopped, match="deadline"):
        await swarm.run("t")
    assert time.monotonic() - started < 2
    assert cancelled == 50
