"""MCP servers as tool sources (official `mcp` SDK): streamable HTTP by URL, stdio by command.

Tool names get a per-server prefix (`prefix__name`) when asked, so two servers can both
offer `search`. The connection lives for one run.
"""

from __future__ import annotations

import shlex
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

from swarmoe.swarm.tools import Tool, ToolError


@dataclass
class MCPTools:
    """An MCP server whose tools the swarm's agents may call.

    `server` is a URL (`http://host/mcp`, streamable HTTP), a command line (string or argv list,
    stdio), or an in-process `mcp` server object (tests)."""

    server: str | Sequence[str] | Any
    prefix: str | None = None
    env: dict[str, str] | None = None
    timeout: float | None = None
    include: Sequence[str] | None = field(default=None)
    """Only these tool names (before prefixing); None takes all."""

    @property
    def spec(self) -> str | list[str] | None:
        """A JSON-able description, so a resumed run can reconnect; None for in-process servers."""
        if isinstance(self.server, str):
            return self.server
        if isinstance(self.server, Sequence):
            return list(self.server)
        return None

    def _target(self) -> Any:
        from mcp.client.stdio import StdioServerParameters

        server = self.server
        if isinstance(server, str) and not server.startswith(("http://", "https://")):
            server = shlex.split(server)
        if isinstance(server, Sequence) and not isinstance(server, str):
            if not server:
                raise ValueError("MCP stdio server command is empty")
            return StdioServerParameters(command=server[0], args=list(server[1:]), env=self.env)
        return server

    @asynccontextmanager
    async def connect(self) -> AsyncIterator[list[Tool]]:
        from mcp import Client

        async with Client(self._target(), read_timeout_seconds=self.timeout) as client:
            listing = await client.list_tools()
            tools = [self._wrap(client, t) for t in listing.tools
                     if self.include is None or t.name in self.include]
            yield tools

    def _wrap(self, client: Any, spec: Any) -> Tool:
        remote = spec.name

        async def call(**arguments: Any) -> str:
            result = await client.call_tool(remote, arguments)
            text = "\n".join(getattr(c, "text", None) or c.model_dump_json() for c in result.content)
            if not text and result.structured_content is not None:
                import json

                text = json.dumps(result.structured_content)
            if result.is_error:
                raise ToolError(f"MCP tool {remote!r} failed: {text}")
            return text

        name = f"{self.prefix}__{remote}" if self.prefix else remote
        schema = dict(spec.input_schema or {"type": "object", "properties": {}})
        return Tool(name=name, description=spec.description or remote, parameters=schema,
                    fn=call, timeout=self.timeout)
