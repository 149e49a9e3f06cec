"""OpenTelemetry spans after the GenAI semantic conventions: `invoke_agent {name}` per agent run,
`chat {model}` per model call, `execute_tool {name}` per tool call. A sub-agent's span is a
child of the orchestrator's `execute_tool assign_task` span, so the span tree is the agent
tree. With no tracer provider configured the API hands out no-op spans (near-zero cost).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from swarmoe.swarm.backends import Usage


class Spans:
    def __init__(self, provider: trace.TracerProvider | None = None, *, model: str = "",
                 provider_name: str = "openai") -> None:
        self._tracer = (provider or trace.get_tracer_provider()).get_tracer("swarmoe.swarm")
        self._model = model
        self._provider_name = provider_name

    @contextmanager
    def agent(self, name: str, agent_id: str) -> Iterator[Span]:
        with self._tracer.start_as_current_span(f"invoke_agent {name}", kind=SpanKind.INTERNAL,
                                                attributes={
            "gen_ai.operation.name": "invoke_agent",
            "gen_ai.agent.name": name,
            "gen_ai.agent.id": agent_id,
            "gen_ai.request.model": self._model,
        }) as span:
            yield span

    @contextmanager
    def chat(self) -> Iterator[Span]:
        with self._tracer.start_as_current_span(f"chat {self._model}", kind=SpanKind.CLIENT,
                                                attributes={
            "gen_ai.operation.name": "chat",
            "gen_ai.provider.name": self._provider_name,
            "gen_ai.request.model": self._model,
        }) as span:
            yield span

    @contextmanager
    def tool(self, name: str, call_id: str) -> Iterator[Span]:
        with self._tracer.start_as_current_span(f"execute_tool {name}", kind=SpanKind.INTERNAL,
                                                attributes={
            "gen_ai.operation.name": "execute_tool",
            "gen_ai.tool.name": name,
            "gen_ai.tool.call.id": call_id,
            "gen_ai.tool.type": "function",
        }) as span:
            yield span


def record_usage(span: Span, usage: Usage) -> None:
    span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
    span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)


def record_error(span: Span, error_type: str, message: Any = "") -> None:
    """Mark a span failed for an error that is reported to the model rather than raised."""
    span.set_attribute("error.type", error_type)
    span.set_status(Status(StatusCode.ERROR, str(message)))
