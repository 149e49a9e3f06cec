"""The swarm's `ChatBackend` over an in-process `LLM`: chat completions without HTTP.

`Swarm(model=LLM(...))` lands here through `LLM.chat_backend()`. Each call goes through the
same request validation, chat template, tool-call forcing and K2 output parsing as
`/v1/chat/completions`, then into one `AsyncEngine`, so all agents' calls share one
continuously batched engine and its prefix cache (sub-agents with a common system prompt and
tool declarations reuse its cached blocks).

What the agents read — tool results, fetched pages, document text — reaches the model as data:
`prepare_chat` encodes only the chat template's own markers as control tokens, so a page that
spells `<|im_end|><|im_system|>` cannot open a forged turn.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import pydantic

from swarmoe.engine.async_engine import AsyncEngine
from swarmoe.engine.llm import LLM
from swarmoe.server.app import EngineClient
from swarmoe.server.errors import APIError
from swarmoe.server.outputs import parse_chat
from swarmoe.server.prompts import prepare_chat, sampling_params
from swarmoe.server.protocol import ChatCompletionRequest
from swarmoe.swarm.backends import AssistantMessage, BackendError, Message, ToolCall, Usage
from swarmoe.text import ChatTemplate

MODEL_NAME = "local"


class LocalChatBackend:
    """Chat calls on an engine that speaks `AsyncEngine`'s interface (generate, tokenizer,
    config, max_model_len) — the same client interface the HTTP server uses."""

    def __init__(self, engine: EngineClient) -> None:
        if engine.tokenizer is None:
            raise ValueError("an in-process swarm backend needs a checkpoint with a tokenizer")
        self.engine = engine
        self.template = ChatTemplate(engine.tokenizer.chat_template)
        specials = engine.tokenizer.special_tokens
        self.stop_ids = [specials["<|im_end|>"]] if "<|im_end|>" in specials else []
        self._ids = itertools.count()

    async def chat(self, messages: Sequence[Message], tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        body: dict[str, Any] = {"model": MODEL_NAME, "messages": list(messages), **sampling}
        if tools:
            body["tools"] = list(tools)
        try:
            req = ChatCompletionRequest.model_validate(body)
            prepared = await prepare_chat(req, self.engine.tokenizer, self.template,
                                          self.engine.config)
            params = sampling_params(req, prepared.num_tokens, self.engine.max_model_len,
                                     stop_token_ids=self.stop_ids)
        except pydantic.ValidationError as exc:
            raise BackendError(f"invalid chat request: {exc}", retryable=False, status=400) from exc
        except APIError as exc:
            raise BackendError(str(exc), retryable=False, status=exc.status) from exc
        last = None
        try:
            async for out in self.engine.generate(prepared.prompt, params, f"swarm-{next(self._ids)}"):
                last = out
        except ValueError as exc:
            raise BackendError(str(exc), retryable=False, status=400) from exc
        assert last is not None and last.finished
        choice = last.outputs[0]
        keep = 0 if req.tool_choice == "none" else None if req.parallel_tool_calls else 1
        parsed = parse_chat(prepared.forced, choice.text, prepared.thinking, keep)
        return AssistantMessage(
            content=parsed.content or None,
            reasoning_content=parsed.reasoning_content or None,
            tool_calls=[ToolCall(c.id, c.name, c.arguments) for c in parsed.tool_calls],
            usage=Usage(len(last.prompt_token_ids), len(choice.token_ids)),
        )

    async def aclose(self) -> None:
        shutdown = getattr(self.engine, "shutdown", None)
        if shutdown is not None:
            await asyncio.to_thread(shutdown)


def local_backend(llm: LLM) -> LocalChatBackend:
    """A backend that owns a new `AsyncEngine` over `llm`: from then on its engine thread
    drives the LLM."""
    return LocalChatBackend(AsyncEngine(llm))
