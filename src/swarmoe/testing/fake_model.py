"""`FakeModel`: a scripted OpenAI-compatible chat model for tests and benchmarks.

A script is a plain function of the request body (`messages`, `tools`, ...) that returns the
assistant message: a string (content), an OpenAI message dict, or `reply(...)`. The fake
answers over real HTTP (`serve()`: 127.0.0.1, random port, chat-completions JSON)
or in-process (`backend()`: a `ChatBackend`, no sockets).

Every call takes `latency` seconds, because instant fakes hide missing parallelism; 429 (with
`Retry-After`), 500 and hung calls can be injected at given rates.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
import json
import random
import socket
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from http import HTTPStatus
from typing import Any

from swarmoe.swarm.backends import AssistantMessage, BackendError, Usage

Script = Callable[[dict[str, Any]], Any]
_call_ids = itertools.count()


def reply(content: str | None = None, *, tool_calls: Sequence[tuple[str, Any]] = (),
          reasoning_content: str | None = None) -> dict[str, Any]:
    """An assistant message. `tool_calls` are `(name, arguments)`; a dict is sent as JSON, a
    string verbatim (so scripts can send broken JSON on purpose)."""
    msg: dict[str, Any] = {"role": "assistant", "content": content}
    if reasoning_content is not None:
        msg["reasoning_content"] = reasoning_content
    if tool_calls:
        msg["tool_calls"] = [
            {"id": f"call_{next(_call_ids)}", "type": "function",
             "function": {"name": name,
                          "arguments": args if isinstance(args, str) else json.dumps(args)}}
            for name, args in tool_calls]
    return msg


def _tokens(value: Any) -> int:
    return max(1, len(json.dumps(value)) // 4)


class FakeModel:
    """Scripted chat model. `counts` tallies answers by kind ('ok', '429', '500', 'timeout');
    `requests` holds the bodies of answered ('ok') requests, in arrival order."""

    def __init__(self, script: Script, *, latency: float | Callable[[dict[str, Any]], float] = 0.0,
                 rate_429: float = 0.0, rate_500: float = 0.0, rate_timeout: float = 0.0,
                 retry_after: float = 0.1, hang: float = 30.0, seed: int = 0,
                 model: str = "fake-model") -> None:
        for name, rate in (("rate_429", rate_429), ("rate_500", rate_500),
                           ("rate_timeout", rate_timeout)):
            if not 0 <= rate <= 1:
                raise ValueError(f"{name} must be within [0, 1], got {rate}")
        self.script = script
        self.latency = latency
        self.rates = (rate_429, rate_500, rate_timeout)
        self.retry_after = retry_after
        self.hang = hang
        self.model = model
        self._rng = random.Random(seed)
        self._lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.requests: list[dict[str, Any]] = []

    async def respond(self, body: dict[str, Any]) -> tuple[int, dict[str, Any], dict[str, str]]:
        """One chat-completions call: (status, JSON body, headers)."""
        with self._lock:
            draw = self._rng.random()
        r429, r500, rhang = self.rates
        if draw < r429:
            self.counts["429"] += 1
            return 429, _error("rate limited (injected)", "rate_limit_exceeded"), {
                "retry-after": f"{self.retry_after:g}"}
        delay = self.latency(body) if callable(self.latency) else self.latency
        if draw < r429 + r500:
            await asyncio.sleep(delay)
            self.counts["500"] += 1
            return 500, _error("internal error (injected)", "server_error"), {}
        if draw < r429 + r500 + rhang:
            self.counts["timeout"] += 1
            await asyncio.sleep(self.hang)
            return 504, _error("hung call (injected)", "timeout"), {}
        started = time.monotonic()
        try:
            message = self._message(self.script(body))
        except Exception as e:  # a broken script is the test's bug: say so, do not retry it
            self.counts["script_error"] += 1
            return 400, _error(f"script raised {type(e).__name__}: {e}", "invalid_request"), {}
        await asyncio.sleep(max(0.0, delay - (time.monotonic() - started)))
        self.counts["ok"] += 1
        self.requests.append(body)
        return 200, {
            "id": f"chatcmpl-{next(_call_ids)}",
            "object": "chat.completion",
            "created": int(time.time()),
            "model": body.get("model") or self.model,
            "choices": [{"index": 0, "message": message,
                         "finish_reason": "tool_calls" if message.get("tool_calls") else "stop"}],
            "usage": {"prompt_tokens": (p := _tokens(body.get("messages"))),
                      "completion_tokens": (c := _tokens(message)), "total_tokens": p + c},
        }, {}

    @staticmethod
    def _message(out: Any) -> dict[str, Any]:
        if isinstance(out, str):
            return reply(out)
        if isinstance(out, Mapping):
            return {"role": "assistant", "content": None, **out}
        raise TypeError(f"a script must return a str or a message dict, not {type(out).__name__}")

    # -- in-process -------------------------------------------------------------------------

    def backend(self, *, timeout: float = 10.0) -> FakeBackend:
        """A `ChatBackend` calling the script directly (no HTTP); hung calls fail after `timeout`."""
        return FakeBackend(self, timeout)

    # -- over HTTP --------------------------------------------------------------------------

    @contextmanager
    def serve(self) -> Iterator[str]:
        """Serve on 127.0.0.1 (random port) from a background thread; yields the base URL
        (`http://127.0.0.1:PORT/v1`). Routes: POST /v1/chat/completions, GET /v1/models."""
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        loop = asyncio.new_event_loop()
        ready = threading.Event()

        def main() -> None:
            asyncio.set_event_loop(loop)
            server = loop.run_until_complete(
                asyncio.start_server(self._connection, sock=sock, backlog=4096))
            ready.set()
            try:
                loop.run_forever()
            finally:  # end hung calls and open connections before the loop goes
                server.close()
                pending = asyncio.all_tasks(loop)
                for task in pending:
                    task.cancel()
                loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
                loop.close()

        thread = threading.Thread(target=main, name="fake-model", daemon=True)
        thread.start()
        if not ready.wait(10):
            raise RuntimeError("the fake model server did not start")
        try:
            yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=10)

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Plain HTTP/1.1 with keep-alive and Content-Length bodies: all an OpenAI client sends.
        Hand-written rather than uvicorn + a framework because the fake shares the CPU with the
        swarm it serves; at 100 concurrent calls a framework's per-request cost blurs the
        parallelism the tests measure."""
        try:
            while True:
                head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
                method, target, _ = head[0].split(" ", 2)
                headers = {k.strip().lower(): v.strip()
                           for k, _, v in (line.partition(":") for line in head[1:] if line)}
                body = await reader.readexactly(int(headers.get("content-length") or 0))
                path = target.split("?")[0].rstrip("/")
                extra: dict[str, str] = {}
                if method == "POST" and path.endswith("/chat/completions"):
                    try:
                        request = json.loads(body)
                    except ValueError:
                        status, payload = 400, _error("body is not JSON", "invalid_request")
                    else:
                        status, payload, extra = await self.respond(request)
                elif method == "GET" and path.endswith("/models"):
                    status, payload = 200, {"object": "list",
                                            "data": [{"id": self.model, "object": "model"}]}
                else:
                    status, payload = 404, _error(f"no route {method} {path}", "not_found")
                data = json.dumps(payload).encode()
                keep = headers.get("connection", "").lower() != "close"
                lines = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}",
                         "content-type: application/json", f"content-length: {len(data)}",
                         f"connection: {'keep-alive' if keep else 'close'}",
                         *(f"{k}: {v}" for k, v in extra.items())]
                writer.write(("\r\n".join(lines) + "\r\n\r\n").encode() + data)
                await writer.drain()
                if not keep:
                    break
        except (asyncio.IncompleteReadError, ConnectionError, ValueError):
            pass  # client went away or spoke something else than HTTP/1.1
        finally:
            writer.close()


