"""One agent's loop: ask the model, run every tool call of its message concurrently, append the
results in call order, repeat until it answers without tool calls or runs out of steps.

The loop knows nothing of HTTP, journals or limits: it talks to a `Runtime` (the run in
`swarm.py`), which is what makes the same loop serve the orchestrator and every sub-agent.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from swarmoe.swarm.backends import AssistantMessage, BackendError, Message, ToolCall


@dataclass
class ToolOutcome:
    content: str
    is_error: bool = False
    critical_steps: int = 0
    """Critical steps of the sub-agent this call ran (assign_task), else 0."""


@dataclass
class AgentOutcome:
    answer: str | None
    steps: int
    critical_steps: int
    """Steps on this agent's critical path: each step counts 1 plus the largest critical step
    count among the sub-agents it ran (Kimi K2.5's CriticalSteps; equals `steps` for an agent
    that runs no sub-agents)."""
    error: str | None = None
    failure: BackendError | None = None
    """The model call that kept failing, if that is why the agent stopped."""


@dataclass
class Agent:
    id: str
    """Path-like key from the run's structure (e.g. `main@1#3`): the same on every replay."""
    name: str
    system_prompt: str
    tools: Sequence[Mapping[str, Any]]
    max_steps: int
    check_answer: Callable[[str | None], str | None] | None = field(default=None, repr=False)
    """Returns what is wrong with a final answer (told to the agent, which tries again), or None."""


class Runtime(Protocol):
    async def chat(self, agent: Agent, step: int, messages: list[Message]) -> AssistantMessage: ...

    async def call_tool(self, agent: Agent, step: int, index: int, call: ToolCall) -> ToolOutcome: ...


async def run_agent(agent: Agent, prompt: str, runtime: Runtime) -> AgentOutcome:
    messages: list[Message] = [
        {"role": "system", "content": agent.system_prompt},
        {"role": "user", "content": prompt},
    ]
    steps = critical = 0
    while steps < agent.max_steps:
        try:
            msg = await runtime.chat(agent, steps, messages)
        except BackendError as e:
            return AgentOutcome(None, steps, critical, error=f"failed: {e}", failure=e)
        step, steps = steps, steps + 1
        messages.append(msg.to_message())
        if not msg.tool_calls:
            critical += 1
            problem = agent.check_answer(msg.content) if agent.check_answer else None
            if problem is None:
                return AgentOutcome(msg.content, steps, critical)
            messages.append({"role": "user", "content": problem})
            continue
        outcomes = await asyncio.gather(
            *(runtime.call_tool(agent, step, i, call) for i, call in enumerate(msg.tool_calls)))
        critical += 1 + max(o.critical_steps for o in outcomes)
        messages.extend(
            {"role": "tool", "tool_call_id": call.id, "content": o.content}
            for call, o in zip(msg.tool_calls, outcomes, strict=True))
    return AgentOutcome(None, steps, critical,
                        error=f"reached max_steps={agent.max_steps} without a final answer")
