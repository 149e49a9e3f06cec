"""Sampling parameters and the sampler: temperature, top-k, top-p, seeds, logprobs."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch


@dataclass
class SamplingParams:
    """How to pick tokens; shaped like vLLM's so users feel at home.

    temperature 0 (anything below 1e-5) is greedy. A `seed` makes a request's samples
    reproducible whatever else shares its batch.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_tokens: int | None = 16
    stop: list[str] | str | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    seed: int | None = None
    logprobs: int | None = None
    n: int = 1

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"SamplingParams.{name} {why}, got {getattr(self, name)!r}")

        if not isinstance(self.temperature, int | float) or not math.isfinite(self.temperature) or self.temperature < 0:
            raise bad("temperature", "must be a finite number >= 0")
        if not isinstance(self.top_p, int | float) or not 0 < self.top_p <= 1:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or (self.top_k < 1 and self.top_k != -1):
            raise bad("top_k", "must be -1 (off) or >= 1")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be a positive integer or None")
        if self.logprobs is not None and (not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= 20):
            raise bad("logprobs", "must be an integer in [0, 20]")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be a positive integer")
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        if self.stop is not None and not all(isinstance(s, str) and s for s in self.stop):
            raise bad("stop", "must be non-empty strings")
        if not all(isinstance(t, int) and t >= 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")

    @property
    def greedy(self) -> bool:
        # Dividing logits by a temperature this small overflows float32; it is argmax anyway.
        return self.temperature < 1e-5


def sample(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> tuple[int, dict[int, float] | None]:
    """One token from a [vocab] row; returns (token, top logprobs or None)."""
    logits = logits.float()
    top = None
    if params.logprobs is not None:
        logp = torch.log_softmax(logits, -1)
        values, ids = logp.topk(max(params.logprobs, 1))
        top = dict(zip(ids.tolist(), values.tolist(), strict=True))
    if params.greedy:
        token = int(logits.argmax())
    else:
        scaled = logits / params.temperature
        if params.top_k > 0:
            kth = scaled.topk(min(params.top_k, scaled.numel())).values[-1]
            scaled = scaled.masked_fill(scaled < kth, float("-inf"))
        probs = torch.softmax(scaled, -1)
        if params.top_p < 1:
            sorted_p, order = probs.sort(descending=True)
            keep = sorted_p.cumsum(-1) - sorted_p < params.top_p
            keep[0] = True  # a top_p below float32 resolution would otherwise keep nothing
            probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_p[keep])
        token = int(torch.multinomial(probs, 1, generator=generator))
    if top is not None:
        top.setdefault(token, float(torch.log_softmax(logits, -1)[token]))
    return token, top