def _error(message: str, code: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "code": code}}


class FakeBackend:
    """`FakeModel` as an in-process `ChatBackend`; messages are copied as if sent over a wire."""

    def __init__(self, fake: FakeModel, timeout: float) -> None:
        self.fake = fake
        self.timeout = timeout

    async def chat(self, messages: Sequence[Mapping[str, Any]],
                   tools: Sequence[Mapping[str, Any]],
                   sampling: Mapping[str, Any]) -> AssistantMessage:
        body = copy.deepcopy({"model": self.fake.model, "messages": list(messages),
                              "tools": list(tools), **sampling})
        try:
            async with asyncio.timeout(self.timeout):
                status, data, headers = await self.fake.respond(body)
        except TimeoutError:
            raise BackendError(f"fake model timed out after {self.timeout} s",
                               retryable=True) from None
        if status != 200:
            retry_after = float(headers["retry-after"]) if "retry-after" in headers else None
            raise BackendError(f"HTTP {status}: {data['error']['message']}",
                               retryable=status == 429 or status >= 500,
                               retry_after=retry_after, status=status)
        msg = AssistantMessage.from_json(data["choices"][0]["message"])
        msg.usage = Usage(data["usage"]["prompt_tokens"], data["usage"]["completion_tokens"])
        return msg

    async def aclose(self) -> None:
        pass


