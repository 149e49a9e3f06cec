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


@dataclass
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

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_ids + self.output_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.output_ids)

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def cacheable(self) -> bool:
        return self.prompt_embeds is None
