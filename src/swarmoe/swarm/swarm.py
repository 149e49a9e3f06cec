"""`Swarm`: one orchestrator that creates sub-agents on the fly and runs them in parallel.

The orchestrator's model gets the user's tools plus three swarm tools, `create_subagent(name,
system_prompt)`, `assign_task(agent, prompt)` and `spawn_subagents(prompt_template, items)`.
Each assignment runs a fresh sub-agent context (its system prompt, the prompt as the user
message, the user's tools) with its own tool loop; its final message is the `assign_task`
result. Every tool call of one assistant message runs concurrently, so 100 `assign_task` calls
in one message are 100 agents at once; there is no barrier beyond "the message's calls are
done". `spawn_subagents` is the same fan-out in one short call: one sub-agent per item, the
item filled into the template, so the orchestrator does not decode 100 prompts before the last
sub-agent starts.

Bad model output (unknown tool or sub-agent, invalid JSON arguments) and failing tools become
error results the model can recover from; only budgets, the deadline, the orchestrator's step
limit or a model call that keeps failing end a run, with `RunStopped` carrying the partial result.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import AsyncExitStack, contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from swarmoe.swarm.agent import Agent, AgentOutcome, ToolOutcome, run_agent
from swarmoe.swarm.backends import (
    DEFAULT_MODEL,
    AssistantMessage,
    BackendError,
    ChatBackend,
    Message,
    ToolCall,
    resolve_backend,
)
from swarmoe.swarm.limits import Budget, BudgetExceeded, RequestLimiter, RetryPolicy
from swarmoe.swarm.mcp import MCPTools
from swarmoe.swarm.store import Event, Journal, new_run_id
from swarmoe.swarm.tools import Tool, ToolError, as_tool, import_tool
from swarmoe.swarm.trace import Spans, record_error, record_usage

ORCHESTRATOR = "main"

ORCHESTRATOR_PROMPT = """\
You are the orchestrator of an agent swarm. Split the task into independent pieces of work and \
delegate them. For the same work on many items, call spawn_subagents(prompt_template, items) \
once: each item fills {{item}}. For different work, create_subagent(name, system_prompt) then \
assign_task(agent, prompt). Sub-agents have their own context and the user's tools; they return \
only their final answer. Tool calls in one message run in parallel. Small tasks: do them \
yourself with the tools. Integrate the results into one final answer."""

SUBAGENT_PROMPT = """\
You are a sub-agent of a swarm. Do your task with the tools, then answer with only what the task \
asks for."""

MAX_SPAWN_ITEMS = 128
ITEM_SLOT = "{{item}}"