class WideLookup:
    """The swarm's reference workload, as a script for `FakeModel` plus its tool.

    The orchestrator creates `groups` sub-agents, assigns each `rounds x per_round` key lookups,
    and answers with every group's sum. A sub-agent looks its keys up `per_round` at a time and
    answers `gN=SUM`. A single agent given `single_agent_task` does all groups alone in the same
    rounds. Everything the script says is derived from the request's standard fields (tools,
    messages, tool_calls, tool results), so it runs unchanged behind any OpenAI client.
    """

    def __init__(self, groups: int = 100, rounds: int = 3, per_round: int = 5,
                 tool_latency: float = 0.5) -> None:
        self.groups, self.rounds, self.per_round = groups, rounds, per_round
        self.tool_latency = tool_latency
        self.executed: Counter[str] = Counter()
        self.task = f"Look up all keys of {groups} groups and report each group's sum."

    def keys(self, group: int) -> list[str]:
        return [f"k{group}.{j}" for j in range(self.rounds * self.per_round)]

    @staticmethod
    def value(key: str) -> int:
        import hashlib

        return int(hashlib.sha256(key.encode()).hexdigest()[:6], 16) % 1000

    def expected_answer(self) -> str:
        return "; ".join(f"g{g}={sum(map(self.value, self.keys(g)))}" for g in range(self.groups))

    def group_prompt(self, group: int) -> str:
        return f"Group g{group} keys: {', '.join(self.keys(group))}"

    @property
    def single_agent_task(self) -> str:
        return "\n".join(self.group_prompt(g) for g in range(self.groups))

    async def lookup(self, key: str) -> str:
        """Look a key up in the slow store.

        Args:
            key: the key, like k3.14
        """
        await asyncio.sleep(self.tool_latency)
        self.executed[key] += 1
        return str(self.value(key))

    def script(self, body: dict[str, Any]) -> dict[str, Any]:
        messages = body["messages"]
        names = {t["function"]["name"] for t in body.get("tools") or []}
        steps = sum(m["role"] == "assistant" for m in messages)
        if "create_subagent" in names:
            return self._orchestrate(messages, steps)
        groups: list[tuple[str, list[str]]] = []
        for line in messages[1]["content"].splitlines():
            label, _, keys = line.partition(" keys: ")
            groups.append((label.removeprefix("Group "), keys.split(", ")))
        batches = [(g, keys[i:i + self.per_round]) for g, keys in groups
                   for i in range(0, len(keys), self.per_round)]
        if steps < len(batches):
            return reply(tool_calls=[("lookup", {"key": k}) for k in batches[steps][1]])
        key_of = {c["id"]: json.loads(c["function"]["arguments"])["key"]
                  for m in messages if m["role"] == "assistant" for c in m.get("tool_calls") or []}
        value_of = {key_of[m["tool_call_id"]]: int(m["content"])
                    for m in messages if m["role"] == "tool"}
        return reply("; ".join(f"{g}={sum(value_of[k] for k in keys)}" for g, keys in groups))

    def _orchestrate(self, messages: list[dict[str, Any]], steps: int) -> dict[str, Any]:
        if steps == 0:
            return reply(tool_calls=[
                ("create_subagent", {"name": f"w{g}", "system_prompt": "You look keys up."})
                for g in range(self.groups)])
        if steps == 1:
            return reply(tool_calls=[("assign_task", {"agent": f"w{g}", "prompt": self.group_prompt(g)})
                                     for g in range(self.groups)])
        results = [m["content"] for m in messages[-self.groups:] if m["role"] == "tool"]
        return reply("; ".join(results))
