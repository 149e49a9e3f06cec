"""OpenTelemetry spans after the GenAI semantic conventions: `invoke_agent {name}` per agent run,
`chat {model}` per model call, `execute_tool {name}` per tool call. A sub-agent's span is a
child of the orchestrator's `execute_tool assign_task` span, so the span tree is the agent
tree. With no tracer provider configured the API hands out no-op spans (near-zero cost).
"""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from swarmoe.swarm.backends import Usage

_NO_SPAN = nullcontext(trace.INVALID_SPAN)


class Spans:
    def __init__(self, provider: trace.TracerProvider | None = None, *, model: str = "",
                 provider_name: str = "openai") -> None:
        provider = provider or trace.get_tracer_provider()
        self._tracer = provider.get_tracer("swarmoe.swarm")
        # Until someone installs a provider the global one is a proxy handing out no-op spans;
        # skip even those (thousands of spans a run, ~40 us each through the API).
        self._off = isinstance(provider, trace.ProxyTracerProvider)
        self._model = model
        self._provider_name = provider_name

    def _span(self, name: str, kind: SpanKind, attributes: dict[str, Any]
              ) -> AbstractContextManager[Span]:
        return self._tracer.start_as_current_span(name, kind=kind, attributes=attributes)

    def agent(self, name: str, agent_id: str) -> AbstractContextManager[Span]:
        if self._off:
            return _NO_SPAN
        return self._span(f"invoke_agent {name}", SpanKind.INTERNAL, {
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": name,
            "gen_ai.agent.id": agent_id,
            "gen_ai.request.model": self._model,
        })

    def chat(self) -> AbstractContextManager[Span]:
        if self._off:
            return _NO_SPAN
        return self._span(f"chat {self._model}", SpanKind.CLIENT, {
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._provider_name,
            "gen_ai.request.model": self._model,
        })

    def tool(self, name: str, call_id: str) -> AbstractContextManager[Span]:
        if self._off:
            return _NO_SPAN
        return self._span(f"execute_tool {name}", SpanKind.INTERNAL, {
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.call.id": call_id,
            "gen_ai.tool.type": "function",
        })


def record_usage(span: Span, usage: Usage) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)


def record_error(span: Span, error_type: str, message: Any = "") -> None:
    """Mark a span failed for an error that is reported to the model rather than raised."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, str(message)))