SWARM_TOOLS = [
    {"type": "function", "function": {
        "name": "create_subagent",
        "description": "Create a sub-agent with its own context, defined by a system prompt.",
        "parameters": {"type": "object", "properties": {
            "name": {"type": "string", "description": "Unique name to assign tasks to."},
            "system_prompt": {"type": "string", "description": "The sub-agent's role and rules."},
        }, "required": ["name", "system_prompt"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "assign_task",
        "description": "Run a sub-agent on a task (a fresh context each time); returns its final answer.",
        "parameters": {"type": "object", "properties": {
            "agent": {"type": "string", "description": "Name of a created sub-agent."},
            "prompt": {"type": "string", "description": "The task, self-contained."},
        }, "required": ["agent", "prompt"], "additionalProperties": False}}},
    {"type": "function", "function": {
        "name": "spawn_subagents",
        "description": "Run one sub-agent per item, all in parallel; results come back in item "
                       "order, each under a '### ITEM' heading.",
        "parameters": {"type": "object", "properties": {
            "prompt_template": {"type": "string",
                                "description": "The task for each sub-agent, with {{item}}."},
            "items": {"type": "array", "items": {"type": "string"}, "minItems": 1,
                      "maxItems": MAX_SPAWN_ITEMS},
            "system_prompt": {"type": "string", "description": "Optional role and rules."},
        }, "required": ["prompt_template", "items"], "additionalProperties": False}}},
]
SWARM_TOOL_NAMES = {t["function"]["name"] for t in SWARM_TOOLS}


@dataclass
class SwarmStats:
    critical_steps: int = 0
    """Kimi K2.5's CriticalSteps: each orchestrator step counts 1 + the largest step count among
    the sub-agents it ran in that step."""
    total_steps: int = 0
    """LLM calls of all agents."""
    tool_calls: int = 0
    """Calls of user tools (not create_subagent / assign_task), replayed ones included."""
    tool_errors: int = 0
    subagents: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cost: float | None = None
    retries: int = 0
    replayed: int = 0
    """Model responses and tool results taken from the journal instead of redone (resume)."""
    wall_seconds: float = 0.0


@dataclass
class SwarmResult:
    run_id: str
    answer: str | None
    stats: SwarmStats
    journal: Path


class RunStopped(Exception):
    """A run ended without an answer (budget, deadline, step limit, failing model); `result`
    holds what was done, and the run can be resumed."""

    def __init__(self, reason: str, result: SwarmResult) -> None:
        super().__init__(f"run {result.run_id} stopped: {reason}")
        self.reason = reason
        self.result = result


class Swarm:
    """An orchestrator plus sub-agents over one model backend.

    `model` is a model name on an OpenAI-compatible endpoint (`base_url`, default Moonshot's
    API), a `ChatBackend`, or an object with `chat_backend()`. Limits are shared by all agents
    of a run; the journal goes to `runs_dir/RUN_ID.sqlite`."""

    def __init__(
        self,
        model: str | ChatBackend | Any = DEFAULT_MODEL,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        mcp_servers: Sequence[MCPTools] = (),
        max_subagents: int = 100,
        max_tool_calls_in_flight: int = 1500,
        orchestrator_max_steps: int = 100,
        subagent_max_steps: int = 100,
        deadline: float | None = None,
        max_tokens: int | None = None,
        max_cost: float | None = None,
        prices: tuple[float, float] | None = None,
        rpm: float | None = None,
        tpm: float | None = None,
        max_concurrent_requests: int = 256,
        request_timeout: float = 600.0,
        tool_timeout: float = 120.0,
        retry: RetryPolicy | None = None,
        sampling: Mapping[str, Any] | None = None,
        system_prompt: str = ORCHESTRATOR_PROMPT,
        result_schema: Any = None,
        runs_dir: str | os.PathLike[str] | None = None,
        tracer_provider: Any = None,
        on_event: Callable[[Event], None] | None = None,
        tool_threads: int = 64,
    ) -> None:
        for key, value in (("max_subagents", max_subagents),
                           ("max_tool_calls_in_flight", max_tool_calls_in_flight),
                           ("orchestrator_max_steps", orchestrator_max_steps),
                           ("subagent_max_steps", subagent_max_steps),
                           ("max_concurrent_requests", max_concurrent_requests),
                           ("tool_threads", tool_threads)):
            if not isinstance(value, int) or value < (0 if key == "max_subagents" else 1):
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        self.tools = [as_tool(t) for t in tools]
        names = [t.name for t in self.tools]
        for name in names:
            if name in SWARM_TOOL_NAMES:
                raise ValueError(f"tool name {name!r} is reserved for the swarm")
            if names.count(name) > 1:
                raise ValueError(f"two tools are named {name!r}")
        if not (isinstance(model, str | ChatBackend)
                or callable(getattr(model, "chat_backend", None))):
            raise TypeError(f"model must be a model name, a ChatBackend or have chat_backend(); "
                            f"got {type(model).__name__}")
        if isinstance(model, str):
            if not (api_key or os.environ.get("MOONSHOT_API_KEY")
                    or os.environ.get("OPENAI_API_KEY")):
                raise ValueError(
                    "no API key: pass api_key= or set MOONSHOT_API_KEY or OPENAI_API_KEY")
            # Import the client now: its ~0.5 s import would otherwise land in the first run.
            import openai.types.chat  # noqa: F401
        self.model = model
        self.base_url = base_url
        self.api_key = api_key
        self.mcp_servers = list(mcp_servers)
        self.max_subagents = max_subagents
        self.max_tool_calls_in_flight = max_tool_calls_in_flight
        self.orchestrator_max_steps = orchestrator_max_steps
        self.subagent_max_steps = subagent_max_steps
        self.deadline = deadline
        self.max_tokens = max_tokens
        self.max_cost = max_cost
        self.prices = prices
        self.rpm = rpm
        self.tpm = tpm
        self.max_concurrent_requests = max_concurrent_requests
        self.request_timeout = request_timeout
        self.tool_timeout = tool_timeout
        self.retry = retry or RetryPolicy()
        self.sampling = dict(sampling or {})
        self.system_prompt = system_prompt
        self.answer_checker = None if result_schema is None else _AnswerChecker(result_schema)
        self.runs_dir = runs_dir
        self.tracer_provider = tracer_provider
        self.on_event = on_event
        self.tool_threads = tool_threads
        Budget(max_tokens=max_tokens, max_cost=max_cost, prices=prices)  # validate early

    # -- public entry points ---------------------------------------------------------------

    async def run(self, task: str, *, run_id: str | None = None) -> SwarmResult:
        """Run `task` to a final answer; raise `RunStopped` if the run ends without one."""
        if not isinstance(task, str) or not task.strip():
            raise ValueError("task must be a non-empty string")
        run_id = run_id or new_run_id()
        journal = Journal.open(run_id, self.runs_dir, create=True)
        if journal.meta():
            journal.close()
            raise ValueError(f"run {run_id!r} already exists; use resume() to continue it")
        journal.set_meta(task=task, config=self.config_record(), status="running",
                         created=time.time())
        return await _Run(self, journal, run_id, task, replay={}).execute()

    async def resume(self, run_id: str) -> SwarmResult:
        """Continue a run from its journal: recorded model responses and tool results are
        reused, so no finished LLM call or tool call happens again."""
        journal = Journal.open(run_id, self.runs_dir)
        meta = journal.meta()
        if "task" not in meta:
            journal.close()
            raise ValueError(f"run {run_id!r} has no task recorded; it cannot be resumed")
        journal.set_meta(status="running")
        return await _Run(self, journal, run_id, meta["task"], replay=journal.results()).execute()

    def run_sync(self, task: str, *, run_id: str | None = None) -> SwarmResult:
        return asyncio.run(self.run(task, run_id=run_id))

    def resume_sync(self, run_id: str) -> SwarmResult:
        return asyncio.run(self.resume(run_id))

    @classmethod
    def from_run(cls, run_id: str, *, runs_dir: str | os.PathLike[str] | None = None,
                 **overrides: Any) -> Swarm:
        """Rebuild the swarm a run was started with (tools re-imported by reference), for
        `swarmoe run --resume`. Secrets are not journaled: pass `api_key` or use the env."""
        journal = Journal.open(run_id, runs_dir)
        try:
            config = dict(journal.meta().get("config") or {})
        finally:
            journal.close()
        if not config:
            raise ValueError(f"run {run_id!r} has no configuration recorded")
        if not isinstance(config.get("model"), str) and "model" not in overrides:
            raise ValueError(f"run {run_id!r} used an in-process backend; pass model= to resume it")
        refs = config.pop("tools")
        if "tools" not in overrides:
            missing = [name for name, ref in refs if ref is None]
            if missing:
                raise ValueError(f"tools {missing} of run {run_id!r} cannot be re-imported; "
                                 f"pass tools= to resume it")
            config["tools"] = [import_tool(ref) for _, ref in refs]
        config["mcp_servers"] = [MCPTools(**m) for m in config.pop("mcp")]
        if config.get("prices") is not None:
            config["prices"] = tuple(config["prices"])
        config["retry"] = RetryPolicy(**config["retry"])
        config.update(overrides)
        return cls(**config, runs_dir=runs_dir)

    def config_record(self) -> dict[str, Any]:
        """The settings a resumed run needs, JSON-able; no secrets."""
        return {
            "model": self.model if isinstance(self.model, str) else repr(self.model),
            "base_url": self.base_url,
            "tools": [(t.name, t.ref) for t in self.tools],
            "mcp": [{"server": m.spec, "prefix": m.prefix, "env": m.env, "timeout": m.timeout,
                     "include": list(m.include) if m.include else None}
                    for m in self.mcp_servers if m.spec is not None],
            "max_subagents": self.max_subagents,
            "max_tool_calls_in_flight": self.max_tool_calls_in_flight,
            "orchestrator_max_steps": self.orchestrator_max_steps,
            "subagent_max_steps": self.subagent_max_steps,
            "deadline": self.deadline,
            "max_tokens": self.max_tokens,
            "max_cost": self.max_cost,
            "prices": self.prices,
            "rpm": self.rpm,
            "tpm": self.tpm,
            "max_concurrent_requests": self.max_concurrent_requests,
            "request_timeout": self.request_timeout,
            "tool_timeout": self.tool_timeout,
            "retry": asdict(self.retry),
            "sampling": self.sampling,
            "system_prompt": self.system_prompt,
            "result_schema": self.answer_checker.schema if self.answer_checker else None,
            "tool_threads": self.tool_threads,
        }


class _Run:
    """The state of one execution of a run: the `Runtime` every agent talks to."""

    def __init__(self, swarm: Swarm, journal: Journal, run_id: str, task: str,
                 replay: dict[tuple[str, str], dict[str, Any]]) -> None:
        self.swarm = swarm
        self.journal = journal
        self.run_id = run_id
        self.task = task
        self.replay = replay
        self.stats = SwarmStats()
        self.subagents: dict[str, str] = {}
        self.budget = Budget(max_tokens=swarm.max_tokens, max_cost=swarm.max_cost,
                             prices=swarm.prices)
        self.limiter = RequestLimiter(max_concurrent=swarm.max_concurrent_requests,
                                      rpm=swarm.rpm, tpm=swarm.tpm, retry=swarm.retry)
        self.tool_slots = asyncio.Semaphore(swarm.max_tool_calls_in_flight)
        model_name = swarm.model if isinstance(swarm.model, str) else type(swarm.model).__name__
        self.spans = Spans(swarm.tracer_provider, model=model_name)
        self.tools: dict[str, Tool] = {}
        self.tool_schemas: list[dict[str, Any]] = []
        self.stop_reason: str | None = None
        self.main_task: asyncio.Future[AgentOutcome] | None = None
        self.backend: ChatBackend | None = None
        self.executor: ThreadPoolExecutor | None = None
        self.check_answer = swarm.answer_checker

    # -- events ------------------------------------------------------------------------------

    def emit(self, kind: str, agent: str, key: str | None, data: dict[str, Any]) -> None:
        """Journal an event (once per (kind, key): a replayed event is not written again)."""
        event = Event(time.time(), kind, agent, key, data)
        if key is None or (kind, key) not in self.replay:
            self.journal.append(event)
        if self.swarm.on_event is not None:
            self.swarm.on_event(event)

    def stop(self, reason: str) -> None:
        """End the run: cancel the orchestrator and, through it, every agent and call."""
        if self.stop_reason is None and self.main_task is not None:
            self.stop_reason = reason
            self.main_task.cancel()

    # -- the run -----------------------------------------------------------------------------

    async def execute(self) -> SwarmResult:
        sw = self.swarm
        started = time.monotonic()
        owns_backend = not isinstance(sw.model, ChatBackend)
        try:
            async with AsyncExitStack() as stack:
                self.backend = resolve_backend(sw.model, base_url=sw.base_url,
                                               api_key=sw.api_key, timeout=sw.request_timeout)
                if owns_backend:
                    stack.push_async_callback(self.backend.aclose)
                self.executor = stack.enter_context(
                    ThreadPoolExecutor(sw.tool_threads, thread_name_prefix="swarmoe-tool"))
                self.tools = {t.name: t for t in sw.tools}
                for server in sw.mcp_servers:
                    for t in await stack.enter_async_context(server.connect()):
                        if t.name in self.tools or t.name in SWARM_TOOL_NAMES:
                            raise ValueError(f"MCP tool {t.name!r} clashes with another tool; "
                                             f"give the server a prefix")
                        self.tools[t.name] = t
                self.tool_schemas = [t.schema for t in self.tools.values()]
                stack.enter_context(_older_objects_frozen())
                outcome = await self._supervise()
        except BaseException:
            self.journal.set_meta(status="interrupted")
            self.journal.close()
            raise
        finally:
            self.stats.wall_seconds = time.monotonic() - started
            self._finish_stats()
        return self._conclude(outcome)

    async def _supervise(self) -> AgentOutcome | BaseException:
        """Run the orchestrator as one task that a budget or the deadline can cancel whole."""
        orchestrator = Agent(ORCHESTRATOR, ORCHESTRATOR, self.swarm.system_prompt,
                             self.tool_schemas + SWARM_TOOLS, self.swarm.orchestrator_max_steps)
        main = self.main_task = asyncio.ensure_future(self.run_agent(orchestrator, self.task))
        timer = None
        if self.swarm.deadline is not None:
            timer = asyncio.get_running_loop().call_later(
                self.swarm.deadline, self.stop, f"deadline of {self.swarm.deadline} s passed")
        try:
            return await main
        except (asyncio.CancelledError, BudgetExceeded, BackendError) as e:
            if self.stop_reason is None and isinstance(e, asyncio.CancelledError):
                raise
            return e
        finally:
            if timer is not None:
                timer.cancel()

    def _finish_stats(self) -> None:
        self.stats.subagents = len(self.subagents)
        self.stats.prompt_tokens = self.budget.prompt_tokens
        self.stats.completion_tokens = self.budget.completion_tokens
        self.stats.cost = self.budget.cost
        self.stats.retries = self.limiter.retries

    def _conclude(self, outcome: AgentOutcome | BaseException) -> SwarmResult:
        answer = outcome.answer if isinstance(outcome, AgentOutcome) else None
        result = SwarmResult(self.run_id, answer, self.stats, self.journal.path)
        if isinstance(outcome, AgentOutcome):
            self.stats.critical_steps = outcome.critical_steps
            reason = outcome.error and f"orchestrator {outcome.error}"
        else:
            reason = self.stop_reason or f"orchestrator model call failed: {outcome}"
        stats = asdict(self.stats)
        if reason:
            self.emit("run_stopped", ORCHESTRATOR, None, {"reason": reason, "stats": stats})
            self.journal.set_meta(status="stopped", reason=reason)
        else:
            self.emit("run_finish", ORCHESTRATOR, None, {"answer": answer, "stats": stats})
            self.journal.set_meta(status="finished", answer=answer)
        self.journal.close()
        if reason:
            raise RunStopped(reason, result)
        return result

    async def run_agent(self, agent: Agent, prompt: str) -> AgentOutcome:
        self.emit("agent_start", agent.id, agent.id, {"name": agent.name, "prompt": prompt[:2000]})
        with self.spans.agent(agent.name, agent.id) as span:
            outcome = await run_agent(agent, prompt, self)
            if outcome.error:
                record_error(span, "agent_error", outcome.error)
        self.emit("agent_finish", agent.id, agent.id, {
            "name": agent.name, "steps": outcome.steps, "critical_steps": outcome.critical_steps,
            "error": outcome.error, "answer": outcome.answer})
        if outcome.failure is not None and agent.id == ORCHESTRATOR:
            raise outcome.failure  # a sub-agent's failure is its assign_task result instead
        return outcome

    # -- Runtime: model calls ---------------------------------------------------------------

    async def chat(self, agent: Agent, step: int, messages: list[Message]) -> AssistantMessage:
        key = f"{agent.id}@{step}"
        recorded = self.replay.get(("llm_response", key))
        if recorded is not None:
            msg = AssistantMessage.from_json(recorded)
            self.stats.replayed += 1
        else:
            assert self.backend is not None
            backend = self.backend
            started = time.time()
            with self.spans.chat() as span:
                msg = await self.limiter.call(
                    lambda: backend.chat(messages, agent.tools, self.swarm.sampling),
                    usage_of=lambda m: m.usage,
                    on_retry=lambda attempt, e, wait: self.emit("llm_retry", agent.id, None, {
                        "call": key, "attempt": attempt, "error": str(e), "status": e.status,
                        "wait": wait}))
                record_usage(span, msg.usage)
            self.emit("llm_response", agent.id, key, {**msg.to_json(), "started": started})
        self.stats.total_steps += 1
        try:
            self.budget.charge(msg.usage)
        except BudgetExceeded as e:
            self.stop(str(e))
            raise
        return msg

    # -- Runtime: tool calls ----------------------------------------------------------------

    async def call_tool(self, agent: Agent, step: int, index: int, call: ToolCall) -> ToolOutcome:
        key = f"{agent.id}@{step}#{index}"
        with self.spans.tool(call.name, call.id) as span:
            outcome = await self._call_tool(agent, key, call)
            if outcome.is_error:
                record_error(span, "tool_error", outcome.content)
        return outcome

    async def _call_tool(self, agent: Agent, key: str, call: ToolCall) -> ToolOutcome:
        swarm_tool = agent.id == ORCHESTRATOR and call.name in SWARM_TOOL_NAMES
        if not swarm_tool:
            recorded = self.replay.get(("tool_result", key))
            if recorded is not None:
                self.stats.replayed += 1
                return self._count(call.name, ToolOutcome(recorded["content"], recorded["error"]))
        try:
            args = _parse_arguments(call)
            if swarm_tool:
                return await self._swarm_tool(agent, key, call.name, args)
            tool = self.tools.get(call.name)
            if tool is None:
                known = ", ".join(sorted(self.tools) + (sorted(SWARM_TOOL_NAMES)
                                                        if agent.id == ORCHESTRATOR else []))
                raise ToolError(f"unknown tool {call.name!r}; available tools: {known or 'none'}")
        except ToolError as e:
            outcome = ToolOutcome(f"Error: {e}", is_error=True)
            self.emit("tool_result", agent.id, key, {"name": call.name, "content": outcome.content,
                                                      "error": True})
            return self._count(call.name, outcome)
        return await self._run_user_tool(agent, key, tool, args)

    async def _run_user_tool(self, agent: Agent, key: str, tool: Tool,
                             args: dict[str, Any]) -> ToolOutcome:
        timeout = tool.timeout or self.swarm.tool_timeout
        async with self.tool_slots:
            started = time.time()
            error = True
            try:
                async with asyncio.timeout(timeout):
                    content = await tool.invoke(args, self.executor)
                error = False
            except ToolError as e:
                content = f"Error: {e}"
            except TimeoutError:
                content = f"Error: tool {tool.name!r} timed out after {timeout:g} s"
            except Exception as e:
                content = f"Error: tool {tool.name!r} raised {type(e).__name__}: {e}"
            # Journal in the same step as the tool's return: a kill cannot fall in between.
            self.emit("tool_result", agent.id, key, {"name": tool.name, "arguments": args,
                                                      "content": content, "error": error,
                                                      "started": started})
        return self._count(tool.name, ToolOutcome(content, error))

    def _count(self, name: str, outcome: ToolOutcome) -> ToolOutcome:
        """Count calls of user tools only; errors for unknown names are the model's, not calls."""
        if name in self.tools:
            self.stats.tool_calls += 1
            self.stats.tool_errors += outcome.is_error
        return outcome

    async def _swarm_tool(self, agent: Agent, key: str, name: str,
                          args: dict[str, Any]) -> ToolOutcome:
        """create_subagent, assign_task and spawn_subagents. Their results are not journaled: a
        creation is redone on replay (it is deterministic), an assignment's result is its
        sub-agent's."""
        if name == "spawn_subagents":
            return await self._spawn(key, args)
        if name == "create_subagent":
            sub, system_prompt = _str_args(name, args, "name", "system_prompt")
            if sub in self.subagents:
                raise ToolError(f"a sub-agent named {sub!r} already exists; pick another name")
            if len(self.subagents) >= self.swarm.max_subagents:
                raise ToolError(f"limit of {self.swarm.max_subagents} sub-agents reached; "
                                f"reuse existing ones with assign_task")
            self.subagents[sub] = system_prompt
            return ToolOutcome(f"Created sub-agent {sub!r}.")
        sub, prompt = _str_args(name, args, "agent", "prompt")
        if sub not in self.subagents:
            known = ", ".join(list(self.subagents)[:20]) or "none yet"
            raise ToolError(f"unknown sub-agent {sub!r}; create it first with create_subagent "
                            f"(existing: {known})")
        return await self._delegate(key, sub, self.subagents[sub], prompt)

    async def _delegate(self, key: str, sub: str, system_prompt: str,
                        prompt: str) -> ToolOutcome:
        """Run sub-agent `sub` on `prompt` as agent `key`: a fresh context, journaled as the
        sub-agent's own events; its final answer (or what went wrong) is the result."""
        if self.check_answer is not None:
            system_prompt += "\n\n" + self.check_answer.instructions
        worker = Agent(key, sub, system_prompt, self.tool_schemas,
                       self.swarm.subagent_max_steps, self.check_answer)
        outcome = await self.run_agent(worker, prompt)
        if outcome.error:
            return ToolOutcome(f"Error: sub-agent {sub!r} {outcome.error}", True,
                               outcome.critical_steps)
        return ToolOutcome(outcome.answer or "", False, outcome.critical_steps)

    async def _spawn(self, key: str, args: dict[str, Any]) -> ToolOutcome:
        """One sub-agent per item, all at once; the results in item order, each under its
        item's heading. One failing sub-agent is an error line in its own block only."""
        template, items, system_prompt = _spawn_args(args)
        free = self.swarm.max_subagents - len(self.subagents)
        if len(items) > free:
            raise ToolError(f"{len(items)} items need {len(items)} sub-agents but only {free} of "
                            f"max_subagents={self.swarm.max_subagents} are left; pass fewer items")
        names = []
        for _ in items:
            names.append(f"{key}.{len(self.subagents) + 1}")
            self.subagents[names[-1]] = system_prompt
        outcomes = await asyncio.gather(*(
            self._delegate(f"{key}.{j}", sub, system_prompt, template.replace(ITEM_SLOT, item))
            for j, (sub, item) in enumerate(zip(names, items, strict=True))))
        blocks = [f"### {item}\n{o.content.strip()}" for item, o in
                  zip(items, outcomes, strict=True)]
        return ToolOutcome("\n\n".join(blocks), all(o.is_error for o in outcomes),
                           max(o.critical_steps for o in outcomes))


def _parse_arguments(call: ToolCall) -> dict[str, Any]:
    text = call.arguments.strip() or "{}"
    try:
        args = json.loads(text)
    except json.JSONDecodeError as e:
        raise ToolError(f"arguments for {call.name!r} are not valid JSON ({e.msg} at "
                        f"position {e.pos}): {text[:200]}") from None
    if not isinstance(args, dict):
        raise ToolError(f"arguments for {call.name!r} must be a JSON object, got {text[:200]}")
    return args


def _str_args(tool: str, args: dict[str, Any], *names: str) -> list[str]:
    unknown = set(args) - set(names)
    if unknown:
        raise ToolError(f"{tool} got unknown arguments {sorted(unknown)}; it takes {list(names)}")
    values = []
    for n in names:
        v = args.get(n)
        if not isinstance(v, str) or not v.strip():
            raise ToolError(f"{tool} needs {n!r} as a non-empty string")
        values.append(v)
    return values


def _spawn_args(args: dict[str, Any]) -> tuple[str, list[str], str]:
    unknown = set(args) - {"prompt_template", "items", "system_prompt"}
    if unknown:
        raise ToolError(f"spawn_subagents got unknown arguments {sorted(unknown)}; it takes "
                        f"prompt_template, items and system_prompt")
    template = args.get("prompt_template")
    if not isinstance(template, str) or ITEM_SLOT not in template:
        raise ToolError(f"spawn_subagents needs 'prompt_template' as a string containing "
                        f"{ITEM_SLOT}")
    items = args.get("items")
    if (not isinstance(items, list) or not items
            or not all(isinstance(i, str) and i.strip() for i in items)):
        raise ToolError("spawn_subagents needs 'items' as a non-empty list of non-empty strings")
    if len(items) > MAX_SPAWN_ITEMS:
        raise ToolError(f"spawn_subagents takes at most {MAX_SPAWN_ITEMS} items, got "
                        f"{len(items)}; call it again for the rest")
    system_prompt = args.get("system_prompt") or SUBAGENT_PROMPT
    if not isinstance(system_prompt, str):
        raise ToolError("spawn_subagents needs 'system_prompt' as a string")
    return template, items, system_prompt


class _AnswerChecker:
    """Validates a sub-agent's final message against `result_schema` (a pydantic model class or
    a JSON schema dict); what is wrong goes back to the sub-agent, which tries again."""

    def __init__(self, schema: Any) -> None:
        import pydantic

        if isinstance(schema, type) and issubclass(schema, pydantic.BaseModel):
            self._model: Any = schema
            self.schema = schema.model_json_schema()
        elif isinstance(schema, dict):
            import jsonschema

            jsonschema.Draft202012Validator.check_schema(schema)
            self._model = None
            self.schema = schema
        else:
            raise TypeError("result_schema must be a pydantic model class or a JSON schema dict")
        self.instructions = ("Your final message must be only a JSON value matching this schema: "
                             + json.dumps(self.schema))

    def __call__(self, content: str | None) -> str | None:
        try:
            value = json.loads(content or "")
            if self._model is not None:
                self._model.model_validate(value)
            else:
                import jsonschema

                jsonschema.validate(value, self.schema)
        except Exception as e:  # json, pydantic and jsonschema errors alike go back to the agent
            return f"Your final answer is not valid: {e}. {self.instructions}"
        return None


_frozen_runs = 0
_frozen_lock = threading.Lock()


@contextmanager
def _older_objects_frozen() -> Iterator[None]:
    """Keep what exists when a run starts (modules, classes, the caller's data) out of the
    garbage collector's scans while runs are going: a swarm allocates messages and events by
    the ten thousand, and each full collection would walk the whole process again, on the event
    loop (a 100 x 15 run spent ~0.1 s of its critical path in collections, ~0.03 s frozen).
    Unfrozen when the last run ends, so nothing is kept alive."""
    global _frozen_runs
    with _frozen_lock:
        if _frozen_runs == 0:
            gc.freeze()
        _frozen_runs += 1
    try:
        yield
    finally:
        with _frozen_lock:
            _frozen_runs -= 1
            if _frozen_runs == 0:
                gc.unfreeze()
