"""Serving mechanics over `swarmoe.model`: scheduler, paged latent cache, expert memory."""

from swarmoe.engine.llm import LLM, CompletionOutput, RequestOutput
from swarmoe.engine.sampling import SamplingParams

__all__ = ["LLM", "CompletionOutput", "RequestOutput", "SamplingParams"]
