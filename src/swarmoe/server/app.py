"""The OpenAI-compatible HTTP server: `create_app(engine, model_name, ...)` returns a FastAPI app.

Handlers only prepare prompts (in a worker thread) and relay outputs; the engine thread alone
runs the model, so one slow or broken request never stalls the others. A request whose client
goes away, streaming or not, is aborted at once and its cache blocks are freed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol

from fastapi import FastAPI, Request
from fastapi.responses import Response, StreamingResponse

from swarmoe.config import ModelConfig
from swarmoe.engine.llm import Prompt, RequestOutput
from swarmoe.engine.sampling import SamplingParams
from swarmoe.server.errors import APIError, error_bytes, install_error_handlers
from swarmoe.server.metrics import Metrics
from swarmoe.server.outputs import (
    ChatStream,
    TextStream,
    chat_logprobs,
    completion_logprobs,
    finish_reason,
    parse_chat,
)
from swarmoe.server.prompts import completion_prompts, prepare_chat, sampling_params
from swarmoe.server.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ErrorResponse,
    ModelCard,
    ModelList,
)
from swarmoe.text import ChatTemplate, Tokenizer

log = logging.getLogger("swarmoe.server")

#: Default cap on a request body; images arrive inline as base64, so it is not tiny.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Seconds between two chunks of one stream: 20 a second reads as smooth, and under load it
# coalesces tokens instead of paying a serialised, written and client-parsed chunk per token.
STREAM_INTERVAL = 0.05
_ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")
_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Malformed JSON, a bad value, or a prompt "
          "that does not fit the context (code context_length_exceeded)"},
    401: {"model": ErrorResponse, "description": "Missing or wrong API key"},
    404: {"model": ErrorResponse, "description": "Unknown model"},
    413: {"model": ErrorResponse, "description": "Request body too large"},
    "default": {"model": ErrorResponse, "description": "Any other error, in OpenAI's shape"},
}
# Before OpenAPI 3.2, an event stream's schema describes one event.
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {"data": {
    "type": "string", "description": "a JSON chunk, an error object, or [DONE] at the end"}}}
_STREAM = {200: {"content": {"text/event-stream": {"schema": _SSE_EVENT}},
                 "description": "The completion, or server-sent chunks when stream=true"}}


class EngineClient(Protocol):
    """What the server needs from an engine (AsyncEngine, or a test double)."""

    @property
    def tokenizer(self) -> Tokenizer | None: ...

    @property
    def config(self) -> ModelConfig: ...

    @property
    def max_model_len(self) -> int: ...

    def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
        *, interval: float | None = None,
    ) -> AsyncIterator[RequestOutput]: ...

    async def stats(self) -> dict[str, float]: ...


def create_app(
    engine: EngineClient,
    model_name: str,
    api_key: str | None = None,
    *,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    stream_interval: float = STREAM_INTERVAL,
) -> FastAPI:
    """An app serving `engine` as model `model_name`; `api_key` guards every /v1 route."""
    tokenizer = engine.tokenizer
    if tokenizer is None:
        raise ValueError("the server needs a checkpoint with a tokenizer (tiktoken.model)")
    server = _Server(engine, tokenizer, model_name, stream_interval)
    app = FastAPI(title="swarmoe", version="0.1.0",
                  description="OpenAI-compatible API over the swarmoe engine")
    install_error_handlers(app)
    app.add_middleware(_Gate, api_key=api_key, max_bytes=max_request_bytes, metrics=server.metrics)

    @app.get("/health", responses={503: {"model": ErrorResponse}})
    async def health() -> dict[str, str]:
        """200 while the engine thread answers within five seconds."""
        try:
            await asyncio.wait_for(engine.stats(), 5)
        except Exception:
            raise APIError(503, "engine is not responding") from None
        return {"status": "ok"}

    @app.get("/metrics", response_class=Response,
             responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}}}})
    async def metrics() -> Response:
        body = server.metrics.render(await engine.stats())
        return Response(body, media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models", responses=_ERRORS)
    async def list_models() -> ModelList:
        return ModelList(data=[server.card])

    @app.get("/v1/models/{model_id:path}", responses=_ERRORS)
    async def get_model(model_id: str) -> ModelCard:
        server.check_model(model_id, param="model_id")
        return server.card

    @app.post("/v1/chat/completions", response_model=ChatCompletion,
              responses={**_ERRORS, **_STREAM})
    async def chat(body: ChatCompletionRequest, request: Request) -> Any:
        return await server.chat(body, request)

    @app.post("/v1/completions", response_model=Completion, responses={**_ERRORS, **_STREAM})
    async def completions(body: CompletionRequest, request: Request) -> Any:
        return await server.completions(body, request)

    return app


class _Server:
    """Request handling shared by the routes; holds no per-request state."""

    def __init__(self, engine: EngineClient, tokenizer: Tokenizer, model_name: str,
                 stream_interval: float) -> None:
        self.engine = engine
        self.stream_interval = stream_interval
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.metrics = Metrics()
        self.template = ChatTemplate(tokenizer.chat_template)
        self.card = ModelCard(id=model_name, created=int(time.time()),
                              max_model_len=engine.max_model_len)
        specials = tokenizer.special_tokens
        # A chat turn ends at <|im_end|> even where generation_config names only [EOS].
        self.chat_stop_ids = [specials["<|im_end|>"]] if "<|im_end|>" in specials else []

    def check_model(self, name: str, param: str = "model") -> None:
        if name != self.model_name:
            raise APIError(404, f"The model {name!r} does not exist; this server has "
                                f"{self.model_name!r}", param=param, code="model_not_found")

    # -- chat ------------------------------------------------------------------------------

    async def chat(self, req: ChatCompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        prepared = await prepare_chat(req, self.tokenizer, self.template, self.engine.config)
        params = sampling_params(req, prepared.num_tokens, self.engine.max_model_len,
                                 stop_token_ids=self.chat_stop_ids)
        rid = f"chatcmpl-{uuid.uuid4().hex}"
        keep_calls = 0 if req.tool_choice == "none" else None if req.parallel_tool_calls else 1
        top = req.top_logprobs or 0
        holdback = _holdback(params)
        [(first, outputs)] = await self._open([(prepared.prompt, params, rid)], request)
        created = int(time.time())

        if req.stream:
            chunk = _Chunker(rid, "chat.completion.chunk", created, self.model_name, req)
            lasts = [first]

            async def events() -> AsyncIterator[bytes]:
                streams: dict[int, ChatStream] = {}
                parts = [chunk([{"index": i, "delta": {"role": "assistant", "content": ""},
                                 "logprobs": None, "finish_reason": None}]) for i in range(req.n)]
                async for out in _chain(first, outputs):
                    lasts[0] = out
                    for c in out.outputs:
                        s = streams.get(c.index)
                        if s is None:
                            s = streams[c.index] = ChatStream(holdback, prepared.forced,
                                                              prepared.thinking, keep_calls)
                        delta = s.delta(c)
                        lp = None
                        if c.logprobs is not None and len(c.token_ids) > s.tokens_sent:
                            lp = {"content": chat_logprobs(
                                self.tokenizer, c.token_ids[s.tokens_sent:],
                                c.logprobs[s.tokens_sent:], top)}
                            s.tokens_sent = len(c.token_ids)
                        done = c.finish_reason is not None
                        if delta or lp or done:
                            parts.append(chunk([{
                                "index": c.index, "delta": delta, "logprobs": lp,
                                "finish_reason": finish_reason(c.finish_reason, s.has_calls)
                                if done else None}]))
                    if out.finished:
                        parts.append(chunk.end(_usage(lasts)))
                    if parts:  # one write per engine step, whatever it carries
                        yield b"".join(parts)
                        parts = []

            return self._stream(events(), [outputs], lasts)

        last = await _until_disconnected(request, _last(first, outputs))
        choices = []
        for c in last.outputs:
            parsed = parse_chat(prepared.forced, c.text, prepared.thinking, keep_calls)
            lp = None
            if c.logprobs is not None:
                lp = {"content": chat_logprobs(self.tokenizer, c.token_ids, c.logprobs, top),
                      "refusal": None}
            choices.append({
                "index": c.index,
                "message": {"role": "assistant", "content": parsed.content or None,
                            "reasoning_content": parsed.reasoning_content or None,
                            "tool_calls": [t.to_openai() for t in parsed.tool_calls] or None},
                "finish_reason": finish_reason(c.finish_reason, bool(parsed.tool_calls)),
                "logprobs": lp,
            })
        self._count([last])
        return {"id": rid, "object": "chat.completion", "created": created,
                "model": self.model_name, "choices": choices, "usage": _usage([last])}

    # -- text completions ---------------------------------------------------------------------

    async def completions(self, req: CompletionRequest, request: Request) -> Any:
        self.check_model(req.model)
        prompts = await asyncio.to_thread(completion_prompts, req, self.tokenizer)
        jobs = []
        base = f"cmpl-{uuid.uuid4().hex}"
        for i, ids in enumerate(prompts):
            params = sampling_params(req, len(ids), self.engine.max_model_len, stop_token_ids=[])
            jobs.append(({"prompt_token_ids": ids}, params, f"{base}-{i}"))
        holdback = _holdback(jobs[0][1])
        opened = await self._open(jobs, request)
        created = int(time.time())
        top = req.logprobs or 0

        if req.stream:
            chunk = _Chunker(base, "text_completion", created, self.model_name, req)
            lasts = [first for first, _ in opened]

            async def events() -> AsyncIterator[bytes]:
                streams: dict[int, TextStream] = {}
                unfinished = len(opened)
                async for p, out in _merge([_chain(f, o) for f, o in opened]):
                    lasts[p] = out
                    parts = []
                    for c in out.outputs:
                        index = p * req.n + c.index
                        s = streams.setdefault(index, TextStream(holdback))
                        start = len(s.text)
                        piece = s.advance(c)
                        lp = None
                        if c.logprobs is not None and len(c.token_ids) > s.tokens_sent:
                            lp = completion_logprobs(self.tokenizer, c.token_ids[s.tokens_sent:],
                                                     c.logprobs[s.tokens_sent:], top, start)
                            s.tokens_sent = len(c.token_ids)
                        done = c.finish_reason is not None
                        if piece or lp or done:
                            parts.append(chunk([{"index": index, "text": piece, "logprobs": lp,
                                                 "finish_reason": c.finish_reason if done else None}]))
                    unfinished -= out.finished
                    if not unfinished:
                        parts.append(chunk.end(_usage(lasts)))
                    if parts:
                        yield b"".join(parts)

            return self._stream(events(), [stream for _, stream in opened], lasts)

        lasts = await _until_disconnected(
            request, asyncio.gather(*(_last(f, o) for f, o in opened)))
        choices = []
        for p, last in enumerate(lasts):
            for c in last.outputs:
                lp = None
                if c.logprobs is not None:
                    lp = completion_logprobs(self.tokenizer, c.token_ids, c.logprobs, top, 0)
                choices.append({"index": p * req.n + c.index, "text": c.text,
                                "finish_reason": c.finish_reason, "logprobs": lp})
        self._count(lasts)
        return {"id": base, "object": "text_completion", "created": created,
                "model": self.model_name, "choices": choices, "usage": _usage(lasts)}

    # -- plumbing --------------------------------------------------------------------------------

    async def _open(
        self, jobs: list[tuple[Prompt, SamplingParams, str]], request: Request
    ) -> list[tuple[RequestOutput, AsyncIterator[RequestOutput]]]:
        """Submit every job and wait for each first output, so that a prompt the engine
        refuses becomes a 400 before any response starts."""
        streams = [self.engine.generate(p, sp, rid, interval=self.stream_interval)
                   for p, sp, rid in jobs]
        firsts = await _until_disconnected(
            request, asyncio.gather(*(anext(s) for s in streams), return_exceptions=True),
            on_gone=lambda: _close_all(streams))
        failure = next((f for f in firsts if isinstance(f, BaseException)), None)
        if failure is not None:
            await _close_all(streams)
            if isinstance(failure, ValueError):
                raise APIError(400, str(failure), code="invalid_value")
            log.error("engine failed on a new request: %r", failure)
            raise APIError(500, "engine failed while generating; see the server log")
        for first in firsts:
            self.metrics.prompt_tokens.inc(len(first.prompt_token_ids))
            if "time_to_first_token" in first.metrics:
                self.metrics.ttft.observe(first.metrics["time_to_first_token"])
        return list(zip(firsts, streams, strict=True))

    def _stream(
        self, events: AsyncIterator[bytes], streams: list[AsyncIterator[RequestOutput]],
        lasts: list[RequestOutput],
    ) -> StreamingResponse:
        """SSE around `events`; the engine streams are closed (aborted if unfinished) however
        the response ends, a disconnect included. `lasts` is kept current by `events`."""

        async def body() -> AsyncIterator[bytes]:
            try:
                async for data in events:
                    yield data
            except Exception as exc:  # the response has begun: report in-band, keep serving
                log.error("stream failed: %r", exc, exc_info=not isinstance(exc, RuntimeError))
                yield (b"data: " + error_bytes(500, "generation failed; see the server log")
                       + b"\n\n" + _DONE)
            finally:
                await _close_all(streams)
                self._count(lasts)

        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    def _count(self, outputs: list[RequestOutput]) -> None:
        self.metrics.generation_tokens.inc(sum(len(c.token_ids) for o in outputs for c in o.outputs))


_DONE = b"data: [DONE]\n\n"


class _Chunker:
    """Server-sent events of one streamed response (`chat.completion.chunk` or
    `text_completion` objects); `usage` is present, null until the end, when it was asked for."""

    def __init__(self, rid: str, kind: str, created: int, model: str,
                 req: ChatCompletionRequest | CompletionRequest) -> None:
        self.head = {"id": rid, "object": kind, "created": created, "model": model}
        self.include_usage = bool(req.stream_options and req.stream_options.include_usage)

    def __call__(self, choices: list[dict[str, Any]], usage: dict[str, int] | None = None) -> bytes:
        body: dict[str, Any] = {**self.head, "choices": choices}
        if self.include_usage:
            body["usage"] = usage
        return b"data: " + json.dumps(body, ensure_ascii=False).encode() + b"\n\n"

    def end(self, usage: dict[str, int]) -> bytes:
        """The closing events: the usage chunk when asked for, then [DONE]."""
        return (self([], usage) if self.include_usage else b"") + _DONE


def _usage(outputs: list[RequestOutput]) -> dict[str, int]:
    prompt = sum(len(o.prompt_token_ids) for o in outputs)
    completion = sum(len(c.token_ids) for o in outputs for c in o.outputs)
    return {"prompt_tokens": prompt, "completion_tokens": completion,
            "total_tokens": prompt + completion}


def _holdback(params: SamplingParams) -> int:
    """Characters a stream keeps back: a stop string may still complete and cut them."""
    return max((len(s) for s in params.stop or []), default=1) - 1


async def _chain(
    first: RequestOutput, rest: AsyncIterator[RequestOutput]
) -> AsyncIterator[RequestOutput]:
    try:
        yield first
        if not first.finished:
            async for out in rest:
                yield out
    finally:
        await rest.aclose()  # type: ignore[attr-defined]


async def _last(first: RequestOutput, rest: AsyncIterator[RequestOutput]) -> RequestOutput:
    last = first
    async for out in _chain(first, rest):
        last = out
    return last


async def _merge(
    streams: list[AsyncIterator[RequestOutput]],
) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several requests' outputs as they arrive, tagged with their position."""
    if len(streams) == 1:
        async for out in streams[0]:
            yield 0, out
        return
    queue: asyncio.Queue[tuple[int, RequestOutput | BaseException | None]] = asyncio.Queue()

    async def pump(i: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await queue.put((i, out))
            await queue.put((i, None))
        except Exception as exc:
            await queue.put((i, exc))

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        open_streams = len(streams)
        while open_streams:
            i, item = await queue.get()
            if item is None:
                open_streams -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _close_all(streams: list[AsyncIterator[RequestOutput]]) -> None:
    for s in streams:
        with contextlib.suppress(Exception):
            await s.aclose()  # type: ignore[attr-defined]


class _ClientGone(Exception):
    pass


async def _until_disconnected(
    request: Request, work: Awaitable[Any], on_gone: Callable[[], Awaitable[None]] | None = None
) -> Any:
    """Await `work` unless the client hangs up first; then cancel it (aborting its requests)."""
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
            if on_gone is not None:
                await on_gone()
    if task.cancelled():
        raise _ClientGone
    return task.result()


async def _disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


# -- ASGI gate: auth, body limit, traffic metrics ---------------------------------------------


class _Gate:
    """Runs before routing: bearer auth on /v1, the body-size cap, request metrics.

    The body is read here (up to the cap) and replayed, so an oversized upload is refused
    without being buffered, whether or not it declared a Content-Length.
    """

    def __init__(self, app: Any, *, api_key: str | None, max_bytes: int, metrics: Metrics) -> None:
        self.app = app
        self.api_key = api_key.encode() if api_key else None
        self.max_bytes = max_bytes
        self.metrics = metrics

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path: str = scope["path"]
        route = next((r for r in _ROUTES if path == r or path.startswith(r + "/")), "other")
        status = 500
        start = time.perf_counter()

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_flight.inc()
        try:
            if self.api_key and path.startswith("/v1") and not self._authorized(scope):
                return await _reply(send_status, 401, "Incorrect or missing API key; send "
                                    "'Authorization: Bearer KEY'", code="invalid_api_key",
                                    headers=[(b"www-authenticate", b"Bearer")])
            if scope["method"] in ("POST", "PUT", "PATCH"):
                body = await self._read_body(scope, receive)
                if body is None:
                    return await _reply(send_status, 413, f"request body exceeds "
                                        f"{self.max_bytes} bytes", code="request_too_large")
                receive = _replay(body, receive)
            await self.app(scope, receive, send_status)
        except _ClientGone:
            status = 499  # nginx's "client closed request"; nothing can be sent
        finally:
            self.metrics.in_flight.dec()
            self.metrics.requests.labels(route, str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - start)

    def _authorized(self, scope: dict) -> bool:
        assert self.api_key is not None
        for name, value in scope["headers"]:
            if name == b"authorization":
                scheme, _, token = value.partition(b" ")
                return scheme.lower() == b"bearer" and hmac.compare_digest(token.strip(), self.api_key)
        return False

    async def _read_body(self, scope: dict, receive: Callable) -> bytes | None:
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > self.max_bytes:
                return None
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                raise _ClientGone
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_bytes:
                return None
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Callable) -> Callable:
    sent = False

    async def replay() -> dict:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replay


async def _reply(send: Callable, status: int, message: str, *, code: str,
                 headers: list[tuple[bytes, bytes]] | None = None) -> None:
    body = error_bytes(status, message, code=code)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()), *(headers or [])]})
    await send({"type": "http.response.body", "body": body})

