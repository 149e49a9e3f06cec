"""A request's state as it moves through the engine."""

from __future__ import annotations

import itertools
import time
from dataclasses import dataclass, field
from enum import Enum

import torch

from swarmoe.engine.sampling import SamplingParams

_ids = itertools.count()


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(eq=False)  # identity: the scheduler's list lookups must not compare token lists
class Sequence:
    """Token ids so far, how many of them have latents in the cache, and the blocks holding them.

    `prompt_embeds` is set for multimodal prompts (vision features already merged in); such
    sequences skip prefix caching, since their token ids do not identify their content.
    """

    request_id: str
    prompt_ids: list[int]
    params: SamplingParams
    prompt_embeds: torch.Tensor | None = None
    index: int = 0
    output_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] = field(default_factory=list)
    status: Status = Status.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed: int = 0
    num_cached: int = 0
    finish_reason: str | None = None
    generator: torch.Generator | None = None
    text: str = ""
    arrival: float = field(default_factory=time.monotonic)
    first_token_time: float | None = None
    finish_time: float | None = None
    seq_id: int = field(default_factory=lambda: next(_ids))
    # Chained hashes of the full blocks of token_ids (tokens only grow, so they stay valid) and
    # how many blocks of block_table have been offered to the prefix cache.
    block_hashes: list[bytes] = field(default_factory=list)
    num_registered: int = 0

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    def token_slice(self, start: int, end: int) -> list[int]:
        """token_ids[start:end] without building the whole list."""
        n = len(self.prompt_ids)
        if end <= n:
            return self.prompt_ids[start:end]
        if start >= n:
            return self.output_ids[start - n : end - n]
        return self.prompt_ids[start:] + self.output_ids[: end - n]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def cacheable(self) -> bool:
        return self.prompt_embeds is None
