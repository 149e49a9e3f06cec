"""The engine in a process of its own, fed by a server's event loop in another.

`AsyncEngine` steps the model on a thread of the server's process, so the model's Python and the
server's (HTTP parsing, prompt building, streaming) take turns on one GIL: with 100 clients and a
small model, each waits for the other. Here the child process owns the `LLM` and steps it; the
parent keeps the tokenizer and config, sends requests down a pipe and gets each step's outputs
back (only the ones a stream's interval lets through), so the two run on different cores — the
split vLLM makes between its API server and its engine core. Same interface as `AsyncEngine`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import gc
import itertools
import multiprocessing
import signal
import threading
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from swarmoe.config import ModelConfig, load_config
from swarmoe.engine.async_engine import Streams, Throttle, outputs
from swarmoe.engine.llm import Prompt, RequestOutput, checkpoint_tokenizer
from swarmoe.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from multiprocessing.connection import Connection

    from swarmoe.text import Tokenizer


class EngineProcess:
    """`LLM(model, **llm_args)` in a child process; raises what `LLM` raises at load."""

    def __init__(self, model: str | Path, **llm_args: Any) -> None:
        path = Path(model)
        context = multiprocessing.get_context("spawn")  # no fork of a process holding threads
        self._commands, child_commands = context.Pipe()
        self._results, child_results = context.Pipe(duplex=False)
        self._process = context.Process(
            target=_serve_engine, args=(str(path), llm_args, child_commands, child_results),
            name="swarmoe-engine", daemon=True)
        self._process.start()
        child_commands.close()
        child_results.close()
        try:
            kind, value = self._results.recv()
        except EOFError:
            raise RuntimeError("the engine process exited while loading the model") from None
        if kind == "failed":
            self._process.join(5)
            raise value
        self._max_model_len: int = value
        self._config = load_config(path)
        self._tokenizer = checkpoint_tokenizer(path)
        self._send_lock = threading.Lock()
        self._replies: dict[int, concurrent.futures.Future] = {}
        self._tokens = itertools.count()
        self._streams = Streams()  # no throttles here: the engine process applies them
        self._gone: BaseException | None = None
        threading.Thread(target=self._receive, name="swarmoe-engine-results", daemon=True).start()

    @property
    def tokenizer(self) -> Tokenizer | None:
        return self._tokenizer

    @property
    def config(self) -> ModelConfig:
        return self._config

    @property
    def max_model_len(self) -> int:
        return self._max_model_len

    # -- parent side -------------------------------------------------------------------------

    def _send(self, *message: Any) -> None:
        if self._gone is not None:
            raise RuntimeError(f"the engine process is gone: {self._gone}")
        with self._send_lock:
            self._commands.send(message)

    async def _request(self, *message: Any) -> Any:
        token = next(self._tokens)
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._replies[token] = future
        try:
            self._send(message[0], token, *message[1:])
        except BaseException:
            self._replies.pop(token, None)
            raise
        return await asyncio.wrap_future(future)

    def _receive(self) -> None:
        """Results thread: replies resolve their futures; outputs go to their streams."""
        while True:
            try:
                kind, *rest = self._results.recv()
            except (EOFError, OSError):
                self._fail_all(RuntimeError("the engine process exited"))
                return
            if kind == "reply":
                token, value, error = rest
                future = self._replies.pop(token)
                if not future.set_running_or_notify_cancel():
                    continue  # its caller was cancelled
                if error is None:
                    future.set_result(value)
                else:
                    future.set_exception(error)
            elif kind == "outputs":
                self._streams.publish(rest[0])
            elif kind == "failed":  # a step raised: every request in flight has ended
                self._streams.fail(rest[0])

    def _fail_all(self, error: BaseException) -> None:
        self._gone = error
        self._streams.fail(error)
        for token in list(self._replies):
            future = self._replies.pop(token)
            if future.set_running_or_notify_cancel():
                future.set_exception(error)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
        *, interval: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """As `AsyncEngine.generate`: bad input raises the engine's ValueError here."""
        rid = request_id or f"req-{uuid.uuid4().hex}"
        q: asyncio.Queue = asyncio.Queue()
        self._streams.open(rid, asyncio.get_running_loop(), q, None)  # before the first output
        finished = False
        try:
            await self._request("add", prompt, params, rid, interval)
            async with contextlib.aclosing(outputs(q, interval)) as items:
                async for out in items:
                    yield out
            finished = True
        finally:
            self._streams.close(rid)
            if not finished and self._gone is None:
                self._send("abort", rid)  # also when the add was still on its way: it comes first

    async def abort(self, request_id: str) -> None:
        self._send("abort", request_id)

    async def stats(self) -> dict[str, float]:
        return await self._request("stats")

    def shutdown(self) -> None:
        with contextlib.suppress(RuntimeError, OSError):
            self._send("stop")
        self._process.join(5)
        if self._process.is_alive():
            self._process.kill()
            self._process.join(5)


# -- child side -------------------------------------------------------------------------------


def _serve_engine(path: str, llm_args: dict[str, Any], commands: Connection, results: Connection) -> None:
    """The engine process: load, then take commands between steps and send each step's outputs."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent decides when to stop
    from swarmoe.engine.llm import LLM

    try:
        llm = LLM(path, **llm_args)
    except Exception as exc:
        results.send(("failed", _sendable(exc)))
        return
    gc.collect()
    gc.freeze()  # the model's objects live as long as the process: keep them out of GC scans
    results.send(("ready", llm.max_model_len))
    throttles: dict[str, Throttle] = {}
    while True:
        if commands.poll(0 if llm.has_unfinished else 0.05):
            while True:  # every pending command before the next step
                try:
                    message = commands.recv()
                except EOFError:  # the parent is gone, however it ended
                    return
                if message[0] == "stop":
                    return
                _command(llm, throttles, results, message)
                if not commands.poll():
                    break
        if not llm.has_unfinished:
            continue
        try:
            step = llm.step()
        except Exception as exc:  # a model failure ends every request in flight
            for rid in list(throttles):
                llm.abort(rid)
            throttles.clear()
            results.send(("failed", RuntimeError(f"{type(exc).__name__}: {exc}")))
            continue
        now = time.monotonic()
        due = [out for out in step if out.request_id in throttles and throttles[out.request_id].due(out, now)]
        for out in due:
            if out.finished:
                del throttles[out.request_id]
        if due:
            results.send(("outputs", due))


def _command(llm: Any, throttles: dict[str, Throttle], results: Connection, message: tuple) -> None:
    kind = message[0]
    if kind == "abort":
        throttles.pop(message[1], None)
        llm.abort(message[1])
        return
    token = message[1]
    try:
        if kind == "add":
            prompt, params, rid, interval = message[2:]
            value = llm.add_request(prompt, params, rid)
            throttles[value] = Throttle(interval)
        else:  # stats
            value = llm.stats()
    except Exception as exc:
        results.send(("reply", token, None, _sendable(exc)))
    else:
        results.send(("reply", token, value, None))


def _sendable(exc: BaseException) -> BaseException:
    """`exc` if it survives pickling, else a RuntimeError with its text."""
    import pickle

    try:
        pickle.loads(pickle.dumps(exc))
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")
    return exc
