"""swarmoe: a Kimi K2.5-style sparse MoE runtime and agent swarm.

The public names are imported lazily so that the swarm (no torch) and the model runtime
(torch) can each be used without importing the other.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

_EXPORTS = {
    "LLM": "swarmoe.engine.llm",
    "SamplingParams": "swarmoe.engine.sampling",
    "Swarm": "swarmoe.swarm.swarm",
    "tool": "swarmoe.swarm.tools",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'swarmoe' has no attribute {name!r}")
