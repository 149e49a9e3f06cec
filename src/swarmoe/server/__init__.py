"""The OpenAI-compatible HTTP server over the engine (FastAPI); see docs/server.md."""

from swarmoe.server.app import EngineClient, create_app

__all__ = ["EngineClient", "create_app"]
