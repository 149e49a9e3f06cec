"""An async front for `LLM`: one engine thread steps the batch; asyncio callers feed it.

The engine thread owns the `LLM` (nothing else touches it), so handlers never block on model
work: they post commands and await per-request queues of outputs. A bad request fails its own
caller with the engine's ValueError and leaves every other request running.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from swarmoe.config import ModelConfig
from swarmoe.engine.llm import LLM, Prompt, RequestOutput
from swarmoe.engine.sampling import SamplingParams

if TYPE_CHECKING:
    from swarmoe.text import Tokenizer

DONE = object()  # the end of a request's outputs


@dataclass(slots=True)
class Throttle:
    """When a stream may get its next output (see `AsyncEngine.generate`'s `interval`)."""

    interval: float | None
    next_at: float = 0.0

    def due(self, out: RequestOutput, now: float) -> bool:
        """Whether `out` goes out now: the last output always; others once per interval (each
        output holds all the tokens so far, so a skipped one loses nothing)."""
        if self.interval is None or out.finished:
            return True
        if now < self.next_at:
            return False
        self.next_at = now + self.interval
        return True


@dataclass(slots=True)
class _Stream:
    """Where one request's outputs go, and when."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue
    throttle: Throttle


class Streams:
    """The open requests' destinations: each caller's event loop and queue, and its throttle.

    Fed by one thread other than the callers' (the engine thread, or the one reading an engine
    process's results): one wake-up per event loop per batch, however many of its requests moved.
    """

    def __init__(self) -> None:
        self._by_id: dict[str, _Stream] = {}

    def open(self, rid: str, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue,
             interval: float | None) -> None:
        self._by_id[rid] = _Stream(loop, queue, Throttle(interval))

    def close(self, rid: str) -> None:
        self._by_id.pop(rid, None)

    def publish(self, outputs: list[RequestOutput]) -> None:
        """Queue each output its throttle lets through; a finished request's stream ends."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, Any]]] = {}
        now = time.monotonic()
        for out in outputs:
            stream = self._by_id.get(out.request_id)
            if stream is None or not stream.throttle.due(out, now):
                continue
            batch = batches.setdefault(stream.loop, [])
            batch.append((stream.queue, out))
            if out.finished:
                batch.append((stream.queue, DONE))
                self._by_id.pop(out.request_id, None)
        for loop, batch in batches.items():
            loop.call_soon_threadsafe(deliver, batch)

    def fail(self, error: BaseException) -> list[str]:
        """End every open stream with `error`; the ids of those ended."""
        ended = []
        for rid in list(self._by_id):
            stream = self._by_id.pop(rid, None)
            if stream is not None:
                stream.loop.call_soon_threadsafe(stream.queue.put_nowait, error)
                ended.append(rid)
        return ended


class AsyncEngine:
    def __init__(self, llm: LLM) -> None:
        self.llm = llm
        self._commands: queue.Queue[tuple[Callable[[], Any], concurrent.futures.Future]] = queue.Queue()
        self._streams = Streams()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="swarmoe-engine", daemon=True)
        self._thread.start()

    # Read-only facts the server needs without reaching into the engine thread's LLM.
    @property
    def tokenizer(self) -> Tokenizer | None:
        return self.llm.tokenizer

    @property
    def config(self) -> ModelConfig:
        return self.llm.config

    @property
    def max_model_len(self) -> int:
        return self.llm.max_model_len

    # -- engine thread ----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            block = not self.llm.has_unfinished
            try:
                fn, future = self._commands.get(timeout=0.05 if block else 0)
                self._call(fn, future)
                while True:  # take every pending command before the next step
                    fn, future = self._commands.get_nowait()
                    self._call(fn, future)
            except queue.Empty:
                pass
            if self.llm.has_unfinished:
                try:
                    outputs = self.llm.step()
                except Exception as exc:  # a model failure ends every stream with an error
                    self._fail_all(exc)
                    continue
                self._streams.publish(outputs)

    @staticmethod
    def _call(fn: Callable[[], Any], future: concurrent.futures.Future) -> None:
        if not future.set_running_or_notify_cancel():
            return  # its caller was cancelled first (a client left, a timeout): skip it
        try:
            future.set_result(fn())
        except Exception as exc:
            future.set_exception(exc)

    def _fail_all(self, exc: BaseException) -> None:
        for rid in self._streams.fail(exc):
            self.llm.abort(rid)

    # -- callers ----------------------------------------------------------------------------

    async def _submit(self, fn: Callable[[], Any]) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((fn, future))
        return await asyncio.wrap_future(future)

    async def generate(
        self, prompt: Prompt, params: SamplingParams, request_id: str | None = None,
        *, interval: float | None = None,
    ) -> AsyncIterator[RequestOutput]:
        """Outputs of one request as it progresses; the last one has `finished=True`.

        Leaving the iteration early (a client went away) aborts the request and frees its cache.
        With `interval` set, a caller gets at most one output per `interval` seconds until the
        last, which comes at once, and only the newest of those waiting for it (outputs are
        cumulative, so nothing is lost): an HTTP stream then sends fewer, larger pieces instead
        of paying a chunk per token per client. `interval=0` only skips outputs a slow caller
        fell behind on.
        """
        loop = asyncio.get_running_loop()
        q: asyncio.Queue = asyncio.Queue()

        def add() -> str:
            rid = self.llm.add_request(prompt, params, request_id)
            self._streams.open(rid, loop, q, interval)
            return rid

        added: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put((add, added))
        try:
            rid = await asyncio.wrap_future(added)
        except asyncio.CancelledError:  # the caller left while the add was queued: undo it
            added.add_done_callback(self._abort_when_added)
            raise
        finished = False
        try:
            async with contextlib.aclosing(outputs(q, interval)) as items:
                async for out in items:
                    yield out
            finished = True
        finally:
            if not finished:
                self._commands.put((lambda: self._abort(rid), concurrent.futures.Future()))

    def _abort_when_added(self, added: concurrent.futures.Future) -> None:
        if not added.cancelled() and added.exception() is None:
            rid = added.result()
            self._commands.put((lambda: self._abort(rid), concurrent.futures.Future()))

    def _abort(self, request_id: str) -> None:
        self._streams.close(request_id)
        self.llm.abort(request_id)

    async def abort(self, request_id: str) -> None:
        await self._submit(lambda: self._abort(request_id))

    async def stats(self) -> dict[str, float]:
        return await self._submit(self.llm.stats)

    def shutdown(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


async def outputs(q: asyncio.Queue, interval: float | None) -> AsyncIterator[RequestOutput]:
    """A request's outputs as its engine queues them, until `DONE`; an exception queued instead
    (the engine failed) is raised. With an interval, only the newest of those waiting."""
    while True:
        item = await q.get()
        if interval is not None:
            item = _newest(q, item)
        if item is DONE:
            return
        if isinstance(item, BaseException):
            raise RuntimeError(f"engine failed while generating: {item}") from item
        yield item


def _newest(q: asyncio.Queue, item: Any) -> Any:
    """`item`, or the newest output queued after it; an end marker is never skipped."""
    while isinstance(item, RequestOutput) and not q.empty():
        newer = q.get_nowait()
        if newer is DONE:
            q.put_nowait(DONE)  # the queue is empty now: it still comes next
            break
        item = newer
    return item


def deliver(batch: list[tuple[asyncio.Queue, Any]]) -> None:
    """Put each item on its queue (run on the queues' event loop)."""
    for q, item in batch:
        q.put_nowait(item)
