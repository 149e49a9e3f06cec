"""Test doubles and tiny checkpoints for tests, docs and demos (never the product).

Imported lazily: the scripted fake model needs no torch, the tiny checkpoints do.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "make_tiny_checkpoint": "swarmoe.testing.tiny",
    "tiny_config": "swarmoe.testing.tiny",
    "write_tiny_tokenizer": "swarmoe.testing.tokenizer_files",
    "FakeModel": "swarmoe.testing.fake_model",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'swarmoe.testing' has no attribute {name!r}")
