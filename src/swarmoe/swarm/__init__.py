"""The agent swarm: an orchestrator that creates sub-agents on the fly and runs them in
parallel over any OpenAI-compatible endpoint or an in-process `ChatBackend`. No torch here."""

from swarmoe.swarm.backends import (
    AssistantMessage,
    BackendError,
    ChatBackend,
    OpenAIBackend,
    ToolCall,
    Usage,
)
from swarmoe.swarm.limits import RetryPolicy
from swarmoe.swarm.mcp import MCPTools
from swarmoe.swarm.store import Event
from swarmoe.swarm.swarm import RunStopped, Swarm, SwarmResult, SwarmStats
from swarmoe.swarm.tools import Tool, ToolError, import_tool, tool

__all__ = [
    "AssistantMessage",
    "BackendError",
    "ChatBackend",
    "Event",
    "MCPTools",
    "OpenAIBackend",
    "RetryPolicy",
    "RunStopped",
    "Swarm",
    "SwarmResult",
    "SwarmStats",
    "Tool",
    "ToolCall",
    "ToolError",
    "Usage",
    "import_tool",
    "tool",
]
