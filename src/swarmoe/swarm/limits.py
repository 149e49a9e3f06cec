"""Shared limits for all agents of a run: request concurrency, requests/min and tokens/min
buckets, retries with backoff, and the token/cost budget.

They are shared on purpose: 100 sub-agents that each respect a limit alone still overrun the
provider together. A 429 is backpressure, not failure: it is retried after the server's
`Retry-After` (or an exponential, fully jittered delay), never surfaced as a broken run.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from swarmoe.swarm.backends import BackendError, Usage

T = TypeVar("T")


class TokenBucket:
    """`rate` units per minute, bursting up to one minute's worth. `take` waits until the
    bucket is non-negative, then charges; charging may drive it negative (a large request
    is let through, and the next ones wait for it)."""

    def __init__(self, per_minute: float) -> None:
        if per_minute <= 0:
            raise ValueError(f"a rate limit must be positive, got {per_minute}")
        self.capacity = float(per_minute)
        self.level = float(per_minute)
        self.rate = per_minute / 60.0
        self.stamp = time.monotonic()

    def _refill(self) -> None:
        now = time.monotonic()
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    async def take(self, amount: float) -> None:
        self._refill()
        while self.level < 0 or (self.level < amount and self.level < self.capacity):
            await asyncio.sleep(max((min(amount, self.capacity) - self.level) / self.rate, 0.005))
            self._refill()
        self.level -= amount

    def charge(self, amount: float) -> None:
        self._refill()
        self.level -= amount


@dataclass(frozen=True)
class RetryPolicy:
    """Retries for retryable backend errors (429, 5xx, timeouts, lost connections)."""

    max_attempts: int = 10
    base_delay: float = 0.5
    max_delay: float = 30.0

    def delay(self, attempt: int, retry_after: float | None) -> float:
        """Wait before attempt `attempt + 1`: the server's Retry-After plus a little jitter
        (so 100 agents told "1 s" do not return in one burst), else full-jitter exponential."""
        if retry_after is not None:
            return min(retry_after, self.max_delay) * (1 + 0.1 * random.random())
        return random.uniform(0, min(self.max_delay, self.base_delay * 2**attempt))


class RequestLimiter:
    """Gate for every model call of a run: concurrency, requests/min, tokens/min, retries."""

    def __init__(self, *, max_concurrent: int, rpm: float | None, tpm: float | None,
                 retry: RetryPolicy) -> None:
        self._sem = asyncio.Semaphore(max_concurrent)
        self._rpm = TokenBucket(rpm) if rpm else None
        self._tpm = TokenBucket(tpm) if tpm else None
        self.retry = retry
        self.retries = 0

    async def call(self, fn: Callable[[], Awaitable[T]], *, usage_of: Callable[[T], Usage],
                   on_retry: Callable[[int, BackendError, float], None]) -> T:
        attempt = 0
        while True:
            if self._rpm:
                await self._rpm.take(1)
            if self._tpm:
                await self._tpm.take(0)
            try:
                async with self._sem:
                    result = await fn()
            except BackendError as e:
                attempt += 1
                if not e.retryable or attempt >= self.retry.max_attempts:
                    raise
                wait = self.retry.delay(attempt - 1, e.retry_after)
                self.retries += 1
                on_retry(attempt, e, wait)
                await asyncio.sleep(wait)
                continue
            if self._tpm:
                u = usage_of(result)
                self._tpm.charge(u.prompt_tokens + u.completion_tokens)
            return result


class BudgetExceeded(Exception):
    """The run's token or cost budget is spent."""


class Budget:
    """Tokens and cost of the whole run, sub-agents included."""

    def __init__(self, *, max_tokens: int | None, max_cost: float | None,
                 prices: tuple[float, float] | None) -> None:
        if max_cost is not None and prices is None:
            raise ValueError("max_cost needs prices=(input, output) in currency per million tokens")
        self.max_tokens = max_tokens
        self.max_cost = max_cost
        self.prices = prices
        self.prompt_tokens = 0
        self.completion_tokens = 0

    @property
    def cost(self) -> float | None:
        if self.prices is None:
            return None
        return (self.prompt_tokens * self.prices[0] + self.completion_tokens * self.prices[1]) / 1e6

    def charge(self, usage: Usage) -> None:
        """Add a call's usage; raise `BudgetExceeded` once a budget is passed."""
        self.prompt_tokens += usage.prompt_tokens
        self.completion_tokens += usage.completion_tokens
        total = self.prompt_tokens + self.completion_tokens
        if self.max_tokens is not None and total > self.max_tokens:
            raise BudgetExceeded(f"token budget spent: {total} > max_tokens={self.max_tokens}")
        cost = self.cost
        if self.max_cost is not None and cost is not None and cost > self.max_cost:
            raise BudgetExceeded(f"cost budget spent: {cost:.4f} > max_cost={self.max_cost}")
