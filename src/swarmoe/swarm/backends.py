"""The one thing the swarm needs from a model: a chat-completions-shaped call.

`ChatBackend` is the protocol. `OpenAIBackend` speaks it to any OpenAI-compatible endpoint
(Moonshot, vLLM, SGLang, `swarmoe serve`) through the official async client. The in-process
engine backend lives next to the engine and implements the same protocol from above, so this
package never imports torch.

A backend makes exactly one attempt per call. Retries, backoff and rate limits are the swarm's
job (`limits.py`), so every backend gets them the same way; a backend only says whether a
failure is worth retrying by raising `BackendError(retryable=..., retry_after=...)`.
"""

from __future__ import annotations

import email.utils
import json
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

DEFAULT_BASE_URL = "https://api.moonshot.ai/v1"
DEFAULT_MODEL = "kimi-k2.5"

Message = dict[str, Any]
"""One chat message in OpenAI shape: role, content, and for assistants tool_calls and
reasoning_content; for tools tool_call_id."""


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str
    """The raw JSON text the model wrote; parsing (and failing to) is the caller's business."""


@dataclass
class Usage:
    prompt_tokens: int = 0
    completion_tokens: int = 0


@dataclass
class AssistantMessage:
    """What a backend returns for one call."""

    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage = field(default_factory=Usage)

    def to_message(self) -> Message:
        """The message to append to the agent's context. Reasoning stays in it: K2 models
        expect to see their own earlier reasoning in multi-step tool use."""
        msg: Message = {"role": "assistant", "content": self.content}
        if self.reasoning_content is not None:
            msg["reasoning_content"] = self.reasoning_content
        if self.tool_calls:
            msg["tool_calls"] = [
                {"id": c.id, "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
                for c in self.tool_calls
            ]
        return msg

    def to_json(self) -> dict[str, Any]:
        return {**self.to_message(), "usage": [self.usage.prompt_tokens, self.usage.completion_tokens]}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> AssistantMessage:
        """Parse an OpenAI assistant message (plus our `usage` pair, if present)."""
        calls = []
        for i, c in enumerate(data.get("tool_calls") or []):
            fn = c.get("function") or {}
            args = fn.get("arguments")
            if not isinstance(args, str):  # some servers send an object; keep the model's intent
                args = json.dumps(args if args is not None else {})
            calls.append(ToolCall(id=c.get("id") or f"call_{i}", name=fn.get("name") or "", arguments=args))
        usage = data.get("usage")  # our journal's [prompt, completion] pair, when present
        prompt, completion = usage if isinstance(usage, list | tuple) else (0, 0)
        return cls(
            content=data.get("content"),
            reasoning_content=data.get("reasoning_content"),
            tool_calls=calls,
            usage=Usage(prompt, completion),
        )


class BackendError(Exception):
    """A failed model call. `retryable` marks rate limits, server errors, timeouts and lost
    connections; `retry_after` is the server's requested wait in seconds, when it gave one."""

    def __init__(self, message: str, *, retryable: bool, retry_after: float | None = None,
                 status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.retry_after = retry_after
        self.status = status


@runtime_checkable
class ChatBackend(Protocol):
    """One chat-completions call: messages (OpenAI shape), tools (OpenAI function schemas,
    possibly empty) and sampling options (temperature, top_p, max_tokens, ...) in; one
    assistant message out. Raise `BackendError` on failure. Must be safe to call
    concurrently from many agents."""

    async def chat(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage: ...

    async def aclose(self) -> None: ...


def parse_retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds to wait from `retry-after-ms` or `Retry-After` (seconds or an HTTP date)."""
    if (ms := headers.get("retry-after-ms")) is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value) if value else None
        return None if parsed is None else max(0.0, parsed.timestamp() - time.time())


class OpenAIBackend:
    """Any OpenAI-compatible chat-completions endpoint, via `openai.AsyncOpenAI`.

    The client runs on its aiohttp transport (`openai.DefaultAioHttpClient`, the SDK's own
    answer for high concurrency): against a local endpoint, 200 concurrent calls took 0.2-0.3 s
    over it and 1.2-1.35 s over the default httpx pool, at half the CPU — a swarm's bursts of
    100 calls are exactly that case. The pool holds up to `max_connections`; `keepalive` idle
    connections are kept for the next burst.
    """

    def __init__(self, model: str = DEFAULT_MODEL, *, base_url: str | None = None,
                 api_key: str | None = None, timeout: float = 600.0, max_connections: int = 1024,
                 keepalive: int = 1024) -> None:
        import httpx2
        import openai

        self.model = model
        self.base_url = base_url or os.environ.get("SWARMOE_BASE_URL") or DEFAULT_BASE_URL
        key = api_key or os.environ.get("MOONSHOT_API_KEY") or os.environ.get("OPENAI_API_KEY")
        if not key:
            raise ValueError("no API key: pass api_key= or set MOONSHOT_API_KEY or OPENAI_API_KEY")
        http = openai.DefaultAioHttpClient(
            timeout=httpx2.Timeout(timeout, connect=10.0),
            limits=httpx2.Limits(max_connections=max_connections,
                                 max_keepalive_connections=keepalive),
        )
        self._client = openai.AsyncOpenAI(base_url=self.base_url, api_key=key, max_retries=0,
                                          timeout=timeout, http_client=http)

    async def chat(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        import httpx2
        import openai

        body: dict[str, Any] = {"model": self.model, "messages": list(messages), **sampling}
        if tools:
            body["tools"] = list(tools)
        try:
            # The client's generic `post` keeps its auth, base URL and typed errors but skips
            # `chat.completions.create`'s per-field TypedDict transform (~10 ms of CPU per call
            # on a long orchestrator context, cProfile over 403 calls) and, with the raw
            # response, the response models (~0.2 ms a call); a swarm makes hundreds at once.
            raw = await self._client.post("/chat/completions", body=body, cast_to=httpx2.Response)
        except openai.APIStatusError as e:
            status = e.status_code
            raise BackendError(
                f"HTTP {status} from {self.base_url}: {e.message}",
                retryable=status in (408, 409, 429) or status >= 500,
                retry_after=parse_retry_after(e.response.headers), status=status) from e
        except (openai.APITimeoutError, openai.APIConnectionError) as e:
            raise BackendError(f"{type(e).__name__} talking to {self.base_url}: {e}",
                               retryable=True) from e
        try:
            data = json.loads(raw.content)
            choice = data["choices"][0]["message"]
        except (ValueError, KeyError, IndexError, TypeError) as e:
            raise BackendError(f"{self.base_url} answered with no usable choice: "
                               f"{raw.text[:200]!r}", retryable=True) from e
        msg = AssistantMessage.from_json(choice)
        usage = data.get("usage") or {}
        msg.usage = Usage(usage.get("prompt_tokens") or 0, usage.get("completion_tokens") or 0)
        return msg

    async def aclose(self) -> None:
        await self._client.close()


def resolve_backend(model: Any, *, base_url: str | None = None, api_key: str | None = None,
                    timeout: float = 600.0) -> ChatBackend:
    """`Swarm(model=...)`: a model name for an OpenAI-compatible endpoint, a `ChatBackend`, or an
    object with a `chat_backend()` method returning one (how an in-process engine plugs in
    without this package importing it)."""
    if isinstance(model, str):
        return OpenAIBackend(model, base_url=base_url, api_key=api_key, timeout=timeout)
    if isinstance(model, ChatBackend):
        return model
    factory = getattr(model, "chat_backend", None)
    if callable(factory):
        return factory()
    raise TypeError(f"model must be a model name, a ChatBackend or have chat_backend(); "
                    f"got {type(model).__name__}")
